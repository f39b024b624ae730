"""Time to first token, disaggregated vs aggregated, in one MPI job of 3 ranks.

    mpiexec -n 3 python -m mpi4py scripts/bench_ttft.py [--device cuda] [--json out.json]

Both topologies use the same 3 ranks, one after the other: aggregated = two
executors that each run both phases (requests go to the first); disaggregated
= a context executor and a generation executor. On `--device cuda` every
executor sits on GPU 0 (the one-GPU machine: CUDA IPC between them). Prompts
run one at a time, streaming, so TTFT is the prefill alone:

- aggregated TTFT: enqueue -> first token at rank 0;
- disaggregated TTFT: enqueue -> first token (the context phase's answer);
- and, for the disaggregated run, "first token from the generation side":
  enqueue -> the generation executor's first response, i.e. TTFT plus the
  hand-off (the KV transfer) — the share the transfer adds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from disagg_mpi import Request, launch
from disagg_mpi.config import parse_topology


def _executor(rank: int, device: str, block_size: int, num_blocks: int, transceiver: bool) -> dict:
    d = {"participant_ids": [rank], "max_batch_size": 8, "max_num_tokens": 4096,
         "kv_cache": {"block_size": block_size, "num_blocks": num_blocks}}
    if device == "cuda":
        d["device_ids"] = [0]
    if transceiver:
        d["cache_transceiver_config"] = {"enable_cache_transceiver": True}
    return d


def topologies(model: str, dtype: str, device: str, block_size: int, num_blocks: int):
    agg = parse_topology({"model": {"path": model, "dtype": dtype}, "generation_executors": [
        _executor(1, device, block_size, num_blocks, False), _executor(2, device, block_size, num_blocks, False)]})
    dis = parse_topology({"model": {"path": model, "dtype": dtype},
                          "context_executors": [_executor(1, device, block_size, num_blocks, True)],
                          "generation_executors": [_executor(2, device, block_size, num_blocks, True)]})
    return agg, dis


def measure(orch, prompts: list[list[int]], disaggregated: bool) -> list[dict]:
    out = []
    for p in prompts:
        t0 = time.perf_counter()
        first_gen = None
        req = Request(p, max_tokens=4, ignore_eos=True, streaming=True)
        [_gid] = orch.submit([req]) if disaggregated else orch.enqueue_requests([req], select_id=0)
        final = None
        while final is None:
            for _, resp in orch.await_responses(timeout=60):
                if first_gen is None and resp.result is not None and resp.result.output_token_ids:
                    first_gen = time.perf_counter()
                if resp.is_final:
                    final = resp
        if final.error_msg:
            raise RuntimeError(final.error_msg)
        m = final.result.metrics
        out.append({"ttft_ms": m.ttft_ms, "gen_first_ms": (first_gen - t0) * 1e3,
                    "kv_transfer_ms": m.kv_transfer_ms, "kv_transfer_bytes": m.kv_transfer_bytes})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default=None, help="default: random:llama-3.1-8b on cuda, random:tiny on cpu")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = args.model or ("random:llama-3.1-8b" if args.device == "cuda" else "random:tiny")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    block = 32
    blocks = 4 * (args.prompt_len // block + 2)
    prompts = [[(i * 7919 + j * 31) % 1000 + 3 for j in range(args.prompt_len)] for i in range(args.repeats + 1)]
    agg, dis = topologies(model, dtype, args.device, block, blocks)
    results = {}
    for name, topo in (("aggregated", agg), ("disaggregated", dis)):
        with launch(topo) as orch:
            if orch is not None:
                runs = measure(orch, prompts, name == "disaggregated")[1:]  # the first one warms up
                results[name] = runs
    if not results:
        return
    a = statistics.median(r["ttft_ms"] for r in results["aggregated"])
    d = statistics.median(r["ttft_ms"] for r in results["disaggregated"])
    g = statistics.median(r["gen_first_ms"] for r in results["disaggregated"])
    x = statistics.median(r["kv_transfer_ms"] for r in results["disaggregated"])
    summary = {"model": model, "device": args.device, "prompt_len": args.prompt_len, "repeats": args.repeats,
               "agg_ttft_ms": a, "disagg_ttft_ms": d, "ratio": d / a,
               "disagg_first_token_from_generation_ms": g, "ratio_with_handoff": g / a,
               "kv_transfer_ms": x, "transfer_share": x / g,
               "kv_transfer_bytes": results["disaggregated"][0]["kv_transfer_bytes"], "runs": results}
    if args.device == "cuda":
        import torch

        summary["card"] = torch.cuda.get_device_name(0)
    print(f"TTFT of {args.prompt_len}-token prompts, median of {args.repeats}: aggregated {a:.1f} ms, "
          f"disaggregated {d:.1f} ms (ratio {d / a:.3f}); first token from the generation side {g:.1f} ms "
          f"(ratio {g / a:.3f}), of which KV transfer {x:.1f} ms ({100 * x / g:.0f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Where a mixed step's time goes (issue 23): a prefill chunk beside running decodes, CUDA only.

The aggregated server's slowest inter-token gaps are steps that carry a `--chunk`-token piece of a
new prompt beside every running decode. This drives one in-process engine as the server does:
`--decodes` requests decoding, then `--rounds` prompts of `--prompt` tokens arriving one at a time.
Each engine step is timed between two device syncs, and classed by its tokens (decode-only, or
a chunk beside the decodes). The last round runs under torch.profiler (CPU and CUDA), which gives
the mixed steps' kernel time beside their wall time (the rest is the host's, or waits), and the
host's busiest operations by self CPU time (launches, copies, syncs).

    python scripts/probe_mixed.py --json mixed.json [--model random:llama-3.1-8b --chunk 512]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request  # noqa: E402
from disagg_mpi.engine.executor import Executor  # noqa: E402
from disagg_mpi.model import load_model  # noqa: E402


def _executor(spec: str, decodes: int, prompt: int, chunk: int, rounds: int, new: int) -> Executor:
    bs = 32
    blocks = decodes * -(-(64 + new) // bs) + rounds * -(-(prompt + 1) // bs) + 8
    model = load_model(spec, dtype=torch.bfloat16, device="cuda")
    return Executor(model, ExecutorConfig(max_batch_size=decodes + 1, max_num_tokens=8192, prefill_chunk_tokens=chunk,
                                          kv_cache_config=KvCacheConfig(block_size=bs, num_blocks=blocks),
                                          dtype="bfloat16", device="cuda"))


def _step(ex: Executor) -> tuple[int, float]:
    """(tokens the step computed, its wall ms between two device syncs)."""
    eng = ex._engine
    before = eng.stats["tokens"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.step()
    torch.cuda.synchronize()
    return eng.stats["tokens"] - before, (time.perf_counter() - t0) * 1e3


def _profiled(ex: Executor, n_steps: int) -> tuple[list[tuple[int, float]], float, list[dict]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        steps = [_step(ex) for _ in range(n_steps)]
    kernels_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    host = sorted(({"op": e.key[:80], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                   for e in prof.key_averages() if e.device_type.name == "CPU"), key=lambda r: -r["self_cpu_ms"])
    return steps, kernels_us / 1e3, host[:25]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--decodes", type=int, default=16, help="running decodes beside each chunk")
    p.add_argument("--prompt", type=int, default=1024, help="tokens of each arriving prompt")
    p.add_argument("--chunk", type=int, default=512, help="prefill_chunk_tokens")
    p.add_argument("--rounds", type=int, default=4, help="arriving prompts (the last one profiled)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_mixed.py needs a CUDA GPU", file=sys.stderr)
        return 2
    per_round = -(-a.prompt // a.chunk) + 2
    new = 16 + a.rounds * per_round + 8
    ex = _executor(a.model, a.decodes, a.prompt, a.chunk, a.rounds, new)
    g = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(1000, 100000, (n,), generator=g).tolist()

    ex.enqueue_requests([Request(prompt(64), max_tokens=new, ignore_eos=True) for _ in range(a.decodes)])
    steps = [_step(ex) for _ in range(12)]   # the short prompts' prefill, then decodes (graphs warm up)
    for r in range(a.rounds - 1):
        ex.enqueue_request(Request(prompt(a.prompt), max_tokens=1, ignore_eos=True))
        steps += [_step(ex) for _ in range(per_round)]
    ex.enqueue_request(Request(prompt(a.prompt), max_tokens=1, ignore_eos=True))
    prof_steps, kernels_ms, host = _profiled(ex, per_round)
    mixed = [ms for n, ms in steps[12:] if n > a.decodes]
    decode = [ms for n, ms in steps[6:] if n == a.decodes]
    prof_mixed = [ms for n, ms in prof_steps if n > a.decodes]
    res = {"gpu": torch.cuda.get_device_name(), "model": a.model, "decodes": a.decodes, "prompt": a.prompt,
           "chunk": a.chunk, "decode_ms": decode, "mixed_ms": mixed, "profiled_steps": prof_steps,
           "profiled_kernels_ms": kernels_ms, "host_ops": host}
    print(f"decode-only steps: median {statistics.median(decode):.1f} ms ({len(decode)}); mixed steps "
          f"({a.chunk} + {a.decodes}): median {statistics.median(mixed):.1f} ms, {[round(m, 1) for m in mixed]}")
    print(f"profiled round: steps {[(n, round(ms, 1)) for n, ms in prof_steps]}, "
          f"{sum(ms for _, ms in prof_steps):.1f} ms wall, {kernels_ms:.1f} ms of kernels "
          f"(mixed steps {sum(prof_mixed):.1f} ms wall under the profiler)")
    for h in host:
        print(f"host {h['self_cpu_ms']:8.1f} ms {h['calls']:6d}x  {h['op']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Throughput of this engine (in-process Executor) vs transformers `generate`, in one run.

Both run the same prompts (random token ids, fixed seed) on the same weights:
the transformers model of the family (LlamaForCausalLM, Qwen3MoeForCausalLM, ...)
is built from our ModelConfig (`to_hf_dict`) and shares our model's tensors
(MoE experts included: both store them stacked under the same names), so nothing
is loaded twice and the weights are identical by construction. EOS is ignored on
both sides, so every request makes exactly `--new-tokens` tokens.

CPU defaults (a few minutes on 2 cores):
    python scripts/bench_engine.py                       # smollm2, fp32, batch 1 and 8
GPU:
    python scripts/bench_engine.py --device cuda         # random:llama-3.1-8b, bf16, batch 1 and 64
    python scripts/bench_engine.py --device cuda --model random:qwen3-30b-a3b --batches 1,64   # MoE, ~61 GB

Reported per batch size and engine: end-to-end output tokens/s (prefill included),
the decode step time (from a run with 1 new token subtracted), and the ratio
engine / transformers. On a GPU also the memory-bandwidth roofline fraction of a
decode step: (weight bytes + KV bytes read per step) / measured device copy
bandwidth, divided by the measured step time. For an MoE model the weight bytes
count only the experts a step reads: per MoE layer, the distinct experts the batch's
tokens picked (top-k at batch 1), measured from the routing of an eager decode run of
the same prompts (`active_experts`; the uniform-routing expectation E(1-(1-k/E)^b)
is printed beside it). `--compare-overlap` also times the
engine with overlapped decode off (engine/overlap.py) on the same prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request
from disagg_mpi.engine.executor import Executor
from disagg_mpi.model import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default=None, help="model spec (default: smollm2 on CPU, random:llama-3.1-8b on GPU)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,8 on CPU, 1,64 on GPU)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (the best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-hf", action="store_true", help="time this engine only")
    p.add_argument("--compare-overlap", action="store_true",
                   help="also time the engine with overlapped decode off (DISAGG_OVERLAP_DECODE=0), same run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")
    a.model = a.model or ("random:llama-3.1-8b" if gpu else "smollm2")
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    a.batches = [int(b) for b in (a.batches or ("1,64" if gpu else "1,8")).split(",")]
    return a


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_prompts(vocab, n, length, seed):
    g = torch.Generator().manual_seed(seed)
    # Stay clear of the low ids, where the special tokens usually live.
    lo = min(1000, vocab // 4)
    return [torch.randint(lo, vocab, (length,), generator=g).tolist() for _ in range(n)]


# ---- this engine -----------------------------------------------------------------------


def make_executor(model, args, device, batch, overlap=True):
    """One long-lived executor per batch size (as a server has): warm-up and timed runs share it,
    so one-time work (CUDA graph capture, Triton compiles) happens in the warm-up."""
    bs = args.block_size
    per_seq = -(-(args.prompt_len + args.new_tokens) // bs)
    cfg = ExecutorConfig(max_batch_size=batch,
                         max_num_tokens=max(batch * args.prompt_len, 512),
                         kv_cache_config=KvCacheConfig(block_size=bs, num_blocks=per_seq * batch + 1),
                         dtype=args.dtype, device=str(device))
    saved = os.environ.get("DISAGG_OVERLAP_DECODE")
    if not overlap:
        os.environ["DISAGG_OVERLAP_DECODE"] = "0"   # read when the runner is built
    try:
        return Executor(model, cfg)
    finally:
        if saved is None:
            os.environ.pop("DISAGG_OVERLAP_DECODE", None)
        else:
            os.environ["DISAGG_OVERLAP_DECODE"] = saved


def engine_run(ex, device, prompts, new_tokens):
    reqs = [Request(list(p), max_tokens=new_tokens, ignore_eos=True) for p in prompts]
    sync(device)
    t0 = time.perf_counter()
    resps = ex.generate(reqs)
    sync(device)
    dt = time.perf_counter() - t0
    for r in resps:
        if r.has_error():
            raise RuntimeError(r.error_msg)
        assert len(r.result.output_token_ids) == new_tokens
    ex.check_blocks_free()
    return dt, [r.result.output_token_ids for r in resps]


# ---- transformers --------------------------------------------------------------------------


class SharingError(RuntimeError):
    """transformers' model of this family does not take our tensors as they are."""


def build_hf(model, dtype):
    """The family's transformers causal LM sharing our model's weights (no copy)."""
    import transformers

    cfg = model.config
    d = cfg.to_hf_dict()
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if unexpected or missing:
        raise SharingError(f"state dict mismatch with transformers {transformers.__version__} "
                           f"{type(hf).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # Buffers (rotary inv_freq) were created on meta: rebuild them on the model's device.
    dev = next(model.parameters()).device
    for mod in hf.modules():
        if hasattr(mod, "inv_freq") and mod.inv_freq.is_meta:
            with torch.device(dev):
                fresh = type(mod)(config=hf_cfg)
            mod.inv_freq = fresh.inv_freq
            if isinstance(getattr(mod, "original_inv_freq", None), torch.Tensor):
                mod.original_inv_freq = fresh.original_inv_freq
    leftovers = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if leftovers:
        raise SharingError(f"transformers model has tensors left on meta: {leftovers[:5]}")
    hf.eval()
    hf.generation_config.eos_token_id = None  # ignore EOS (do not stop at it)
    return hf


def hf_run(hf, device, prompts, new_tokens, pad_id=0):
    # Left padding (all prompts have the same length here, so it is a no-op but kept general).
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=pad_id)
    sync(device)
    dt = time.perf_counter() - t0
    assert out.shape[1] == width + new_tokens
    return dt, out[:, width:].tolist()


# ---- roofline --------------------------------------------------------------------------------


def copy_bandwidth(device, nbytes=1 << 30, reps=10):
    """Device memory bandwidth from a large copy: bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / best


def decode_step_bytes(model, batch, context, dtype, active_experts=None):
    """Bytes a decode step must read: every weight once (embedding rows aside; of an MoE layer's
    experts only the `active_experts` the step's tokens picked) plus each sequence's KV."""
    cfg = model.config
    elt = torch.empty(0, dtype=dtype).element_size()
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    if not cfg.tie_word_embeddings:
        params -= cfg.vocab_size * cfg.hidden_size  # only `batch` rows of the embedding are read
    if cfg.num_experts:
        moe_layers = [layer.mlp for layer in model.model.layers.values() if hasattr(layer.mlp, "experts")]
        ex = moe_layers[0].experts
        per_expert = ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()
        held = ex.gate_up_proj.shape[0]
        active = min(held, active_experts if active_experts is not None else held)
        params -= len(moe_layers) * (held - active) * per_expert
    kv = batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim
    return (params + kv) * elt


def moe_routing(model, args, device, prompts):
    """The row's MoE fields: measured and uniform-routing distinct experts per layer and step."""
    cfg = model.config
    active = measure_active_experts(model, args, device, prompts, min(args.new_tokens, 16))
    uniform = expected_active_experts(cfg.num_experts, cfg.num_experts_per_tok, len(prompts))
    print(f"  MoE: {active:.1f} of {cfg.num_experts} experts per layer per decode step "
          f"(uniform routing: {uniform:.1f})", flush=True)
    return {"active_experts": active, "active_experts_uniform": uniform}


def expected_active_experts(num_experts, top_k, batch):
    """Distinct experts hit by `batch` tokens picking top_k each, under uniform routing."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def measure_active_experts(model, args, device, prompts, new_tokens):
    """Mean distinct experts per MoE layer per decode step, from the routing of an eager run of
    `prompts` (CUDA graphs off: the router hooks must run). A decode step routes one token per
    sequence; the prefill step (prompt_len tokens per sequence) is left out."""
    batch, k, seen = len(prompts), model.config.num_experts_per_tok, []

    def hook(mod, inp, logits):
        if logits.shape[0] == batch:
            seen.append(torch.topk(logits, k, dim=-1).indices.unique().numel())

    gates = [layer.mlp.gate for layer in model.model.layers.values() if hasattr(layer.mlp, "experts")]
    handles = [g.register_forward_hook(hook) for g in gates]
    saved = os.environ.get("DISAGG_CUDA_GRAPHS")
    os.environ["DISAGG_CUDA_GRAPHS"] = "0"   # read when the runner is built
    try:
        engine_run(make_executor(model, args, device, batch), device, prompts, new_tokens)
    finally:
        for h in handles:
            h.remove()
        if saved is None:
            os.environ.pop("DISAGG_CUDA_GRAPHS", None)
        else:
            os.environ["DISAGG_CUDA_GRAPHS"] = saved
    return statistics.mean(seen) if seen else None


# ---- main ------------------------------------------------------------------------------------


def paired_runs(run, n, repeats):
    """Runs of n tokens and of 1 token, in turn (each pair sees the same machine state).

    Returns ((seconds, tokens) of the fastest n-token run, the fastest 1-token time,
    every n-token time, every 1-token time)."""
    fulls, prefills, best = [], [], None
    for _ in range(repeats):
        t, toks = run(n)
        fulls.append(t)
        if best is None or t < best[0]:
            best = (t, toks)
        prefills.append(run(1)[0])
    return best, min(prefills), fulls, prefills


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    print(f"loading {args.model} ({args.dtype}) on {device} ...", flush=True)
    t0 = time.perf_counter()
    model = load_model(args.model, dtype=dtype, device=device)
    print(f"  loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    hf, hf_note = None, None
    if not args.skip_hf:
        try:
            hf = build_hf(model, dtype)
        except SharingError as e:   # never a second copy of the weights (an MoE 30B fills the GPU)
            hf_note = f"transformers skipped: it cannot share this model's weights ({e})"
            print(hf_note, flush=True)
    vocab = model.config.vocab_size
    results = {"model": args.model, "dtype": args.dtype, "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(),
               "torch_threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "block_size": args.block_size,
               "cuda_graphs_env": os.environ.get("DISAGG_CUDA_GRAPHS", "1"), "runs": []}
    if hf is not None:
        import transformers
        results["transformers"] = transformers.__version__
        results["transformers_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
    if hf_note:
        results["transformers_skipped"] = hf_note
    bw = None
    if device.type == "cuda":
        bw = copy_bandwidth(device)
        results["copy_bandwidth_GBps"] = bw / 1e9
        print(f"device copy bandwidth: {bw / 1e9:.0f} GB/s", flush=True)

    n = args.new_tokens
    for batch in args.batches:
        prompts = make_prompts(vocab, batch, args.prompt_len, args.seed + batch)
        warm = prompts[: max(1, batch)]
        row = {"batch": batch}
        if model.config.num_experts:   # before the timed executor: an eager runner turns the fast path off
            row.update(moe_routing(model, args, device, prompts))
        print(f"\nbatch {batch}: warming up ...", flush=True)
        ex = make_executor(model, args, device, batch)
        row["engine_cuda_graphs"] = ex._runner.graphs is not None
        engine_run(ex, device, warm, 4)
        if hf is not None:
            hf_run(hf, device, warm, 4)
        engines = [("engine", lambda k, ps=prompts, ex=ex: engine_run(ex, device, ps, k))]
        ex_sync = None
        if args.compare_overlap:
            ex_sync = make_executor(model, args, device, batch, overlap=False)
            engine_run(ex_sync, device, warm, 4)
            engines.append(("engine-sync", lambda k, ps=prompts, ex=ex_sync: engine_run(ex, device, ps, k)))
        if hf is not None:
            engines.append(("transformers", lambda k, ps=prompts: hf_run(hf, device, ps, k)))
        outputs = {}
        for name, run in engines:
            (t_full, toks), t_prefill, fulls, prefills = paired_runs(run, n, args.repeats)
            outputs[name] = toks
            step = (t_full - t_prefill) / max(1, n - 1)
            r = {"seconds": t_full, "tokens_per_s": batch * n / t_full, "prefill_s": t_prefill,
                 "decode_step_ms": step * 1e3, "decode_tokens_per_s": batch / step if step > 0 else None}
            if args.repeats > 1:  # the spread: the best run is reported above, the median here
                med = statistics.median(f - p for f, p in zip(fulls, prefills)) / max(1, n - 1)
                r.update(runs_s=fulls, prefill_runs_s=prefills, median_decode_step_ms=med * 1e3,
                         median_decode_tokens_per_s=batch / med if med > 0 else None)
            if bw is not None and step > 0:
                ctx = args.prompt_len + n / 2  # mean context over the decode steps
                nbytes = decode_step_bytes(model, batch, ctx, dtype, row.get("active_experts"))
                r["decode_step_bytes"] = nbytes
                r["roofline_fraction"] = (nbytes / bw) / step
            row[name] = r
            extra = f", roofline {r['roofline_fraction']:.0%}" if "roofline_fraction" in r else ""
            print(f"  {name:>12}: {r['tokens_per_s']:8.1f} tok/s end-to-end ({t_full:.2f}s), "
                  f"decode step {r['decode_step_ms']:.1f} ms{extra}", flush=True)
        if "engine-sync" in row:
            a, b = row["engine"], row["engine-sync"]
            row["overlap_speedup"] = {"end_to_end": a["tokens_per_s"] / b["tokens_per_s"],
                                      "decode": (a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                                                 if a["decode_tokens_per_s"] and b["decode_tokens_per_s"] else None)}
            if "median_decode_tokens_per_s" in a:
                row["overlap_speedup"]["median_decode"] = (a["median_decode_tokens_per_s"]
                                                           / b["median_decode_tokens_per_s"])
            assert outputs["engine"] == outputs["engine-sync"], "overlapped decode changed the tokens"
            print(f"  overlapped / synchronous decode: {row['overlap_speedup']}", flush=True)
        if hf is not None:
            row["ratio"] = row["engine"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
            if row["engine"]["decode_tokens_per_s"] and row["transformers"]["decode_tokens_per_s"]:
                row["decode_ratio"] = (row["engine"]["decode_tokens_per_s"]
                                       / row["transformers"]["decode_tokens_per_s"])
            same = sum(a == b for x, y in zip(outputs["engine"], outputs["transformers"]) for a, b in zip(x, y))
            row["token_agreement"] = same / (batch * n)  # greedy; bf16 drifts apart, fp32 should be ~1
            print(f"  ratio engine/transformers: {row['ratio']:.2f}x end-to-end, "
                  f"{row.get('decode_ratio', float('nan')):.2f}x decode; "
                  f"greedy token agreement {row['token_agreement']:.0%}", flush=True)
        results["runs"].append(row)
        del ex, ex_sync, engines

    print("\nsummary (output tokens/s, end-to-end):")
    for row in results["runs"]:
        hf_tps = row.get("transformers", {}).get("tokens_per_s")
        print(f"  batch {row['batch']:>3}: engine {row['engine']['tokens_per_s']:8.1f}"
              + (f"  transformers {hf_tps:8.1f}  ratio {row['ratio']:.2f}x" if hf_tps else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Weight-only int8/int4 on CPU (model.quantization) against full precision, in one run.

Speed: decode tokens/s of the in-process Executor at each batch size, for every variant, the
variants interleaved in each repeat (the machine may be shared: the ratio to fp32 measured in the
same run is the figure to quote, not the absolute tokens/s). The decode step time is taken from a
run of `--new-tokens` tokens minus a run of 1 token (the prefill), as bench_engine.py does.

Accuracy, on a few English prompts (tokenized, no chat template), against the fp32 model:
- free-running greedy agreement: the share of generated positions whose token equals fp32's;
- teacher-forced: the fp32 greedy continuation is fed to both models in one prefill; top-1 agreement
  at each generated position, and |logprob gap| of the fp32 token (mean and max) between the two.

    python scripts/bench_quant.py --threads 1         # smollm2; writes docs/bench/cpu/quant_smollm2.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request
from disagg_mpi.engine.executor import Executor
from disagg_mpi.model import load_model
from disagg_mpi.model.context import AttentionMetadata, forward_context
from disagg_mpi.model.tokenizer import load_tokenizer
from scripts.bench_engine import make_prompts

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which plants",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "The three laws of thermodynamics state that",
    "To make a cup of tea, first",
]
# name -> (model.quantization, quantize the lm_head, dtype). bf16 is a yardstick: how far plain
# half precision lands from fp32 on the same prompts.
VARIANTS = {"fp32": ("none", False, "float32"), "bf16": ("none", False, "bfloat16"),
            "int8": ("int8", True, "float32"), "int8-fp32-head": ("int8", False, "float32"),
            "int4": ("int4", True, "float32"), "int4-fp32-head": ("int4", False, "float32")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=32, help="greedy tokens per accuracy prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant and batch (the best is kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default="docs/bench/cpu/quant_smollm2.json")
    a = p.parse_args(argv)
    a.variants = a.variants.split(",")
    if a.variants[0] != "fp32" or any(v not in VARIANTS for v in a.variants):
        p.error(f"--variants must start with fp32 (the reference) and use names from {list(VARIANTS)}")
    a.batches = [int(b) for b in a.batches.split(",")]
    return a


def executor(model, batch: int, prompt_len: int, new_tokens: int) -> Executor:
    per_seq = -(-(prompt_len + new_tokens) // 16)
    cfg = ExecutorConfig(max_batch_size=batch, max_num_tokens=max(batch * prompt_len, 512),
                         kv_cache_config=KvCacheConfig(block_size=16, num_blocks=per_seq * batch + 1),
                         dtype=str(model.dtype).removeprefix("torch."))
    return Executor(model, cfg)


def generate(ex: Executor, prompts: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    resps = ex.generate([Request(list(p), max_tokens=n, ignore_eos=True) for p in prompts])
    dt = time.perf_counter() - t0
    for r in resps:
        if r.has_error():
            raise RuntimeError(r.error_msg)
    return dt, [r.result.output_token_ids for r in resps]


def sequence_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of every position's next-token logits, the whole sequence in one prefill [n, V]."""
    n, bs = len(ids), 16
    pool = model.allocate_kv_pool(-(-n // bs), bs)
    meta = AttentionMetadata(torch.arange(n), [0, n], [n], torch.arange(-(-n // bs))[None], bs)
    with forward_context(meta):
        return torch.log_softmax(model.compute_logits(model(torch.tensor(ids), torch.arange(n), pool)).float(), -1)


def accuracy(model, ref_model, prompts, ref_tokens, tokens) -> dict:
    same = [a == b for got, ref in zip(tokens, ref_tokens) for a, b in zip(got, ref)]
    top1, gaps = [], []
    for p, ref in zip(prompts, ref_tokens):
        seq = p + ref
        lp, ref_lp = sequence_logprobs(model, seq), sequence_logprobs(ref_model, seq)
        rows = torch.arange(len(p) - 1, len(seq) - 1)      # the positions that predict ref's tokens
        target = torch.tensor(ref)
        top1 += (lp[rows].argmax(-1) == target).tolist()
        gaps += (lp[rows, target] - ref_lp[rows, target]).abs().tolist()
    return {"greedy_agreement": sum(same) / len(same), "teacher_forced_top1_agreement": sum(top1) / len(top1),
            "logprob_gap_mean": sum(gaps) / len(gaps), "logprob_gap_max": max(gaps)}


def speed(models: dict, args, vocab: int) -> list[dict]:
    rows = []
    for batch in args.batches:
        prompts = make_prompts(vocab, batch, args.prompt_len, batch)
        exs = {v: executor(m, batch, args.prompt_len, args.new_tokens) for v, m in models.items()}
        for ex in exs.values():
            generate(ex, prompts, 2)                          # warm-up
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            for v, ex in exs.items():                         # interleaved: each sees the same load
                full = generate(ex, prompts, args.new_tokens)[0]
                one = generate(ex, prompts, 1)[0]
                f, o = best.get(v, (full, one))
                best[v] = (min(f, full), min(o, one))
        ref_step = None
        for v, (full, one) in best.items():
            step = max(full - one, 1e-9) / (args.new_tokens - 1)
            ref_step = ref_step or step
            rows.append({"variant": v, "batch": batch, "decode_step_ms": step * 1e3,
                         "decode_tokens_per_s": batch / step, "speedup_vs_fp32": ref_step / step})
            print(f"batch {batch:2d} {v:15s} decode {batch / step:7.1f} tok/s  step {step * 1e3:6.1f} ms  "
                  f"x{ref_step / step:.2f} vs fp32", flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    eval_prompts = [tok.encode(t) for t in PROMPTS]
    models, acc = {}, {}
    for v in args.variants:
        mode, head, dtype = VARIANTS[v]
        t0 = time.perf_counter()
        models[v] = load_model(args.model, dtype=getattr(torch, dtype), quantization=mode, quantize_lm_head=head)
        print(f"loaded {v} in {time.perf_counter() - t0:.1f}s", flush=True)
    ref = models["fp32"]
    ref_tokens = generate(executor(ref, len(PROMPTS), 32, args.eval_tokens), eval_prompts, args.eval_tokens)[1]
    for v in args.variants[1:]:
        ex = executor(models[v], len(PROMPTS), 32, args.eval_tokens)
        acc[v] = accuracy(models[v], ref, eval_prompts, ref_tokens, generate(ex, eval_prompts, args.eval_tokens)[1])
        print(f"{v:15s} " + "  ".join(f"{k} {x:.4f}" for k, x in acc[v].items()), flush=True)
    weight_mb = {v: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()]) / 2**20
                 for v, m in models.items()}   # tied tensors counted once (parameters() dedups)
    print("weights MiB: " + ", ".join(f"{v} {mb:.0f}" for v, mb in weight_mb.items()), flush=True)
    rows = speed(models, args, ref.config.vocab_size)
    out = {"model": args.model, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "repeats": args.repeats, "eval_prompts": PROMPTS, "eval_tokens": args.eval_tokens,
           "note": "shared, loaded 2-core machine: quote the speedup_vs_fp32 ratios, not absolute tokens/s",
           "weights_MiB": weight_mb, "accuracy_vs_fp32": acc, "speed": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

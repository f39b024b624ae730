#!/usr/bin/env python
"""The cost of guided decoding (response_format JSON schema) and of logprobs, as ratios to plain
decoding in the same run.

One in-process Executor (SmolLM2-135M-Instruct in fp32 on CPU by default) decodes a batch of chat
requests three times per round: plain, with `--logprobs` top alternatives per token, and with a JSON
schema, `--rounds` times alternating (so all see the same machine load); ignore_eos keeps every
request at max_tokens, so all runs do the same steps (after the JSON closes, the mask allows only
EOS, which is still computed and applied every step). It also replays the guided outputs through
fresh matchers to time the mask computation alone (the leader's work per guided row and step)
beside the step time.

    python scripts/bench_grammar.py --json grammar.json
    python scripts/bench_grammar.py --device cuda --model random:llama-3.1-8b --tokenizer smollm2 \
        --batch 16 --max-tokens 128 --json grammar_gpu.json     # the issue's GPU figure (8B shape)

`--tokenizer` gives the prompts and the grammar another tokenizer than the model's: a random preset's
own is bytes-only (259 tokens), which would make the grammar's work unrealistically small; the
SmolLM2 BPE vocabulary (49,152 tokens) runs inside the 8B shape's 128,256 logits (ids past it are
never allowed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from disagg_mpi.api import ExecutorConfig, GuidedDecodingParams, OutputConfig, Request, SamplingConfig
from disagg_mpi.engine.executor import Executor
from disagg_mpi.engine.grammar import Grammars
from disagg_mpi.engine.grammar_masks import apply_masks, fill_masks
from disagg_mpi.model.tokenizer import load_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}, "hobbies": {"type": "array",
                                                                                   "items": {"type": "string"},
                                                                                   "maxItems": 3}},
          "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
PEOPLE = ["Alice, 30, from Paris", "Bob, 41, from Berlin", "Chen, 25, from Shanghai", "Dana, 35, from Austin",
          "Emeka, 52, from Lagos", "Farah, 28, from Cairo", "Goran, 60, from Zagreb", "Hana, 19, from Kyoto"]


def _requests(tok, n: int, max_tokens: int, guided: GuidedDecodingParams | None,
              logprobs: int = 0) -> list[Request]:
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Describe {PEOPLE[i % len(PEOPLE)]}, and their hobbies, as JSON."}]
        extra = {"output_config": OutputConfig(return_log_probs=True), "num_logprobs": logprobs} if logprobs else {}
        out.append(Request(tok.encode(tok.apply_chat_template(msgs)), max_tokens, SamplingConfig(),
                           ignore_eos=True, guided_decoding=guided, **extra))
    return out


def _timed(ex: Executor, reqs: list[Request]) -> tuple[float, float, list[list[int]]]:
    """(wall s, this process's CPU s, outputs): CPU time moves far less than wall time when other jobs
    share the cores (wall times of the same run varied 20x on the shared 2-core machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    before = dict(ex._runner.overlap_stats)
    resps = ex.generate(reqs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for k, v in ex._runner.overlap_stats.items():   # decode steps run ahead of the host (overlap.py)
        OVERLAP.setdefault(_kind(reqs), {}).setdefault(k, 0)
        OVERLAP[_kind(reqs)][k] += v - before[k]
    return wall, cpu, [list(r.result.output_token_ids) for r in resps]


OVERLAP: dict[str, dict[str, int]] = {}   # per kind of run: steps launched ahead, used, dropped


def _kind(reqs: list[Request]) -> str:
    r = reqs[0]
    return "guided" if r.guided_decoding is not None else "logprobs" if r.output_config.return_log_probs else "plain"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokenizer", default=None, help="tokenizer spec of the prompts and the grammar "
                    "(default: the model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--logprobs", type=int, default=5, help="top alternatives of the logprobs runs (0: none)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.tokenizer or args.model)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    ex = Executor(args.model, ExecutorConfig(dtype=dtype, device=args.device, max_batch_size=max(8, args.batch)))
    vocab = ex.model.config.vocab_size
    if args.tokenizer:   # the grammar reads the prompts' tokenizer (ids past it: never allowed)
        ex._engine.grammars = Grammars(lambda: tok, vocab)
    guided = GuidedDecodingParams("json_schema", json.dumps(SCHEMA))
    _timed(ex, _requests(tok, args.batch, 4, guided, args.logprobs))  # warm-up: tokenizer build, caches
    _timed(ex, _requests(tok, args.batch, 4, None))
    plain_s, guided_s, lp_s, plain_cpu, guided_cpu, outputs = [], [], [], [], [], []
    for _ in range(args.rounds):
        w, c, _ = _timed(ex, _requests(tok, args.batch, args.max_tokens, None))
        plain_s.append(round(w, 3))
        plain_cpu.append(round(c, 3))
        if args.logprobs:
            w, _, _ = _timed(ex, _requests(tok, args.batch, args.max_tokens, None, args.logprobs))
            lp_s.append(round(w, 3))
        w, c, outputs = _timed(ex, _requests(tok, args.batch, args.max_tokens, guided))
        guided_s.append(round(w, 3))
        guided_cpu.append(round(c, 3))
    valid = 0
    for out in outputs:
        try:
            json.loads(tok.decode(out))
            valid += 1
        except json.JSONDecodeError:
            pass

    # The mask computation alone, replayed: each fresh matcher brought up to each output prefix.
    grammars = Grammars(lambda: tok, vocab)
    states = [grammars.state(guided) for _ in outputs]
    t0 = time.perf_counter()
    for pos in range(args.max_tokens):
        fill_masks(states, [o[:pos] for o in outputs], vocab)
    mask_us = (time.perf_counter() - t0) / (args.max_tokens * len(outputs)) * 1e6
    # ... and its application on the sampling rank: a [batch, vocab] logits block, every row masked.
    masks = fill_masks(states, outputs, vocab)
    logits = torch.randn(len(outputs), vocab, device=args.device)
    t0 = time.perf_counter()
    for _ in range(50):
        apply_masks(logits, list(range(len(outputs))), masks)
    apply_ms = (time.perf_counter() - t0) / 50 * 1e3

    tokens = args.batch * args.max_tokens
    # The fastest round of each: the one least disturbed by other jobs on the machine.
    plain, guid = min(plain_s), min(guided_s)
    res = {"model": args.model, "tokenizer": args.tokenizer or args.model, "device": args.device, "dtype": dtype,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "batch": args.batch, "max_tokens": args.max_tokens, "rounds": args.rounds,
           "plain_tok_s": round(tokens / plain, 1), "guided_tok_s": round(tokens / guid, 1),
           "guided_over_plain": round(plain / guid, 3),
           "logprobs": args.logprobs, "logprobs_s": lp_s,
           "logprobs_over_plain": round(plain / min(lp_s), 3) if lp_s else None,
           "guided_over_plain_cpu_time": round(statistics.median(plain_cpu) / statistics.median(guided_cpu), 3),
           "plain_s": plain_s, "guided_s": guided_s, "plain_cpu_s": plain_cpu, "guided_cpu_s": guided_cpu,
           "mask_us_per_row_step": round(mask_us, 1), "apply_ms_per_step": round(apply_ms, 2),
           "plain_step_ms": round(plain / args.max_tokens * 1e3, 1),
           # the grammar's own work per step over the fastest plain step: what it adds at this batch
           "grammar_work_over_step": round((mask_us * args.batch / 1e3 + apply_ms) / (plain / args.max_tokens * 1e3), 4),
           "torch_threads": torch.get_num_threads(), "overlap": OVERLAP,
           "guided_outputs_parsing": f"{valid}/{len(outputs)}", "sample_output": tok.decode(outputs[0])}
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Run every kind of step once before the executor says it is ready (`DISAGG_WARM_UP`).

A fresh GPU executor pays for many things on the first step of each kind: kernel compiles
(Triton), library initialisation and plans (cuBLAS, attention backends), the caching allocator
growing to its peak. Paid while serving, each stalls every running request for that step; a
fresh 8B server logged a 1.2 s first prefill and 0.5 s mixed steps (docs/benchmarks.md). Paid
here, nobody waits: the leader sends Ready after it.

The warm-up requests go through the engine like any other (the executor's other ranks follow
its steps), with ids no client can have, and leave nothing behind: their responses are dropped,
their blocks freed, the step counters reset. The schedule (`warm_up_plan`) reaches each kind
of step the scheduler can make:
- a prefill alone, as long as one step may hold (`max_num_tokens`, the allocator's peak);
- mixed steps: a prefill beside one decode, beside several, two prefills of unequal lengths in
  one padded call;
- a chunked prefill's continuation, when a prompt can be longer than one step;
- decode-only steps (CUDA graphs are captured before this);
- the sampler's paths: greedy, temperature with top-k / top-p / min-p, penalties, log probs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..api import OutputConfig, Request, SamplingConfig
from ..knobs import env_value

log = logging.getLogger(__name__)

WARM_UP_IDS = -1  # request ids count down from here: rank 0 gives clients positive ones
NEW_TOKENS = 4


@dataclass(frozen=True)
class WarmUpRequest:
    step: int        # the engine step before which it is added (0: the first)
    prompt_len: int
    sampling: SamplingConfig
    logprobs: bool = False


def enabled(device_type: str) -> bool:
    """`DISAGG_WARM_UP`: auto warms GPU executors only (on a CPU nothing compiles)."""
    mode = env_value("DISAGG_WARM_UP")
    return mode == "on" or (mode == "auto" and device_type == "cuda")


def warm_up_plan(max_num_tokens: int, max_batch_size: int, capacity_tokens: int,
                 max_context: int) -> list[WarmUpRequest]:
    """The warm-up requests, each added before an engine step, for an executor whose steps hold
    `max_num_tokens`, whose pool holds `capacity_tokens` and whose model `max_context` tokens."""
    room = min(capacity_tokens // 2, max_context) - NEW_TOKENS   # leave room for the others
    longest = max(1, min(max_num_tokens - 1, room))
    greedy = SamplingConfig()
    sampled = SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, seed=1)
    penalised = SamplingConfig(temperature=0.7, seed=2, presence_penalty=0.5, frequency_penalty=0.5,
                               repetition_penalty=1.1)
    plan = [WarmUpRequest(0, longest, greedy),                        # the largest prefill
            WarmUpRequest(1, 17, sampled, logprobs=True),             # + one decode
            WarmUpRequest(2, 33, penalised)]                          # + two decodes (batched)
    if max_batch_size >= 5:
        plan += [WarmUpRequest(3, 9, greedy), WarmUpRequest(3, 24, sampled)]   # unequal pair
    used = sum(r.prompt_len + NEW_TOKENS for r in plan)
    chunked = max_num_tokens + 40
    if chunked + NEW_TOKENS <= min(max_context, capacity_tokens - used) and max_batch_size > len(plan):
        plan.append(WarmUpRequest(len(plan) + 1, chunked, greedy))    # prefilled in two steps
    return plan


def prompt(n: int, vocab: int, salt: int) -> list[int]:
    """Spread-out token ids (no special meaning, no shared prefix between requests)."""
    return [(salt * 7919 + i * 104729) % (vocab - 1) + 1 for i in range(n)]


def warm_up(engine, max_context: int) -> dict:
    """Run `warm_up_plan` through `engine` (an LLMEngine); returns what ran."""
    cfg = engine.config
    bm = engine.blocks
    plan = warm_up_plan(cfg.max_num_tokens, cfg.max_batch_size, bm.num_blocks * bm.block_size, max_context)
    vocab = engine.model_config.vocab_size
    t0 = time.perf_counter()
    steps = 0
    pending = sorted(plan, key=lambda r: r.step)
    ids = []
    while pending or engine.busy:
        while pending and pending[0].step <= steps:
            r = pending.pop(0)
            rid = WARM_UP_IDS - len(ids)
            ids.append(rid)
            engine.add_request(rid, Request(prompt(r.prompt_len, vocab, -rid), NEW_TOKENS, r.sampling,
                                            ignore_eos=True, output_config=OutputConfig(r.logprobs),
                                            num_logprobs=2 if r.logprobs else 0))
        engine.step()
        steps += 1
        if steps > 10 * (len(plan) + NEW_TOKENS + 4):
            raise RuntimeError("warm-up: the engine did not finish its requests")
    errors = [r.error_msg for r in engine.take_responses() if r.error_msg]
    if errors:
        raise RuntimeError(f"warm-up request failed: {errors[0]}")
    engine.stats.update(iterations=0, tokens=0)
    seconds = time.perf_counter() - t0
    return {"requests": len(plan), "steps": steps, "seconds": round(seconds, 3),
            "longest_prompt": max(r.prompt_len for r in plan)}

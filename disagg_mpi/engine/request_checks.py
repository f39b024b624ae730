"""Admission checks of one executor: a `Request` becomes a `Sequence`, or a RequestError that names
the field, the value and what is allowed (engine/llm_engine.py: `LLMEngine.add_request`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
from typing import Any

from ..api import DISAGG_NOT_ENABLED, Request, RequestError, RequestType, SamplingConfig, as_int
from . import benchmark
from .logprobs import NOT_ASKED, logprobs_k, prompt_logprobs_k
from .sequence import SamplingParams, Sequence

_as_int = as_int


def make_sequence(req_id: int, r: Request, model_config: Any, eos: set[int], transceiver_enabled: bool,
                  seed_rng: random.Random) -> Sequence:
    """The executor's `Sequence` for request `r`, or RequestError naming the field that is wrong
    and what is allowed (nothing reaches a batch that could fail it). The caller attaches the
    grammar state of guided decoding (`Grammars.state`)."""
    rt = r.request_type
    if rt != RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION and not transceiver_enabled:
        raise RequestError(DISAGG_NOT_ENABLED)
    if not isinstance(r.sampling_config, SamplingConfig):
        raise RequestError(f"sampling_config must be a SamplingConfig, got {type(r.sampling_config).__name__}",
                           "sampling_config")
    sc = r.sampling_config
    for name in ("temperature", "top_p"):
        v = getattr(sc, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isinf(v):
            raise RequestError(f"{name}={v!r} must be a finite number", f"sampling_config.{name}")
    sc.validate()
    benchmark.check_request(r)
    ids = r.input_token_ids
    if ids is None or (isinstance(ids, (list, tuple)) and not ids):
        raise RequestError("the prompt is empty; send at least one token", "input_token_ids")
    if not isinstance(ids, (list, tuple)):
        raise RequestError(f"input_token_ids must be a list of token ids, got {type(ids).__name__}",
                           "input_token_ids")
    vocab = model_config.vocab_size
    ids = [_as_int(t) for t in ids]  # numpy / torch integers are fine; bool, float, str are not
    bad = [t for t in ids if t is None or not 0 <= t < vocab]
    if bad:
        shown = [t for t, i in zip(r.input_token_ids, ids) if i is None or not 0 <= i < vocab][:5]
        raise RequestError(f"token ids {shown} are outside the vocabulary [0, {vocab})", "input_token_ids")
    full_max_tokens = _as_int(r.max_tokens)
    if full_max_tokens is None or full_max_tokens < 1:
        raise RequestError(f"max_tokens={r.max_tokens!r} must be an integer >= 1", "max_tokens")
    stop = r.stop_token_ids if r.stop_token_ids is not None else []
    stop_ids = [_as_int(t) for t in stop] if isinstance(stop, (list, tuple, set)) else [None]
    if None in stop_ids:
        raise RequestError(f"stop_token_ids={r.stop_token_ids!r} must be a list of integer token ids",
                           "stop_token_ids")
    limit = model_config.max_position_embeddings
    if len(ids) + full_max_tokens > limit:
        raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({full_max_tokens}) exceeds the "
                           f"model's context of {limit} tokens", "max_tokens")
    seed = sc.seed if sc.seed is not None else seed_rng.getrandbits(63)
    max_tokens = 1 if rt == RequestType.REQUEST_TYPE_CONTEXT_ONLY else full_max_tokens
    sampling = sampling_params(sc, seed, stop_ids, full_max_tokens, model_config.vocab_size, eos)
    guided = getattr(r, "guided_decoding", None)
    if guided is not None:
        sampling = dataclasses.replace(sampling, guided=True)
    seq = Sequence(req_id, ids, max_tokens, sampling, set(stop_ids), eos, r.ignore_eos)
    seq.group = getattr(r, "sample_group", None)
    seq.num_logprobs = logprobs_k(r)
    if r.benchmark_generation_only:  # no context phase: decoding starts from a fixed first token
        seq.fake_context, seq.output_ids = True, [benchmark.fake_first_token(ids)]
    if rt != RequestType.REQUEST_TYPE_GENERATION_ONLY and not r.benchmark_generation_only:  # (the generation side computes no prompt)
        seq.num_prompt_logprobs = prompt_logprobs_k(r)
        seq.prompt_logprobs = [None] if seq.num_prompt_logprobs != NOT_ASKED else []
    if rt == RequestType.REQUEST_TYPE_CONTEXT_ONLY:
        # The generation side decodes the rest; the context keeps its blocks.
        seq.keep_blocks = True
        seq.full_max_tokens = full_max_tokens
    return seq

def sampling_params(sc: SamplingConfig, seed: int, stop_ids: list[int], max_tokens: int, vocab: int,
                    eos: set[int]) -> SamplingParams:
    bias = sorted((sc.logit_bias or {}).items())
    outside = [t for t, _ in bias if not 0 <= t < vocab]
    if outside:
        raise RequestError(f"logit_bias: token ids {outside[:5]} are outside the vocabulary [0, {vocab})")
    if sc.min_tokens > max_tokens:
        raise RequestError(f"min_tokens={sc.min_tokens} must be <= max_tokens ({max_tokens})")
    # min_tokens: EOS and stop tokens are masked (also with ignore_eos, as vLLM does)
    mask = tuple(sorted(t for t in eos | set(stop_ids) if 0 <= t < vocab)) if sc.min_tokens else ()
    return SamplingParams(sc.temperature, sc.top_k, sc.top_p, seed, float(sc.min_p),
                          float(sc.presence_penalty), float(sc.frequency_penalty),
                          float(sc.repetition_penalty), tuple((t, float(b)) for t, b in bias),
                          sc.min_tokens, mask)

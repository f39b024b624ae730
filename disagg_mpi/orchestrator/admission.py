"""Rank 0's check of a request's every per-request value, before anything is dispatched.

One request must never hurt another: a value that would make an executor's step
raise (a token id outside the vocabulary) or that cannot cross the control plane
(an integer of 2**64 or more overflows msgpack) is refused here, by name, before
rank 0 keeps any bookkeeping for it. Pure: a `Request` and the model's limits in,
a `RequestError` naming the field out; the HTTP server (serve/protocol.py), the
Python API and `disagg-mpi run` (DisaggOrchestrator) all call it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any

from ..api import (
    MAX_LOGPROBS,
    ContextPhaseParams,
    OutputConfig,
    Request,
    RequestError,
    RequestType,
    SamplingConfig,
    as_int,
)
from ..engine import benchmark
from ..engine.grammar import grammar_of
from ..sample_group import SampleGroup

INT63 = 2**63  # ids, seeds and top_k are signed 64-bit on the wire and in torch


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_context: int  # the model's max_position_embeddings: prompt + max_tokens must fit


@functools.lru_cache(maxsize=8)
def model_limits(model_path: str) -> ModelLimits:
    """The limits of the model a topology serves (reads its config, not its weights; cached)."""
    from ..model.loader import load_model_config

    mc = load_model_config(model_path)
    return ModelLimits(mc.vocab_size, mc.max_position_embeddings)


_int = as_int


def _utf8(s: str) -> bool:
    """Whether `s` can be encoded (a lone UTF-16 surrogate cannot: msgpack and tokenizers raise)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _in_range(v: Any, name: str, lo: int, hi: int, what: str) -> int:
    i = _int(v)
    if i is None or not lo <= i < hi:
        raise RequestError(f"{name}={_shown(v)} must be {what}", name)
    return i


def _token_ids(v: Any, name: str, vocab: int, allow_empty: bool = False) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise RequestError(f"{name} must be a list of token ids, got {type(v).__name__}", name)
    if not v and not allow_empty:
        raise RequestError(f"{name} is empty; send at least one token", name)
    ids = [_int(t) for t in v]
    bad = [t for t, i in zip(v, ids, strict=True) if i is None or not 0 <= i < vocab]
    if bad:
        shown = "[" + ", ".join(_shown(t) for t in bad[:5]) + "]"
        raise RequestError(f"{name}: token ids {shown} are outside the vocabulary "
                           f"[0, {vocab})", name)
    return ids


def check_sampling(sc: Any) -> None:
    if not isinstance(sc, SamplingConfig):
        raise RequestError(f"sampling_config must be a SamplingConfig, got {type(sc).__name__}", "sampling_config")
    if _int(sc.beam_width) != 1:
        raise RequestError(f"sampling_config.beam_width={_shown(sc.beam_width)} is not supported: only 1",
                           "sampling_config.beam_width")
    for name, lo_open, hi in (("temperature", False, math.inf), ("top_p", True, 1.0)):
        v = getattr(sc, name)
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v < 0 or (lo_open and v == 0) or v > hi:
            allowed = "a finite number >= 0 (0 is greedy)" if name == "temperature" else "a number in (0, 1]"
            raise RequestError(f"sampling_config.{name}={_shown(v)} must be {allowed}", f"sampling_config.{name}")
    _in_range(sc.top_k, "sampling_config.top_k", 0, INT63, "an integer in [0, 2**63) (0 disables top-k)")
    if sc.seed is not None:
        _in_range(sc.seed, "sampling_config.seed", 0, INT63, "an integer in [0, 2**63)")


def check_context_phase_params(cpp: Any, vocab: int) -> None:
    """The client-supplied parts of a generation-only request's hand-off (the signed state is the
    generation executor's to check: see engine/handoff_check.py)."""
    if not isinstance(cpp, ContextPhaseParams):
        raise RequestError("a generation-only request needs context_phase_params (from its context-only "
                           "response)", "context_phase_params")
    _in_range(cpp.req_id, "context_phase_params.req_id", 0, INT63, "the integer of the context-only response")
    _token_ids(cpp.first_gen_tokens, "context_phase_params.first_gen_tokens", vocab)
    if not isinstance(cpp.opaque_state, bytes) or not cpp.opaque_state:
        raise RequestError("context_phase_params.opaque_state must be the bytes of the context-only response",
                           "context_phase_params.opaque_state")


def check_request(r: Any, limits: ModelLimits, generation_only: bool | None = None) -> None:
    """Raise RequestError (with `.param`, the field) unless every value of `r` is servable.
    `generation_only`: whether it starts a generation phase (None: read `r.request_type`)."""
    if not isinstance(r, Request):
        raise RequestError(f"a request must be a disagg_mpi.api.Request, got {type(r).__name__}", "request")
    ids = _token_ids(r.input_token_ids, "input_token_ids", limits.vocab_size)
    mt = _in_range(r.max_tokens, "max_tokens", 1, INT63, "an integer >= 1")
    if len(ids) + mt > limits.max_context:
        raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({mt}) exceeds the model's context of "
                           f"{limits.max_context} tokens", "max_tokens")
    check_sampling(r.sampling_config)
    stop = r.stop_token_ids if r.stop_token_ids is not None else []
    if not isinstance(stop, (list, tuple, set)):
        raise RequestError(f"stop_token_ids={_shown(stop)} must be a list of token ids", "stop_token_ids")
    for t in stop:  # an id outside the vocabulary never matches: harmless, but it must fit 64 bits
        _in_range(t, "stop_token_ids", 0, INT63, "a list of integer token ids in [0, 2**63)")
    if not isinstance(r.ignore_eos, bool) or not isinstance(r.streaming, bool):
        name = "ignore_eos" if not isinstance(r.ignore_eos, bool) else "streaming"
        raise RequestError(f"{name}={_shown(getattr(r, name))} must be true or false", name)
    if r.client_id is not None and (not isinstance(r.client_id, str) or not _utf8(r.client_id)):
        raise RequestError(f"client_id={_shown(r.client_id)} must be a string of valid UTF-8 or None", "client_id")
    check_logprobs(r)
    benchmark.check_request(r)  # a generation-only benchmark request: nothing of a context phase
    if r.guided_decoding is not None:
        grammar_of(r.guided_decoding)  # a schema that cannot compile is refused here, not on an executor
    group = getattr(r, "sample_group", None)
    if group is not None:
        if not isinstance(group, SampleGroup):
            raise RequestError(f"sample_group={_shown(group)} must be a SampleGroup or None", "sample_group")
        try:
            group.check()
        except ValueError as err:
            raise RequestError(str(err), "sample_group") from None
    if generation_only is None:
        generation_only = r.request_type == RequestType.REQUEST_TYPE_GENERATION_ONLY
    if generation_only:
        check_context_phase_params(r.context_phase_params, limits.vocab_size)


def admitted(r: Request, limits: ModelLimits, generation_only: bool | None = None) -> Request:
    """`check_request`, then a copy of `r` whose integers are Python ints (numpy and torch integers
    pass the check but msgpack cannot send them)."""
    check_request(r, limits, generation_only)
    # A copy of what rank 0 keeps and changes (not a deepcopy: a 2,048-token prompt costs ~1 ms so).
    sc = r.sampling_config
    sc = dataclasses.replace(sc, beam_width=operator.index(sc.beam_width), top_k=operator.index(sc.top_k),
                             temperature=float(sc.temperature), top_p=float(sc.top_p),
                             seed=None if sc.seed is None else operator.index(sc.seed))
    cpp = r.context_phase_params
    if cpp is not None and generation_only is not False and isinstance(cpp, ContextPhaseParams):
        cpp = ContextPhaseParams(operator.index(cpp.req_id), [operator.index(t) for t in cpp.first_gen_tokens],
                                 cpp.opaque_state)
    r = dataclasses.replace(r, input_token_ids=[operator.index(t) for t in r.input_token_ids],
                            max_tokens=operator.index(r.max_tokens), sampling_config=sc,
                            stop_token_ids=[operator.index(t) for t in (r.stop_token_ids or [])],
                            context_phase_params=cpp)
    return r


def check_logprobs(r: Request) -> None:
    """OutputConfig.return_log_probs a bool; num_logprobs an integer in [0, MAX_LOGPROBS];
    num_prompt_logprobs None or such an integer."""
    oc = r.output_config
    if not isinstance(oc, OutputConfig) or not isinstance(oc.return_log_probs, bool):
        raise RequestError(f"output_config={_shown(oc)} must be an OutputConfig with return_log_probs true or "
                           "false", "output_config")
    k = r.num_logprobs
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS:
        raise RequestError(f"num_logprobs={_shown(k)} must be an integer in [0, {MAX_LOGPROBS}]", "num_logprobs")
    pk = getattr(r, "num_prompt_logprobs", None)
    if pk is not None and (isinstance(pk, bool) or not isinstance(pk, int) or not 0 <= pk <= MAX_LOGPROBS):
        raise RequestError(f"num_prompt_logprobs={_shown(pk)} must be None (not asked) or an integer in "
                           f"[0, {MAX_LOGPROBS}]", "num_prompt_logprobs")

"""The core fields of an OpenAI completions or chat body, each checked alone: max_tokens and
sampling, stream, disaggregated_params (which phase a request asks for), our benchmark extension,
n and best_of. (The sampling extras are in `sampling_fields.py`.)

Pure functions used by `protocol.py`, which assembles the engine requests; each refusal is a 400
naming its field.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from ..api import ContextPhaseParams, SamplingConfig
from .errors import bad, is_int, is_num
from .sampling_fields import extras

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n in one request
MAX_BEST_OF = 16  # candidates per prompt (best_of)

CONTEXT_ONLY = "context_only"
GENERATION_ONLY = "generation_only"
CONTEXT_AND_GENERATION = "context_and_generation"
# Our extension field: "generation_only" asks for a generation-only benchmark request (no context phase,
# meaningless output: engine/benchmark.py); refused unless the server allows it
# (protocol.check_benchmark_allowed).
BENCHMARK_FIELD = "disagg_benchmark"


def token_list(v: Any, name: str, vocab: int | None) -> list[int]:
    if not isinstance(v, list) or not all(is_int(t) for t in v):
        raise bad(f"{name} must be a list of integer token ids", name)
    if vocab is not None:
        out = [t for t in v if not 0 <= t < vocab]
        if out:
            raise bad(f"{name}: token ids {out[:5]} are outside the vocabulary [0, {vocab})", name)
    return list(v)


def max_tokens_and_sampling(body: dict[str, Any], default_max_tokens: int, max_tokens_field: str = "max_tokens",
              vocab: int | None = None, echo: bool = False) -> tuple[int, SamplingConfig, list[int], bool]:
    mt = body.get(max_tokens_field)
    if mt is None and max_tokens_field != "max_tokens":
        mt, max_tokens_field = body.get("max_tokens"), "max_tokens"
    if mt is None:
        mt = default_max_tokens
    if not is_int(mt) or mt < (0 if echo else 1):
        raise bad(f"{max_tokens_field}={mt!r} must be an integer >= 1 (0 only with echo: the prompt scored, "
                  "nothing generated)", max_tokens_field)
    temperature = body.get("temperature")
    temperature = 0.0 if temperature is None else temperature  # greedy unless asked (like `run`)
    if not is_num(temperature) or temperature < 0:
        raise bad(f"temperature={temperature!r} must be a number >= 0 (0 is greedy)", "temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not is_num(top_p) or not 0 < top_p <= 1:
        raise bad(f"top_p={top_p!r} must be a number in (0, 1]", "top_p")
    top_k = body.get("top_k")
    top_k = 0 if top_k is None or top_k == -1 else top_k  # -1 means disabled (vLLM)
    if not is_int(top_k) or top_k < 0:
        raise bad(f"top_k={top_k!r} must be an integer >= 0 (0 or -1 disables top-k)", "top_k")
    seed = body.get("seed")
    if seed is not None and (not is_int(seed) or seed < 0):
        raise bad(f"seed={seed!r} must be a non-negative integer", "seed")
    stop_ids = body.get("stop_token_ids")
    stop_ids = [] if stop_ids is None else token_list(stop_ids, "stop_token_ids", None)
    ignore_eos = body.get("ignore_eos", False)
    if ignore_eos is None:
        ignore_eos = False
    if not isinstance(ignore_eos, bool):
        raise bad(f"ignore_eos={ignore_eos!r} must be true or false", "ignore_eos")
    sc = SamplingConfig(1, float(temperature), top_k, float(top_p), seed, **extras(body, vocab, mt))
    return mt, sc, stop_ids, ignore_eos


def stream_fields(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad(f"stream={stream!r} must be true or false", "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options must be an object with include_usage", "stream_options")
        if not stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")
        include_usage = bool(opts.get("include_usage", False))
    return stream, include_usage


def disagg_fields(body: dict[str, Any], stream: bool) -> tuple[str, ContextPhaseParams | None]:
    dp = body.get("disaggregated_params")
    if dp is None:
        return CONTEXT_AND_GENERATION, None
    if not isinstance(dp, dict):
        raise bad("disaggregated_params must be an object", "disaggregated_params")
    rt = dp.get("request_type", CONTEXT_AND_GENERATION)
    if rt == CONTEXT_AND_GENERATION:
        return rt, None
    if rt == CONTEXT_ONLY:
        if stream:
            raise bad("stream is not supported for a context_only request (it returns one token)", "stream")
        return rt, None
    if rt != GENERATION_ONLY:
        raise bad(f"disaggregated_params.request_type={rt!r} must be one of context_only, generation_only, "
                  "context_and_generation", "disaggregated_params.request_type")
    first = dp.get("first_gen_tokens")
    if not isinstance(first, list) or not first or not all(is_int(t) for t in first):
        raise bad("disaggregated_params.first_gen_tokens must be a non-empty list of token ids "
                  "(from the context_only response)", "disaggregated_params.first_gen_tokens")
    ctx_id = dp.get("ctx_request_id")
    if not is_int(ctx_id):
        raise bad("disaggregated_params.ctx_request_id must be an integer (from the context_only response)",
                  "disaggregated_params.ctx_request_id")
    opaque = dp.get("opaque_state", dp.get("encoded_opaque_state"))
    if not isinstance(opaque, str) or not opaque:
        raise bad("disaggregated_params.opaque_state must be the base64 string of the context_only response",
                  "disaggregated_params.opaque_state")
    try:
        state = base64.b64decode(opaque, validate=True)
    except (binascii.Error, ValueError):
        raise bad("disaggregated_params.opaque_state is not valid base64",
                  "disaggregated_params.opaque_state") from None
    return rt, ContextPhaseParams(ctx_id, list(first), state)


def benchmark_field(body: dict[str, Any], mode: str) -> bool:
    v = body.get(BENCHMARK_FIELD)
    if v is None:
        return False
    if v != "generation_only":
        raise bad(f"{BENCHMARK_FIELD}={v!r} must be \"generation_only\" (or left out)", BENCHMARK_FIELD)
    if mode != CONTEXT_AND_GENERATION:
        raise bad(f"{BENCHMARK_FIELD} skips the context phase: it takes no disaggregated_params", BENCHMARK_FIELD)
    return True


def n_field(body: dict[str, Any], prompts: int) -> int:
    n = body.get("n")
    n = 1 if n is None else n
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise bad(f"n={n!r} must be an integer in [1, {MAX_N}]", "n")
    if prompts * n > MAX_CHOICES:
        raise bad(f"{prompts} prompts x n={n} is {prompts * n} choices; at most {MAX_CHOICES} per request", "n")
    return n


def best_of_field(body: dict[str, Any], n: int, prompts: int, stream: bool, mode: str) -> int:
    """Candidates per prompt (best_of.py); 1 when best_of is absent or not above n."""
    best_of = body.get("best_of")
    if best_of is None or best_of == 1:
        return 1
    if not is_int(best_of) or not n <= best_of <= MAX_BEST_OF:
        raise bad(f"best_of={best_of!r} must be an integer in [n={n}, {MAX_BEST_OF}]", "best_of")
    if best_of == n:
        return 1
    if stream:
        raise bad(f"best_of={best_of} > n={n} cannot be streamed: the best candidates are known only at the end; "
                  "send stream=false or best_of=n", "best_of")
    if mode != CONTEXT_AND_GENERATION:
        raise bad("best_of > n takes no disaggregated_params", "best_of")
    if prompts * best_of > MAX_CHOICES:
        raise bad(f"{prompts} prompts x best_of={best_of} is {prompts * best_of} candidates; at most {MAX_CHOICES} "
                  "per request", "best_of")
    return best_of

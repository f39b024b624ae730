"""Generation-only benchmark requests (`Request.benchmark_generation_only`): decode without a context.

TensorRT-LLM's benchmark measures the decode side alone with requests whose prompt KV is allocated
but never computed. Here such a request reserves blocks for prompt + max_tokens like any other, counts
the prompt's tokens as already in the cache (`Sequence.fake_context`; the blocks hold whatever the
pool held, so the tokens that come out mean nothing), and starts from a fixed first token, the prompt's
last one, so every decode step attends over a context of the prompt's length: it costs what it would
after a real prefill. Its blocks never enter the prefix cache (their contents are not the prompt's).

What it cannot take, refused by name (rank 0 and the executor both call `check_request`): a context
phase of any kind (context_phase_params, a context-only or generation-only request type), a grammar
(it would constrain tokens that follow a first token it never chose), and logprobs (the first token
has none). Pure functions; the scheduler and the engine read `fake_context`.
"""

from __future__ import annotations

from typing import Any

from ..api import Request, RequestError, RequestType

FIELD = "benchmark_generation_only"


def check_request(r: Request) -> None:
    """Raise RequestError (param `benchmark_generation_only`) unless a benchmark request can be served."""
    flag = getattr(r, FIELD, False)
    if not isinstance(flag, bool):
        raise RequestError(f"{FIELD}={flag!r} must be true or false", FIELD)
    if not flag:
        return
    if r.request_type != RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION or r.context_phase_params is not None:
        raise RequestError(f"{FIELD} skips the context phase: it takes no context_phase_params and runs only as "
                           "a context-and-generation request, never context-only or generation-only", FIELD)
    if r.guided_decoding is not None:
        raise RequestError(f"{FIELD} takes no guided decoding (response_format): its first token is not "
                           "sampled, so no grammar can follow it", FIELD)
    if r.output_config.return_log_probs:
        raise RequestError(f"{FIELD} takes no logprobs: its first token is not sampled and has none", FIELD)
    if r.num_prompt_logprobs is not None:
        raise RequestError(f"{FIELD} takes no prompt logprobs: its prompt is never computed", FIELD)


def fake_first_token(prompt_ids: list[int]) -> int:
    """The first output token of a benchmark request: the prompt's last (in the vocabulary, as checked)."""
    return int(prompt_ids[-1])


def first_steps(items: list[tuple[Any, int]], meta: dict[int, Any]) -> list[Any]:
    """The streaming benchmark sequences of a scheduled step that are in their first decode step: their
    first token, which no step produced, goes out now, as a generation executor streams a pulled
    request's first token when it joins the batch. (TTFT is then the wait for a place in the batch.)"""
    return [seq for seq, _ in items if seq.fake_context and len(seq.output_ids) == 1
            and getattr(meta.get(seq.req_id), "streaming", False)]

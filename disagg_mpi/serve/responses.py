"""Engine results -> OpenAI response bodies and streaming chunks.

Pure functions (no aiohttp, no MPI), so they can be unit tested alone; the
request side is `protocol.py`.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from ..api import Response, TokenLogprobs
from .protocol import CONTEXT_ONLY, ParsedRequest


def finish_reason(reason: str | None) -> str:
    """OpenAI's `stop` and `length`, plus `cancelled` (our one extension, documented in the README):
    the request was cancelled (client gone, server shutting down) and ends with the tokens it had."""
    if reason in ("stop", "length", "cancelled"):
        return reason
    if reason == "cancelled":
        return "abort"
    return "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def disagg_params_out(resp: Response) -> dict[str, Any]:
    cpp = resp.result.context_phase_params if resp.result is not None else None
    if cpp is None:  # the first token ended the request: nothing to hand to a generation phase
        return {"request_type": CONTEXT_ONLY, "first_gen_tokens": list(resp.result.output_token_ids),
                "ctx_request_id": None, "opaque_state": None}
    return {"request_type": CONTEXT_ONLY, "first_gen_tokens": list(cpp.first_gen_tokens),
            "ctx_request_id": cpp.req_id, "opaque_state": base64.b64encode(cpp.opaque_state).decode()}


def logprobs_body(kind: str, tokenizer: Any, tokens: Sequence[int], lps: Sequence[TokenLogprobs],
                  pieces: Sequence[str], k: int, offset: int = 0) -> dict[str, Any]:
    """OpenAI's `logprobs` of `tokens`: completions' {tokens, token_logprobs, top_logprobs, text_offset}
    (the k best as {token: logprob}, null for k = 0) or chat's {content: [{token, logprob, bytes,
    top_logprobs}]}. `pieces[i]`: the text token i added to the output (its token string, so the
    strings add up to the text); `offset`: where the first one starts in the choice's text."""
    def name(tid: int, i: int) -> str:  # an alternative's string; the sampled token's is its piece
        return pieces[i] if tid == tokens[i] else tokenizer.decode([tid])

    lps = [lp.top(k) for lp in lps]
    if kind == "completion":
        offsets = []
        for s in pieces:
            offsets.append(offset)
            offset += len(s)
        top = [{name(t, i): v for t, v in zip(lp.top_ids, lp.top_logprobs)} for i, lp in enumerate(lps)] if k else None
        return {"tokens": list(pieces), "token_logprobs": [lp.logprob for lp in lps], "top_logprobs": top,
                "text_offset": offsets}

    def entry(s: str, v: float) -> dict[str, Any]:
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(pieces[i], lp.logprob),
                         "top_logprobs": [entry(name(t, i), v) for t, v in zip(lp.top_ids, lp.top_logprobs)]}
                        for i, lp in enumerate(lps)], "refusal": None}


def _choice(p: ParsedRequest, index: int, resp: Response, text: str, logprobs: dict | None = None) -> dict[str, Any]:
    r = resp.result
    tokens = list(r.output_token_ids)
    reason = finish_reason(r.finish_reason)
    if p.kind == "completion":
        echo = p.echo[index] if index < len(p.echo) else ""
        return {"index": index, "text": echo + text, "token_ids": tokens, "logprobs": logprobs,
                "finish_reason": reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "token_ids": tokens,
            "logprobs": logprobs, "finish_reason": reason}


def full_body(p: ParsedRequest, finals: list[tuple[Response, str]],
              logprobs: Sequence[dict | None] | None = None) -> dict[str, Any]:
    """The non-streaming body of a finished request: (final response, text) of each choice, in order;
    `logprobs`: each choice's (logprobs_body), where asked."""
    logprobs = logprobs or [None] * len(finals)
    choices = [_choice(p, i, resp, text, lp) for i, ((resp, text), lp) in enumerate(zip(finals, logprobs))]
    completion_tokens = sum(len(resp.result.output_token_ids) for resp, _ in finals)
    metrics = finals[0][0].result.metrics
    body: dict[str, Any] = {"id": p.id, "object": "text_completion" if p.kind == "completion" else "chat.completion",
                            "created": p.created, "model": p.model, "choices": choices,
                            "usage": usage(p.prompt_tokens, completion_tokens),
                            # extension: per-request ttft, KV transfer, where each phase ran (the first choice's)
                            "metrics": metrics.to_dict()}
    if p.mode == CONTEXT_ONLY:
        dp = disagg_params_out(finals[0][0])
        choices[0]["disaggregated_params"] = dp
        body["disaggregated_params"] = dp
    return body


def chunk(p: ParsedRequest, text: str | None, tokens: list[int], reason: str | None,
          first: bool = False, index: int = 0, logprobs: dict | None = None) -> dict[str, Any]:
    """One streaming chunk (OpenAI format; `token_ids` is an extension)."""
    if p.kind == "completion":
        if first and index < len(p.echo):
            text = p.echo[index] + (text or "")
        choice: dict[str, Any] = {"index": index, "text": text or "", "token_ids": tokens, "logprobs": logprobs,
                                  "finish_reason": reason}
        obj = "text_completion"
    else:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "token_ids": tokens, "logprobs": logprobs, "finish_reason": reason}
        obj = "chat.completion.chunk"
    return {"id": p.id, "object": obj, "created": p.created, "model": p.model, "choices": [choice]}


def usage_chunk(p: ParsedRequest, completion_tokens: int) -> dict[str, Any]:
    obj = "text_completion" if p.kind == "completion" else "chat.completion.chunk"
    return {"id": p.id, "object": obj, "created": p.created, "model": p.model, "choices": [],
            "usage": usage(p.prompt_tokens, completion_tokens)}

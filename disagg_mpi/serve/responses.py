"""Engine results -> OpenAI response bodies and streaming chunks.

Pure functions (no aiohttp, no MPI), so they can be unit tested alone; the
request side is `protocol.py`.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from typing import Any

from ..api import Request, Response, Result, TokenLogprobs
from ..stops import StopTracker
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


def prompt_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each prompt token adds (incremental detokenization, as for the output's tokens)."""
    tracker = StopTracker(tokenizer)
    tracker.add(ids)
    return tracker.pieces


def echo_logprobs(tokenizer: Any, prompt: Sequence[int], lps: Sequence[TokenLogprobs | None], k: int,
                  output: dict[str, Any] | None) -> dict[str, Any]:
    """Completions' `logprobs` with echo: the prompt's tokens first (the first one's logprob and
    alternatives null: nothing precedes it, as OpenAI and vLLM answer), then the output's (`output`,
    logprobs_body's, whose text_offset already counts the echoed prompt), or none."""
    pieces = prompt_pieces(tokenizer, prompt)
    rest = logprobs_body("completion", tokenizer, prompt[1:], lps[1:], pieces[1:], k, len(pieces[0]))
    body = {"tokens": [pieces[0], *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]] if k else None, "text_offset": [0, *rest["text_offset"]]}
    if output is not None:
        for key in ("tokens", "token_logprobs", "text_offset"):
            body[key] += output[key]
        if k:
            body["top_logprobs"] += output["top_logprobs"]
    return body


def choice_logprobs(kind: str, tokenizer: Any, request: Request, result: Result, pieces: Sequence[str],
                    prompt_lps: Sequence[TokenLogprobs | None] | None, offset: int = 0) -> dict[str, Any] | None:
    """A choice's `logprobs` (None when not asked): its output tokens' (`pieces`: their texts,
    `offset`: where the first starts in the choice's text), after the prompt's with echo."""
    tokens = result.output_token_ids
    out = None
    if result.log_probs is not None:
        out = logprobs_body(kind, tokenizer, tokens, result.log_probs, pieces[:len(tokens)], request.num_logprobs,
                            offset)
    if prompt_lps is not None and kind == "completion":
        return echo_logprobs(tokenizer, request.input_token_ids, prompt_lps, request.num_logprobs, out)
    return out


def prompt_only(resp: Response) -> Response:
    """max_tokens 0 with echo (ParsedRequest.score_only): the final response without the one token
    the executors computed, finished by length."""
    r = resp.result
    if r is None:
        return resp
    return dataclasses.replace(resp, result=dataclasses.replace(
        r, output_token_ids=[], log_probs=None if r.log_probs is None else [], finish_reason="length"))


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
              logprobs: Sequence[dict | None] | None = None, completion_tokens: int | None = None) -> dict[str, Any]:
    """The non-streaming body of a finished request: (final response, text) of each choice, in order;
    `logprobs`: each choice's (logprobs_body), where asked; `completion_tokens`: what usage bills
    (default: the choices' tokens; best_of bills every candidate's)."""
    logprobs = logprobs or [None] * len(finals)
    choices = [_choice(p, i, resp, text, lp) for i, ((resp, text), lp) in enumerate(zip(finals, logprobs))]
    if completion_tokens is None:
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

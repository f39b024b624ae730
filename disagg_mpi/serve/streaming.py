"""Server-sent events for one OpenAI request of one or more choices (batched prompts, n).

Each choice is one engine request with its own response queue; a task per choice forwards its
responses into one queue, so chunks go out in the order tokens arrive, each with its choice index.
Stop strings are applied per choice (outputs.py): the text before the stop goes out, the request
is cancelled, and its final chunk says "stop".
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from ..api import RequestMetrics, Response
from ..hops import SseWrites
from ..stops import ChoiceOutput
from .protocol import ParsedRequest, error_body
from .responses import chunk, echo_logprobs, finish_reason, logprobs_body, prompt_only, usage_chunk

log = logging.getLogger(__name__)
HTTP_IN = "http_in"  # the request's key for the time its handler started (app.py)


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Choices:
    """The stream's per-choice state."""

    def __init__(self, state: Any, p: ParsedRequest, subs: list[tuple[int, asyncio.Queue]],
                 http_in: float | None = None):
        self.state, self.p, self.subs = state, p, subs
        self.http_in, self.sse = http_in, [SseWrites() for _ in subs]  # the HTTP hops (hops.py)
        self.outs = [ChoiceOutput(state.tok, r) for r in p.requests]
        self.first = [True] * len(subs)
        self.cancelled = [False] * len(subs)
        # text_offset of each choice's next token (completions; after the echoed prompt)
        self.offsets = [len(p.echo[i]) if i < len(p.echo) else 0 for i in range(len(subs))]

    def logprobs(self, i: int, tokens: list[int], lps: Any, pieces: list[str]) -> dict[str, Any] | None:
        """The chunk's `logprobs` for choice i's new tokens (None when not asked); the first chunk's
        start with the prompt's, with echo."""
        body = None
        if lps is not None:
            k = self.p.requests[i].num_logprobs
            body = logprobs_body(self.p.kind, self.state.tok, tokens, lps, pieces, k, self.offsets[i])
            self.offsets[i] += sum(len(s) for s in pieces)
        prompt = self.outs[i].prompt_logprobs
        if self.first[i] and prompt is not None and self.p.kind == "completion":
            r = self.p.requests[i]
            body = echo_logprobs(self.state.tok, r.input_token_ids, prompt, r.num_logprobs, body)
        return body

    def cancel_all(self) -> None:
        for gid, _ in self.subs:
            self.state.dispatcher.cancel(gid)

    async def write(self, out: web.StreamResponse, i: int, resp: Response) -> bool:
        """Write what `resp` brings for choice i; True once the choice is over."""
        o, m = self.outs[i], self.state.metrics
        text, new, lps, pieces = o.take(resp)
        if self.p.score_only:  # max_tokens 0 with echo: the prompt alone, the one token computed is dropped
            text, new, lps, pieces = "", [], None if lps is None else [], []
        if o.stopped and not resp.is_final and not self.cancelled[i]:
            self.cancelled[i] = True
            self.state.dispatcher.cancel(self.subs[i][0])  # a stop string ended the text: nothing past it goes out
        if not resp.is_final:
            if new or text:
                self.sse[i].wrote()
                await out.write(sse(chunk(self.p, text, new, None, self.first[i], i,
                                          self.logprobs(i, new, lps, pieces))))
                self.first[i] = False
            return False
        resp = prompt_only(o.final_response(resp)) if self.p.score_only else o.final_response(resp)
        reason = resp.result.finish_reason if resp.result else "error"
        last = chunk(self.p, text, new, finish_reason(reason), self.first[i], i, self.logprobs(i, new, lps, pieces))
        self.sse[i].wrote()
        if resp.result:
            self.sse[i].stamp_into(resp.result.metrics, self.http_in)
        last["metrics"] = resp.result.metrics.to_dict() if resp.result else {}  # extension
        await out.write(sse(last))
        if reason == "cancelled":
            m.outcome("cancelled")
        else:
            m.outcome("ok")
            m.finished(resp.result.metrics if resp.result else RequestMetrics(), len(self.p.requests[i].input_token_ids),
                       len(o.tokens))
        return True


async def stream_choices(request: web.Request, state: Any, p: ParsedRequest,
                         subs: list[tuple[int, asyncio.Queue]], engine_error: Any) -> web.StreamResponse:
    merged: asyncio.Queue = asyncio.Queue()

    async def forward(i: int, q: asyncio.Queue) -> None:
        while True:
            resp = await q.get()
            await merged.put((i, resp))
            if resp.is_final:
                return

    tasks = [asyncio.create_task(forward(i, q)) for i, (_, q) in enumerate(subs)]
    c = _Choices(state, p, subs, request.get(HTTP_IN))
    try:
        i, resp = await merged.get()
        if resp.has_error():  # refused before anything was sent: a plain error body
            c.cancel_all()
            return engine_error(state, p, resp)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
        state.last_words.streaming(request.get("last_words"), request)
        await out.prepare(request)
        try:
            await _pump(out, c, merged, i, resp)
        except (ConnectionResetError, ConnectionError) as err:
            log.info("request %s: client went away (%s); cancelling", p.id, type(err).__name__)
            c.cancel_all()
            state.metrics.outcome("cancelled")
        except Exception:
            log.exception("request %s: streaming failed", p.id)
            c.cancel_all()
            state.metrics.outcome("error")
            out.force_close()
        return out
    finally:
        for t in tasks:
            t.cancel()


async def _pump(out: web.StreamResponse, c: _Choices, merged: asyncio.Queue, i: int, resp: Response) -> None:
    left = len(c.subs)
    while True:
        if resp.has_error():
            c.state.metrics.outcome("error")
            await out.write(sse(error_body(resp.error_msg or "unknown error", "server_error")))
            c.cancel_all()
            break
        if await c.write(out, i, resp):
            left -= 1
            if not left:
                if c.p.include_usage:
                    used = 0 if c.p.score_only else sum(len(o.tokens) for o in c.outs)
                    await out.write(sse(usage_chunk(c.p, used)))
                break
        i, resp = await merged.get()
    await out.write(b"data: [DONE]\n\n")
    await out.write_eof()

"""One choice's client-visible output on rank 0: engine responses in, text and tokens out.

Stop strings are applied here (disagg_mpi/stops.py): a request with stop
strings is streamed from its executor even when the client does not stream, so
rank 0 sees each token as it comes and can cancel the request at the stop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..api import Request, Response, Result
from ..stops import StopTracker


class ChoiceOutput:
    """Feeds one request's responses through a `StopTracker`; keeps the text sent so far."""

    def __init__(self, tokenizer: Any, request: Request):
        self.tracker = StopTracker(tokenizer, request.stop_words, request.include_stop_str_in_output)
        self.seen = 0  # tokens received in non-final responses (a final one holds every token)
        self.text = ""

    @property
    def stopped(self) -> bool:
        return self.tracker.stopped

    @property
    def tokens(self) -> list[int]:
        """Output tokens up to the one that completed a stop string (all of them otherwise)."""
        return list(self.tracker.ids)

    def take(self, resp: Response) -> tuple[str, list[int]]:
        """The new text and the new tokens of `resp`, stop strings applied."""
        tokens = list(resp.result.output_token_ids) if resp.result is not None else []
        new = tokens[self.seen:] if resp.is_final else tokens
        if not resp.is_final:
            self.seen += len(tokens)
        before = self.tracker.num_tokens
        text = self.tracker.add(new)
        used = new[: self.tracker.num_tokens - before]
        if resp.is_final:
            text += self.tracker.finish()
        self.text += text
        return text, used

    def final_response(self, resp: Response) -> Response:
        """`resp` (final) with the tokens and finish reason the client sees."""
        if not self.stopped:
            return resp
        r = resp.result
        return Response(resp.request_id, Result(self.tokens, True, "stop",
                                                r.context_phase_params if r else None, r.metrics if r else {}),
                        None, resp.client_id)


async def final_of(q: asyncio.Queue) -> Response:
    while True:
        resp = await q.get()
        if resp.is_final:
            return resp


async def collect(out: ChoiceOutput, q: asyncio.Queue, cancel: Any) -> Response:
    """Run one non-streamed choice to its end; `cancel()` stops the executor at a stop string.

    Returns the final response as the client sees it; its text is `out.text`.
    """
    while True:
        resp = await q.get()
        if resp.has_error():
            if resp.is_final:
                return resp
            continue
        out.take(resp)
        if out.stopped and not resp.is_final:
            cancel()
            resp = await final_of(q)  # cancelled (or finished meanwhile): its tokens past the stop are dropped
        if resp.is_final:
            return out.final_response(resp) if out.stopped or not resp.has_error() else resp

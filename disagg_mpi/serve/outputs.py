"""Waiting for one choice's responses on rank 0, stop strings applied (`stops.ChoiceOutput`).

A request with stop strings is streamed from its executor even when the client
does not stream, so rank 0 sees each token as it comes and can cancel the
request at the stop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..api import Response
from ..stops import ChoiceOutput


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

"""HTTP client helpers of the `disagg-mpi serve` tests (aiohttp): JSON posts, SSE streams, a clean env."""

from __future__ import annotations

import asyncio
import json
import os
import time


def clean_env() -> dict[str, str]:
    """This environment without the markers of an MPI job (a server a test starts is not a rank)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_LOCALNRANKS", "HYDRA_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(coro):
    return asyncio.run(coro)


async def post(session, url, body, headers=None, raw=None):
    """POST a JSON body (or `raw` bytes); returns (status, parsed JSON)."""
    kw = {"data": raw} if raw is not None else {"json": body}
    async with session.post(url, headers=headers or {}, **kw) as r:
        return r.status, await r.json(content_type=None)


async def stream(session, url, body, headers=None, started=None):
    """POST with stream: true; returns [(arrival time, chunk or '[DONE]')]. `started` (an
    asyncio.Event), if given, is set when the first event arrives."""
    events = []
    async with session.post(url, json=body, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        buf = b""
        async for data in r.content.iter_any():
            buf += data
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                assert ev.startswith(b"data: "), ev
                payload = ev[len(b"data: "):]
                events.append((time.perf_counter(), "[DONE]" if payload == b"[DONE]" else json.loads(payload)))
                if started is not None:
                    started.set()
    return events

"""Bridges the (synchronous, MPI) orchestrator and asyncio handlers on rank 0.

One background task polls the orchestrator without blocking: every ~1 ms
while requests are in flight, backing off to ~50 ms when idle (a new request
wakes it at once). Client-visible responses go to one asyncio.Queue per
request; the final response closes it.

Each executor answers once per engine step and each response becomes its own SSE event at once,
but what arrives while this task sleeps is written back to back. The busy cycle is at least
~1.1 ms (asyncio's epoll timeout is whole milliseconds: asyncio.sleep of 50 us to 1 ms measured
1.09-1.11 ms) plus rank 0's work (~70 us an event, word model on 2 cores), so only steps shorter
than that (a tiny model on CPU) reach the client two at a time (issue 23).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..api import Request, Response
from ..orchestrator.tracks import Flow
from .protocol import CONTEXT_ONLY, GENERATION_ONLY

log = logging.getLogger(__name__)

BUSY_INTERVAL = 0.001
IDLE_INTERVAL = 0.05
STATS_INTERVAL = 1.0
SHUT_DOWN = "the server shut down before the request finished"  # fail_all's word at the end of a drain


class Dispatcher:
    def __init__(self, orch: Any):
        self.orch = orch
        self.queues: dict[int, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._last_stats = 0.0
        self.errors = 0

    # ---- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="disagg-dispatcher")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    @property
    def in_flight(self) -> int:
        return len(self.queues)

    # ---- requests ----------------------------------------------------------

    def submit(self, request: Request, mode: str) -> tuple[int, asyncio.Queue]:
        """Enqueue one request; returns its global id and the queue its responses arrive on."""
        if mode == CONTEXT_ONLY:
            [gid] = self.orch.enqueue_context([request], flow=Flow.CONTEXT_ONLY)
        elif mode == GENERATION_ONLY:
            [gid] = self.orch.enqueue_generation_only([request])
        else:
            [gid] = self.orch.submit([request])
        q: asyncio.Queue = asyncio.Queue()
        self.queues[gid] = q
        self._wake.set()
        return gid, q

    def cancel(self, gid: int) -> None:
        if gid in self.queues:
            self.orch.cancel_request(gid)
            self._wake.set()

    def cancel_all(self) -> None:
        for gid in list(self.queues):
            self.cancel(gid)

    def fail_all(self, message: str = SHUT_DOWN) -> None:
        """End every open request with an error (last resort at shutdown)."""
        for gid in list(self.queues):
            self._deliver(gid, Response(gid, None, message))

    # ---- the poller ----------------------------------------------------------

    def pump(self) -> int:
        """One non-blocking round: collect client-visible responses, route them to their queues
        (the orchestrator moves contexts on to generation itself)."""
        out = self.orch.await_responses(timeout=0)
        for gid, resp in out:
            self._deliver(gid, resp)
        return len(out)

    def _deliver(self, gid: int, resp: Response) -> None:
        q = self.queues.get(gid)
        if q is None:
            return
        q.put_nowait(resp)
        if resp.is_final:
            del self.queues[gid]

    async def _run(self) -> None:
        while True:
            busy = bool(self.queues)
            try:
                self.pump()
                now = time.monotonic()
                if now - self._last_stats > STATS_INTERVAL:
                    self._last_stats = now
                    self.orch.request_executor_stats()
            except Exception:
                self.errors += 1
                log.exception("dispatcher: polling the orchestrator failed")
                for gid in list(self.queues):
                    self._deliver(gid, Response(gid, None, "internal error in the orchestrator"))
            if self._stopping and not self.queues:
                return
            if busy:
                await asyncio.sleep(BUSY_INTERVAL)
            else:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_INTERVAL)
                except asyncio.TimeoutError:
                    pass

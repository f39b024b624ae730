"""The direct hand-off's generation side: requests parked until their context is ready.

With `cache_transceiver_config.direct_handoff`, rank 0 sends a request's generation phase to the
generation executor it picked *when it dispatches the context phase*, without params
(`protocol.Enqueue.await_context`). The context leader, once it holds the finished context, sends
the signed params straight here (`protocol.ContextReady`), with the claim already granted to this
request; rank 0's polling is no longer between the two sides (issue 23).

Messages from rank 0 and from the context leader come from two ranks, so MPI does not order them:
a `ContextReady` may come before its parked request (kept as `early` until it does), or after the
parked request left (cancelled by rank 0, or refused at admission: `gone`), when the context must be
released at once instead of waiting out its lease. Neither list grows without bound: entries older
than `keep_s` are dropped (an early notice is then released: its request never came).

Pure bookkeeping (no MPI, no engine): `Handoff` (handoff.py) acts on what it returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..api import ContextPhaseParams, Request
from .sequence import Sequence


@dataclass
class Parked:
    """A generation-only request waiting for its context's `ContextReady`."""

    seq: Sequence
    request: Request  # its params are attached when the notice comes


@dataclass
class Notice:
    """A `ContextReady`: the params, and the context leader (world rank) that granted the claim."""

    cpp: ContextPhaseParams
    src: int
    at: float = field(default_factory=time.monotonic)


class Parking:
    def __init__(self, keep_s: float):
        self.keep_s = keep_s
        self.parked: dict[int, Parked] = {}
        self.early: dict[int, Notice] = {}  # notices whose parked request has not come yet
        self.gone: dict[int, float] = {}  # parked requests that left before their notice (time.monotonic())

    def __len__(self) -> int:
        return len(self.parked)

    @property
    def has_timers(self) -> bool:
        return bool(self.early or self.gone)

    def park(self, req_id: int, parked: Parked) -> Notice | None:
        """Park a request; returns its notice if that came first (the caller admits it now)."""
        notice = self.early.pop(req_id, None)
        if notice is None:
            self.parked[req_id] = parked
        return notice

    def on_notice(self, req_id: int, notice: Notice) -> tuple[Parked | None, bool]:
        """A ContextReady for `req_id`: (its parked request, to admit now; or None) and whether the
        context must be released at once (the request left already)."""
        parked = self.parked.pop(req_id, None)
        if parked is not None:
            return parked, False
        if self.gone.pop(req_id, None) is not None:
            return None, True
        self.early[req_id] = notice
        return None, False

    def leave(self, req_id: int) -> Parked | None:
        """A request leaves before its notice (cancelled, refused): its notice, if it comes, is released."""
        self.gone[req_id] = time.monotonic()
        return self.parked.pop(req_id, None)

    def expire(self, now: float | None = None) -> list[tuple[int, Notice]]:
        """Forget what is older than keep_s; returns the early notices dropped (to release)."""
        now = time.monotonic() if now is None else now
        old = [rid for rid, n in self.early.items() if now - n.at > self.keep_s]
        for rid in [rid for rid, t in self.gone.items() if now - t > self.keep_s]:
            del self.gone[rid]
        return [(rid, self.early.pop(rid)) for rid in old]

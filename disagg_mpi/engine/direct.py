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

`Parking` is the bookkeeping (pure); `ParkedGeneration` acts on it for `Handoff` (handoff.py), which
owns one: it admits a parked request when its notice comes (`Handoff.admit` with the grant), and
releases a context nobody here will use.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..api import ContextPhaseParams, Request, RequestError
from ..hops import Hop
from ..protocol import Release
from ..transfer.opaque import OpaqueStateError
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


class ParkedGeneration:
    """The generation side of the direct hand-off, for one engine's `Handoff`.

    `admit(seq, request, granted_by)` is `Handoff.admit`; `host` the engine (`HandoffHost`: finish,
    fail, metrics); `send_peer(rank, record)` sends to another leader."""

    def __init__(self, keep_s: float, admit: Callable[[Sequence, Request, int], None], host: Any,
                 send_peer: Callable[[int, object], None] | None):
        self.parking = Parking(keep_s)
        self.admit, self.host, self.send_peer = admit, host, send_peer

    def park(self, seq: Sequence, r: Request) -> None:
        """A generation-only request rank 0 sent ahead of its context: wait for its ContextReady."""
        notice = self.parking.park(seq.req_id, Parked(seq, r))
        if notice is not None:  # the notice came first
            self._admit(Parked(seq, r), notice)

    def leave(self, req_id: int) -> None:
        """A parked request was refused: its ContextReady, if it comes, is released at once."""
        self.parking.leave(req_id)

    def cancel(self, req_id: int) -> bool:
        """Cancel a parked request (it ends cancelled); False if none is parked under `req_id`."""
        if req_id not in self.parking.parked:
            return False
        parked = self.parking.leave(req_id)  # (its ContextReady, when it comes, is released at once)
        parked.seq.finish("abort")
        self.host.finish(parked.seq)
        return True

    def on_context_ready(self, gen_req_id: int, cpp: ContextPhaseParams, src: int) -> None:
        notice = Notice(cpp, src)
        parked, release = self.parking.on_notice(gen_req_id, notice)
        if release:
            self.send_peer(src, Release(cpp.req_id, gen_req_id))
        elif parked is not None:
            self._admit(parked, notice)

    def _admit(self, parked: Parked, notice: Notice) -> None:
        """The same checks as a generation-only request's (`Handoff.admit`), with the claim granted;
        a refusal (RequestError; a ValueError: forged state, too large for the pool) fails the request
        and releases the context it was granted."""
        seq = parked.seq
        self.host.metrics(seq.req_id).stamp(Hop.GEN_ADMITTED)
        try:
            self.admit(seq, dataclasses.replace(parked.request, context_phase_params=notice.cpp), notice.src)
        except (RequestError, ValueError) as err:
            self.send_peer(notice.src, Release(notice.cpp.req_id, seq.req_id))
            param = ("context_phase_params.opaque_state" if isinstance(err, OpaqueStateError)
                     else getattr(err, "param", None))
            self.host.fail(seq.req_id, str(err), param)

    def housekeeping(self) -> None:
        if self.parking.has_timers:
            for gen_req_id, n in self.parking.expire():  # a notice whose request never came: let go
                self.send_peer(n.src, Release(n.cpp.req_id, gen_req_id))

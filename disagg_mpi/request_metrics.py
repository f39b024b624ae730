"""One request's measurements (`RequestMetrics`), part of the executor API: `disagg_mpi.api`
re-exports it, and `Result.metrics` carries it from the executors to rank 0 and the caller.

Its own module because every layer fills it in (the executors, the hand-off, rank 0, the HTTP
server) and its hops come from hops.py, which the rest of the API does not need.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from .hops import Hop, check_hops


@dataclass
class RequestMetrics:
    """One request's measurements, filled in as it goes: by the executors (`executor`,
    `num_prompt_tokens`, the KV hand-off's) and by rank 0 (where each phase ran, ttft, e2e).
    Times in ms; a field stays None where its event did not happen (no context phase, no transfer).
    `hops`: where the request was when (hops.py has the table), stamped by every rank it passes."""

    ttft_ms: float | None = None  # rank 0: arrival to the first token back
    e2e_ms: float | None = None  # rank 0: arrival to the final response
    context_executor: int | None = None
    generation_executor: int | None = None
    executor: int | None = None  # the executor that sent this response
    num_prompt_tokens: int | None = None
    kv_transfer_ms: float | None = None  # generation side: claim sent to KV landed
    kv_claim_ms: float | None = None  # of it: until the context executor granted the claim
    kv_claim_answer_ms: float | None = None  # of that: until the context leader answered (one node's clocks)
    kv_transfer_bytes: int | None = None
    kv_cached_tokens: int | None = None  # prompt tokens the generation executor already cached (prefix reuse)
    hops: dict[str, float] | None = None  # hop name (hops.Hop) -> wall clock (time.time()) when passed
    sse_events: int | None = None  # HTTP, streamed: SSE events written for this choice (its final one included)
    sse_max_gap_ms: float | None = None  # of them: the longest time between two consecutive writes

    def stamp(self, hop: Hop, when: float | None = None) -> None:
        """The request passed `hop` now (or at wall-clock time `when`)."""
        if self.hops is None:
            self.hops = {}
        self.hops[hop.value] = time.time() if when is None else when

    def passed(self, hop: Hop) -> bool:
        return self.hops is not None and hop.value in self.hops

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (JSON output, the wire)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RequestMetrics:
        d = dict(d or {})
        if d.get("hops") is not None:
            d["hops"] = check_hops(d["hops"])
        return cls(**d)

    def merge(self, other: RequestMetrics, skip: tuple[str, ...] = ()) -> None:
        """Take `other`'s set fields (but `skip`); hops are added to ours (theirs win a tie)."""
        for k, v in other.to_dict().items():
            if k == "hops" and k not in skip:
                self.hops = {**(self.hops or {}), **v}
            elif k not in skip:
                setattr(self, k, v)

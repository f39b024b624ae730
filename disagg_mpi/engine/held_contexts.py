"""The hand-off's context side: answered contexts whose KV blocks are kept for their generation side.

A context-only request keeps its blocks (`Held`) until the generation executor that claimed them
has pulled them (it sends `Release`), the request is cancelled, or a lease runs out. `hold` signs
the params (`OpaqueState`: which ranks and blocks hold the KV, the layout, the prompt's digest, the
first token(s) and their logprobs, the grammar's digest) that let one generation request claim
them; `claim` refuses unknown, replayed or mismatched claims; `release` heeds only the claimant.
Where generation ranks can map our pools (CUDA IPC), `hold` also promises a time (`keep_until`)
before which none of the blocks is reused, released or not (handoff.py says why).

Direct hand-off (direct.py): a context rank 0 enqueued with a generation request to `notify` is
held already claimed by it, and its params go straight to that generation leader (`ContextReady`).

`Handoff` (handoff.py) owns one `HeldContexts` and answers the engine and the peers for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..api import CacheTransceiverConfig, ContextPhaseParams, RequestMetrics
from ..hops import Hop
from ..protocol import ContextReady
from ..transfer.cache_state import CacheState
from ..transfer.opaque import OpaqueState, prompt_digest
from .block_manager import BlockManager
from .grammar import guide_digest
from .hold_cap import check_client_hold, hold_stats
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class Held:
    """A context-only request's blocks, kept until its generation side has them."""

    seq: Sequence
    deadline: float
    since: float = 0.0  # when it was answered (time.monotonic())
    claimed_by: tuple[int, int] | None = None  # (generation leader's rank, its request id)
    keep_until: float = 0.0  # the blocks are not reused before this (time.monotonic()): see above
    released: bool = False  # released before keep_until: freed once it passes
    direct: bool = False  # claimed at hold by the generation request rank 0 named (direct hand-off)


class HeldContexts:
    """One executor's held contexts, by context request id."""

    def __init__(self, metrics: Callable[[int], RequestMetrics], blocks: BlockManager, scheduler: Scheduler,
                 group: object, config: CacheTransceiverConfig, cache_state: CacheState, key: bytes,
                 executor_id: int, world_ranks: tuple[int, ...], send_peer: Callable[[int, object], None] | None):
        self.metrics, self.blocks, self.scheduler, self.group = metrics, blocks, scheduler, group
        self.config, self.cache_state, self.key, self.executor_id = config, cache_state, key, executor_id
        self.world_ranks, self.send_peer = world_ranks, send_peer
        self.held: dict[int, Held] = {}  # answered contexts, by request id
        self.notify: dict[int, tuple[int, int]] = {}  # direct: req -> (gen leader, its req id)

    def check_client_hold(self, seq: Sequence) -> None:
        """Refuse a client context_only request beyond `max_held_fraction` of the pool (hold_cap.py)."""
        check_client_hold(seq, list(self.held.values()), self.scheduler, self.config.max_held_fraction)

    def hold_stats(self) -> dict[str, float]:
        return hold_stats(list(self.held.values()), self.blocks)

    def hold(self, seq: Sequence) -> ContextPhaseParams:
        """Keep an answered context's blocks for its generation side (lease; keep_until, see above);
        returns the signed params that let a generation executor claim them."""
        tc, now = self.config, time.monotonic()
        keep = now + tc.keep_seconds if tc.keep_seconds and getattr(self.group, "exports_ipc", False) else 0.0
        self.held[seq.req_id] = h = Held(seq, max(now + tc.lease_seconds, keep), now, keep_until=keep)
        opaque = OpaqueState(self.executor_id, self.world_ranks, seq.req_id,
                             tuple(self.blocks.block_table(seq.req_id)), len(seq.prompt_ids), self.cache_state,
                             keep, prompt_digest(seq.prompt_ids), tuple(seq.output_ids), tuple(seq.logprobs),
                             guide_digest(seq.grammar.params if seq.grammar else None))
        cpp = ContextPhaseParams(seq.req_id, list(seq.output_ids), opaque.encode(self.key))
        target = self.notify.pop(seq.req_id, None)
        if target is not None:  # direct: claimed by the request rank 0 named, which gets the params now
            # (lease + timeout: it pulls at once, or claims again, renewing this, if it waits for blocks)
            h.claimed_by, h.direct = target, True
            h.deadline = max(now + tc.lease_seconds + tc.timeout_seconds, keep)
            self.metrics(seq.req_id).stamp(Hop.CTX_READY_SENT)
            self.send_peer(target[0], ContextReady(target[1], seq.req_id, list(cpp.first_gen_tokens),
                                                   cpp.opaque_state))
        return cpp

    def forget(self, req_id: int) -> None:
        """A context-only request ends without being held: nobody is notified."""
        self.notify.pop(req_id, None)

    def claim(self, ctx_req_id: int, blocks: list[int], by: tuple[int, int]) -> str | None:
        """A generation executor asks for a context's blocks; None means granted."""
        h = self.held.get(ctx_req_id)
        if h is None or h.released:
            return (f"context request {ctx_req_id} is unknown, already served, expired or freed; "
                    "its KV cannot be transferred")
        if h.claimed_by not in (None, by):  # (its own claimant may claim again: the direct hand-off's wait)
            return f"context request {ctx_req_id} was already claimed (replayed context_phase_params)"
        if list(blocks) != self.blocks.block_table(ctx_req_id)[: len(blocks)]:
            return f"context_phase_params do not match the blocks of context request {ctx_req_id}"
        h.claimed_by = by
        h.deadline = max(time.monotonic() + self.config.timeout_seconds, h.keep_until)
        return None

    def release(self, ctx_req_id: int, by: tuple[int, int | None] | None = None) -> None:
        """Free a held context; a generation request may only release what it claimed (or nobody did).
        Before its keep_until the blocks stay allocated until then (a pull may be reading them)."""
        h = self.held.get(ctx_req_id)
        if h is None or h.released or (by is not None and h.claimed_by not in (None, by)):
            return
        if time.monotonic() < h.keep_until:
            h.released, h.deadline = True, h.keep_until
            return
        del self.held[ctx_req_id]
        self.blocks.free(ctx_req_id)

    def expire_leases(self) -> None:
        now = time.monotonic()
        for rid, h in list(self.held.items()):
            if now > h.deadline and h.released:  # released while kept: free now
                del self.held[rid]
                self.blocks.free(rid)
            elif now > h.deadline:
                log.warning("executor %d: freeing the blocks of context request %d (%s)", self.executor_id,
                            rid, "transfer timed out" if h.claimed_by is not None else "lease expired")
                self.release(rid)

"""How much of a context executor's pool contexts held for clients may take (issue 20).

A client that runs the two phases itself (HTTP `context_only`, then `generation_only`) makes the
context executor hold the prompt's KV blocks until the generation phase claims them, or for the
lease (`lease_seconds`, 120 s by default) if it never comes. Without a bound, a few orphaned
context_only requests fill the pool and every other request waits for a lease. So such holds,
with the client context_only requests queued or running that will become holds, may use at most
`max_held_fraction` of the pool; a new one beyond that is refused at once (HTTP 429 with
Retry-After), which harms nobody: it has no blocks yet and nothing waits behind it.

Refusing rather than queueing: a queued context_only request would wait on another client's
lease (up to minutes), holding a connection and a track on rank 0, for room that only a claim
or a lease frees; a refusal costs nothing and tells the client when to come back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

from ..api import RequestError

CAUSE = "held contexts awaiting their generation phase"


class HeldContextsFullError(RequestError):
    """A client context_only request does not fit the share of the pool held contexts may use now;
    `retry_after`: seconds until the soonest such hold's lease ends."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message, None)
        self.retry_after = retry_after


def cap_blocks(num_blocks: int, fraction: float) -> int:
    """Blocks that contexts held for clients may use at once."""
    return math.floor(num_blocks * fraction + 1e-9)


def check_hold(needed: int, holding: int, num_blocks: int, fraction: float, lease_ends_in: Iterable[float]
               ) -> None:
    """Refuse a client context_only request needing `needed` blocks when `holding` blocks (held for
    clients, or reserved by such requests queued or running) leave too little of the share;
    `lease_ends_in`: seconds until each such hold's lease ends."""
    cap = cap_blocks(num_blocks, fraction)
    if needed > cap:
        raise RequestError(f"the prompt needs {needed} KV blocks, but contexts held for their generation phase "
                           f"may use at most {cap} of the context executor's {num_blocks} "
                           f"(cache_transceiver_config.max_held_fraction {fraction:g}); shorten the prompt or "
                           "send the request without disaggregated_params", "input_token_ids")
    if holding + needed <= cap:
        return
    wait = retry_after(lease_ends_in)
    raise HeldContextsFullError(
        f"too many {CAUSE}: they use {holding} of the {cap} KV blocks such contexts may hold "
        f"(cache_transceiver_config.max_held_fraction {fraction:g} of {num_blocks}) and this prompt needs "
        f"{needed}; send their generation_only requests, or retry after {wait} s", wait)


def retry_after(lease_ends_in: Iterable[float]) -> int:
    """Whole seconds (at least 1) until the soonest hold's lease ends: room is certain by then
    unless others take it first (a claim may free room sooner)."""
    soonest = min(lease_ends_in, default=1.0)
    return max(1, math.ceil(soonest))


def check_client_hold(seq: Any, held: list[Any], scheduler: Any, fraction: float) -> None:
    """`check_hold` for a client context_only request (`seq`), whose blocks count from admission on:
    `held`, the executor's held contexts (held_contexts.Held); `scheduler`, its queued and running ones."""
    now, bm = time.monotonic(), scheduler.block_manager
    waiting = [h for h in held if h.seq.held_for_client and h.claimed_by is None and not h.released]
    queued = [s for q in (scheduler.waiting, scheduler.running) for s in q if s.held_for_client]
    holding = (sum(len(bm.block_table(h.seq.req_id)) for h in waiting)
               + sum(bm.blocks_needed(s.max_total_tokens) for s in queued))
    check_hold(bm.blocks_needed(seq.max_total_tokens), holding, bm.num_blocks, fraction,
               [h.deadline - now for h in waiting])


def hold_stats(held: list[Any], bm: Any) -> dict[str, float]:
    """Held contexts for /metrics: their blocks (all, and those held for clients; a block the members of
    a sample group share counts once) and the oldest one's age."""
    now = time.monotonic()
    live = [h for h in held if not h.released]

    def blocks(hs: list[Any]) -> int:
        return len({b for h in hs for b in bm.block_table(h.seq.req_id)})

    return {"held_blocks": blocks(live), "held_client_blocks": blocks([h for h in live if h.seq.held_for_client]),
            "oldest_hold_s": max((now - h.since for h in live), default=0.0)}

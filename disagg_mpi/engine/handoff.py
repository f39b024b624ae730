"""The disaggregated hand-off, both sides of it, for `LLMEngine`.

Context side (held_contexts.py): a context-only request keeps its blocks
until the generation executor that claimed them has pulled them, the request
is cancelled, or a lease runs out. Generation side: a generation-only request
(`_GenPending`) allocates blocks (sharing a cached prefix), claims the context
(the context leader refuses unknown, replayed or mismatched params), pulls
the missing blocks, then joins the batch; a transfer that does not finish in
time fails the request and releases the context.

Using a pull before the claim's answer. The context leader answers claims
between its steps, so under load the answer takes most of a prefill step
(~15 ms for an 8B model on one H100). When generation ranks can map its pools
(CUDA IPC), the context side also promises, in the signed params, a time
(`keep_until`, `keep_seconds` after the first token) before which it reuses
none of the blocks, even if they are released or the lease ends meanwhile.
A one-sided pull (same node: the same monotonic clock) seen landed before
that time read the prompt's KV, whatever the claim's answer turns out to be,
so the request joins the batch at once; the claim and the release still go
out, in that order, and a late refusal (a replay) changes nothing. A pull seen
landed later waits for the answer as before.

The direct hand-off (`direct_handoff`, direct.py): a context-only request rank 0 enqueued with a
generation request to notify is held already claimed by it, and its params go straight to that
generation leader (`ContextReady`); there the parked request is admitted with the same checks (and
the notice must come from the context leader the params name), allocates and pulls at once. If it
must wait for blocks it claims when it has them, as above (the context grants its own claimant
again), so a grant is never used long after it was given.

`Handoff` is a component the engine owns: it is given the engine's block manager, scheduler,
group and `send_peer`, keeps the hand-off's own state (`pending`, `quarantine`; the held contexts
in `contexts`), and answers the engine through `HandoffHost` (finish, fail, stream a token, a
request's metrics).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..api import (
    CacheTransceiverConfig,
    ContextPhaseParams,
    Request,
    RequestError,
    RequestMetrics,
)
from ..hops import Hop
from ..protocol import Claim, Release
from ..transfer.cache_state import CacheState
from ..transfer.opaque import OpaqueState
from ..transfer.plan import LayoutMismatchError, check_compatible
from .block_manager import BlockManager
from .direct import ParkedGeneration
from .grammar import guide_digest
from .handoff_check import check_handoff, first_logprobs
from .held_contexts import HeldContexts
from .sample_groups import PullGroups
from .scheduler import RequestTooLargeError, Scheduler
from .sequence import Sequence

# A pull is used before the claim's answer only if seen landed this long before keep_until.
_KEEP_MARGIN_S = 0.005
# ... or, when it joined on the GPU's order and its copy may still be running (ipc_path.py), this long:
# the copy (well under a millisecond) must end before keep_until, whatever the GPU's time-slicing.
_KEEP_MARGIN_UNSETTLED_S = 0.1


@dataclass
class _GenPending:
    """A generation-only request between admission and the end of its transfer."""

    seq: Sequence
    opaque: OpaqueState
    streaming: bool
    t0: float = field(default_factory=time.perf_counter)
    state: str = "alloc"  # alloc -> claiming -> pulling (an early pull starts at claiming)
    cancelled: bool = False  # a pull in flight is left to finish, then freed
    skip_blocks: int = 0  # leading blocks already cached here (prefix reuse)
    t_claimed: float = 0.0  # when the context executor granted the claim
    # Wall clocks (comparable between ranks of one node): the claim sent here, answered there.
    wall_claim: float = 0.0
    wall_answer: float | None = None
    wall_granted: float | None = None  # the grant arrived here
    # A one-sided pull (CUDA IPC from a mapped pool) starts with the claim, not after its answer;
    # the blocks are used only once the claim is granted (early_pull), and `landed` records a
    # pull that finished first, with its byte count.
    early_pull: bool = False
    landed: int | None = None
    granted: bool = False  # direct hand-off: the claim came granted with the params (no Claim to send)

    @property
    def pull_unfinished(self) -> bool:
        return self.state == "pulling" or (self.early_pull and self.landed is None)


class HandoffHost(Protocol):
    """What the hand-off asks of the engine that owns it."""

    def finish(self, seq: Sequence) -> None: ...  # answer a finished (or cancelled) sequence

    def fail(self, req_id: int, message: str, param: str | None = None) -> None: ...  # answer with an error

    def stream(self, seq: Sequence, tokens: list[int]) -> None: ...  # a streaming request's tokens

    def metrics(self, req_id: int) -> RequestMetrics: ...


class Handoff:
    """Moves a request's KV between executors, for one engine (both sides: see above)."""

    def __init__(self, host: HandoffHost, blocks: BlockManager, scheduler: Scheduler, group: object,
                 config: CacheTransceiverConfig, cache_state: CacheState, key: bytes, executor_id: int,
                 world_ranks: tuple[int, ...], send_peer: Callable[[int, object], None] | None):
        self.host, self.blocks, self.scheduler, self.group = host, blocks, scheduler, group
        self.config, self.cache_state, self.key, self.executor_id = config, cache_state, key, executor_id
        self.world_ranks, self.send_peer = world_ranks, send_peer
        # context side (held_contexts.py); the engine and the worker reach it through the methods below
        self.contexts = HeldContexts(host.metrics, blocks, scheduler, group, config, cache_state, key, executor_id,
                                     world_ranks, send_peer)
        self.held, self.notify = self.contexts.held, self.contexts.notify  # (req id -> Held; direct notices)
        self.pending: dict[int, _GenPending] = {}  # generation side: admitted, KV not in yet
        self.quarantine: set[int] = set()  # timed-out pulls whose receives may still land
        # joined, but their copy may still read the context's blocks: released once it has settled
        self.unreleased: dict[int, OpaqueState] = {}
        self.direct = ParkedGeneration(config.lease_seconds, self.admit, host, send_peer)  # (direct.py)
        # parallel sampling (sample_groups.py): a group's members pull once
        self.groups = PullGroups(scheduler, self.pending, self.quarantine, host, self._release_context, self._enqueue)

    @property
    def num_held(self) -> int:
        return len(self.held)

    @property
    def num_pending(self) -> int:
        return len(self.pending)

    @property
    def pending_tokens(self) -> int:
        """Tokens the pending generation requests will still need (they count as load), parked ones
        included (their decode: rank 0 routed them here already, and its router reads this load)."""
        return (sum(p.seq.remaining_tokens for p in self.pending.values())
                + sum(p.seq.max_tokens for p in self.direct.parking.parked.values()))

    # ---- context side (held_contexts.py) -------------------------------------

    def check_client_hold(self, seq: Sequence) -> None:
        """Refuse a client context_only request beyond `max_held_fraction` of the pool (hold_cap.py)."""
        self.contexts.check_client_hold(seq)

    def hold_stats(self) -> dict[str, float]:
        return self.contexts.hold_stats()

    def hold(self, seq: Sequence) -> ContextPhaseParams:
        """Keep an answered context's blocks for its generation side; returns its signed params."""
        return self.contexts.hold(seq)

    def forget(self, req_id: int) -> None:
        """A context-only request ends without being held: nobody is notified."""
        self.contexts.forget(req_id)

    def claim_context(self, ctx_req_id: int, blocks: list[int], by: tuple[int, int]) -> str | None:
        """A generation executor asks for a context's blocks; None means granted."""
        return self.contexts.claim(ctx_req_id, blocks, by)

    def release_context(self, ctx_req_id: int, by: tuple[int, int | None] | None = None) -> None:
        """Free a held context (only its claimant's release counts, see held_contexts.py)."""
        self.contexts.release(ctx_req_id, by)

    def cancel(self, req_id: int) -> bool:
        """Cancel a request the hand-off holds (parked, pending or held); False if it holds none such."""
        if self.direct.cancel(req_id) or self.groups.cancel(req_id):
            return True
        p = self.pending.get(req_id)
        if p is not None:
            if p.pull_unfinished:
                # Bytes are on the wire: let the pull finish, then free (see _advance_pending);
                # cancelling posted receives would leave the sender waiting forever.
                p.cancelled = True
                return True
            del self.pending[req_id]
            if p.state != "alloc":
                self.blocks.free(req_id)
            self._release_context(p.opaque, req_id)
            p.seq.finish("abort")
            self.host.finish(p.seq)
            return True
        if req_id in self.held:  # a context-only request already answered
            if not self.held[req_id].direct:  # (direct: its generation request may be pulling; rank 0
                self.release_context(req_id)  # cancels that too, and it releases the context)
            return True
        return False

    # ---- generation side ----------------------------------------------------

    def admit(self, seq: Sequence, r: Request, granted_by: int | None = None) -> None:
        """A generation-only request: check its params and wait for blocks (see _advance_pending).
        `granted_by`: the context leader that sent them granted (direct hand-off)."""
        cpp = r.context_phase_params
        if cpp is None or not cpp.first_gen_tokens:
            raise RequestError("a generation-only request needs context_phase_params with first_gen_tokens",
                               "context_phase_params")
        opaque = OpaqueState.decode(cpp.opaque_state, self.key)
        if granted_by is not None and granted_by != opaque.world_ranks[0]:
            raise RequestError(f"rank {granted_by} sent params of context executor {opaque.executor_id}, whose "
                               f"leader is rank {opaque.world_ranks[0]}", "context_phase_params")
        # Refusals leave the context's KV alone: the genuine request may still come (or its lease ends).
        check_handoff(cpp, opaque, seq.prompt_ids, guide_digest(seq.grammar.params if seq.grammar else None))
        self._check_generation(seq, opaque)
        seq.output_ids = [int(opaque.first_tokens[0])]
        seq.logprobs = first_logprobs(seq.num_logprobs, opaque)
        if seq.grammar is not None:  # the matcher's state: replayed from the first token, nothing carried
            seq.grammar.follow(seq.output_ids)
        seq.num_computed_tokens = len(seq.prompt_ids)
        if seq.check_stop(seq.output_ids[0]) is not None:
            seq.finish(seq.check_stop(seq.output_ids[0]))
            self._release_context(opaque, seq.req_id)
            self.host.finish(seq)
            return
        if not self.groups.follow(seq, opaque, r.streaming, granted_by is not None):
            self._enqueue(seq, opaque, r.streaming, granted_by is not None)

    def _enqueue(self, seq: Sequence, opaque: OpaqueState, streaming: bool, granted: bool) -> None:
        self.pending[seq.req_id] = p = _GenPending(seq, opaque, streaming, granted=granted)
        if p.granted:  # use the grant now, or claim as usual once blocks are free (see above)
            p.granted = self._allocate(p)

    def _check_generation(self, seq: Sequence, opaque: OpaqueState) -> None:
        try:
            check_compatible(opaque.cache_state, self.cache_state)
        except LayoutMismatchError as err:
            raise RequestError(str(err)) from None
        needed = self.blocks.blocks_needed(seq.max_total_tokens)
        if needed > self.blocks.num_blocks:
            raise RequestTooLargeError(f"request needs {needed} KV blocks but the pool has "
                                       f"{self.blocks.num_blocks}")

    def _advance_pending(self) -> None:
        for p in list(self.pending.values()):
            if p.state == "alloc" and self._allocate(p):
                self.send_peer(p.opaque.world_ranks[0], Claim(p.opaque.ctx_req_id, p.seq.req_id,
                                                              list(p.opaque.block_ids), self.executor_id))
                # A pull that needs nothing from the context ranks overlaps the claim's round trip
                # (under load that is mostly the context executor finishing its step). Reading
                # blocks the claim then refuses is harmless: they are only written here, and the
                # request fails without using them.
                if getattr(self.group, "can_pull_unclaimed", lambda _o: False)(p.opaque):
                    p.early_pull = True
                    self._start_pull(p)
        for req_id, nbytes, _ in self.group.poll_transfers():
            if req_id in self.quarantine:  # a timed-out pull finally landed: its blocks are safe to reuse
                self.quarantine.discard(req_id)
                self.blocks.free(req_id)
                continue
            p = self.pending.get(req_id)
            if p is None:
                continue
            if p.state == "claiming":  # an early pull landed before the claim's answer
                margin = _KEEP_MARGIN_UNSETTLED_S if self.group.unsettled(req_id) else _KEEP_MARGIN_S
                if time.monotonic() < p.opaque.keep_until - margin:   # and the KV is good
                    del self.pending[req_id]
                    self._pulled(p, nbytes)
                    continue
                p.landed = nbytes
                continue
            del self.pending[req_id]
            self._pulled(p, nbytes)

    def _allocate(self, p: _GenPending) -> bool:
        """Allocate a pending request's blocks if they are free (False: not yet); a granted one starts
        pulling at once, the others go on to claim. Prefix reuse: blocks this executor already caches
        need no transfer (only when block sizes match, so a shared block is never rewritten)."""
        prompt = (p.seq.prompt_ids if self.blocks.enable_prefix_reuse
                  and p.opaque.cache_state.block_size == self.blocks.block_size else None)
        if not self.blocks.can_allocate(p.seq.max_total_tokens, prompt):
            return False
        self.blocks.allocate(p.seq.req_id, p.seq.max_total_tokens, prompt)
        p.skip_blocks = self.blocks.num_cached_tokens(p.seq.req_id) // self.blocks.block_size
        p.t0, p.wall_claim = time.perf_counter(), time.time()
        p.state = "claiming"
        if p.granted:  # (hops: claim_sent = claim_granted, the pull's start; kv_claim_ms 0)
            p.state, p.t_claimed, p.wall_granted, p.wall_answer = "pulling", p.t0, p.wall_claim, p.wall_claim
            self._start_pull(p)
        return True

    def _start_pull(self, p: _GenPending) -> None:
        opaque, table, k = p.opaque, self.blocks.block_table(p.seq.req_id), p.skip_blocks
        if k:  # pull only the blocks this executor does not cache: a smaller request, block for block
            opaque = dataclasses.replace(opaque, block_ids=opaque.block_ids[k:],
                                         num_tokens=opaque.num_tokens - k * self.blocks.block_size)
        self.group.start_pull(p.seq.req_id, opaque, table[k:])

    def _pulled(self, p: _GenPending, nbytes: int) -> None:
        """The KV is in, and the claim granted or the pull landed before keep_until: the request joins
        the batch (or ends, if cancelled)."""
        req_id = p.seq.req_id
        self._release_context(p.opaque, req_id)
        if p.cancelled:
            self.blocks.free(req_id)
            p.seq.finish("abort")
            self.host.finish(p.seq)
            return
        m = self.host.metrics(req_id)
        m.stamp(Hop.CLAIM_SENT, p.wall_claim)
        if p.wall_granted is not None:  # (none: used on the context's keep_until promise, see above)
            m.stamp(Hop.CLAIM_GRANTED, p.wall_granted)
        m.stamp(Hop.KV_LANDED)
        m.kv_transfer_ms = (time.perf_counter() - p.t0) * 1e3
        if p.t_claimed:  # (no answer yet: used on the context's keep_until promise)
            m.kv_claim_ms = (p.t_claimed - p.t0) * 1e3   # the part spent waiting for the claim's answer
        if p.wall_answer is not None:  # of which: until the context leader answered (one node: same clock)
            m.kv_claim_answer_ms = (p.wall_answer - p.wall_claim) * 1e3
        m.kv_transfer_bytes = nbytes
        m.kv_cached_tokens = p.skip_blocks * self.blocks.block_size
        self.blocks.commit_full_blocks(req_id, p.seq.prompt_ids)
        self.scheduler.add_prefilled(p.seq)
        if p.streaming:
            self.host.stream(p.seq, [p.seq.output_ids[0]])

    def _expire_transfers(self) -> None:
        """A transfer that does not finish in time fails its request; neither side waits forever."""
        limit = self.config.timeout_seconds
        now = time.perf_counter()
        for p in list(self.pending.values()):
            if p.state == "alloc" or now - p.t0 <= limit:
                continue
            self._release_context(p.opaque, p.seq.req_id)
            # Receives posted into its blocks: keep them until the bytes land.
            self._drop_pending(p, f"the KV transfer from context executor {p.opaque.executor_id} did not "
                                  f"complete within {limit:g} s (cache_transceiver_config.timeout_seconds)",
                               p.pull_unfinished and self.group.pull_in_flight(p.seq.req_id))

    def _drop_pending(self, p: _GenPending, error: str, pull_writing: bool, param: str | None = None) -> None:
        """End a pending request that gets no KV: it ends cancelled or with `error`; its blocks are
        freed now, or once a pull still writing into them lands (`pull_writing`)."""
        req_id = p.seq.req_id
        del self.pending[req_id]
        if pull_writing:
            self.quarantine.add(req_id)
        else:
            self.blocks.free(req_id)
        if p.cancelled:
            p.seq.finish("abort")
            self.host.finish(p.seq)
        else:
            self.host.fail(req_id, error, param)

    def on_claim_reply(self, gen_req_id: int, error: str | None, answered_at: float | None = None) -> None:
        """The context leader's answer to our claim (`answered_at`: its wall clock when it answered)."""
        p = self.pending.get(gen_req_id)
        if p is None or p.state != "claiming":
            return
        p.wall_answer = answered_at
        if error:  # (an early pull may still write into the blocks)
            self._drop_pending(p, error, p.pull_unfinished, "context_phase_params")  # (a replay, most likely)
            return
        p.t_claimed, p.wall_granted = time.perf_counter(), time.time()
        if p.landed is not None:  # the early pull is already in
            del self.pending[gen_req_id]
            self._pulled(p, p.landed)
            return
        p.state = "pulling"
        if not p.early_pull:
            self._start_pull(p)

    def _release_context(self, opaque: OpaqueState, gen_req_id: int) -> None:
        """Tell the context leader it may free; it heeds only the request that claimed (or, before
        any claim, anyone): a refused replay on this same executor must not free another's blocks.
        A copy that may still read them (a GPU-ordered join) holds the release until it has settled."""
        if self.group.unsettled(gen_req_id):
            self.unreleased[gen_req_id] = opaque
            return
        self.send_peer(opaque.world_ranks[0], Release(opaque.ctx_req_id, gen_req_id))

    def _release_settled(self) -> None:
        for req_id, opaque in list(self.unreleased.items()):
            if not self.group.unsettled(req_id):
                del self.unreleased[req_id]
                self._release_context(opaque, req_id)

    def housekeeping(self) -> None:
        """Timers and transfer completions; cheap, called every loop turn even when idle."""
        if self.pending or self.quarantine:
            self._advance_pending()
            self._expire_transfers()
        if self.unreleased:
            self._release_settled()
        self.groups.tick()
        if self.held:
            self.contexts.expire_leases()
        self.direct.housekeeping()

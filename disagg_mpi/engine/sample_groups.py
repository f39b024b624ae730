"""Parallel sampling on an executor: the members of a sample group (n choices or best_of candidates
of one prompt, `Request.sample_group`) compute the prompt once and share its KV blocks.

Where the prompt is computed (aggregated or context-only), `PrefillGroups`: the first member to
arrive leads. It is held back until every member is here (rank 0 sends them back to back, to this
executor: orchestrator/sample_routes.py), at most `GRACE_S`, then scheduled as usual. When the
scheduler takes its last prompt chunk, the members that came join that step (`Scheduler.fork`):
they share its prompt blocks by reference, compute nothing, and sample their first token from its
logits row with their own seed, so each gives the tokens it would give alone (the sampler is keyed
by (seed, position): sampler.py). An aggregated member copies the partial last prompt block before
it writes its own tokens (copy on write); a context-only member writes nothing, and is held over
its leader's very blocks, so every member's params name the same blocks.

Where the KV is pulled (generation-only), `PullGroups`: the first member admitted pulls; the others
wait until its KV landed, then fork its blocks (`Scheduler.fork`, copying the partial last block)
and release their own context unpulled: the prompt's KV crosses once. A member forks only the KV
its own signed params name: the same context executor, prompt and blocks as its leader's.

Each member stays a request of its own: cancelling or failing one ends it alone, and a member that
cannot share runs alone, as it would without a group: one that comes late (its leader's prompt was
computed, or it ended), that finds no room to fork (blocks, batch slots), or whose leader was
cancelled, failed or timed out before the prompt's KV was there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..hops import Hop
from .logprobs import NOT_ASKED
from .scheduler import Scheduler
from .sequence import Sequence

# How long a leader waits for the rest of its group. Rank 0 sends them within microseconds; this only
# bounds the wait for members that never come (one refused or cancelled at rank 0 meanwhile).
GRACE_S = 0.25
_FORGET_S = 10.0  # a computed group is kept this long for its late members (they then run alone)


def _groupable(seq: Sequence) -> bool:
    """A prompt whose logprobs are asked is computed per request (each answer carries them)."""
    g = seq.group
    return g is not None and g.count > 1 and seq.num_prompt_logprobs == NOT_ASKED and not seq.fake_context


@dataclass
class _Group:
    leader: Sequence
    count: int  # members expected (less those cancelled before they joined)
    deadline: float  # the leader waits no longer for the others (time.monotonic())
    arrived: int = 1
    followers: list[Sequence] = field(default_factory=list)
    scheduled: bool = False  # the leader is in the scheduler
    done: bool = False  # the leader's last prompt chunk was scheduled, or nobody is left: late members run alone


class PrefillGroups:
    """The compute side (see above), for one engine; `stats` gets "forked_prefills"."""

    def __init__(self, scheduler: Scheduler, stats: dict[str, Any]):
        self.scheduler, self.stats = scheduler, stats
        self._groups: dict[int, _Group] = {}
        self._of: dict[int, int] = {}  # req_id of a leader or a follower not forked yet -> group key
        stats.setdefault("forked_prefills", 0)

    @property
    def num_held(self) -> int:
        return sum(len(g.followers) + (not g.scheduled) for g in self._groups.values())

    def admit(self, seq: Sequence) -> bool:
        """Take `seq` into its group (True), or leave it to run alone (False: the caller schedules it).
        RequestTooLargeError as Scheduler.add."""
        if not _groupable(seq):
            return False
        key, grp = seq.group.key, self._groups.get(seq.group.key)
        self.scheduler.check_fits(seq)
        if grp is None:
            self._groups[key] = _Group(seq, seq.group.count, time.monotonic() + GRACE_S)
            self._of[seq.req_id] = key
            return True
        grp.arrived += 1
        joins = not grp.done and grp.leader.prompt_ids == seq.prompt_ids and grp.leader.keep_blocks == seq.keep_blocks
        if joins:
            grp.followers.append(seq)
            self._of[seq.req_id] = key
        if grp.arrived >= grp.count and not grp.scheduled:
            self._schedule(grp)
        return joins

    def on_step(self, step: Any) -> None:
        """Fork the followers of each leader whose last prompt chunk `step` computes into it."""
        if not self._of:
            return
        for seq, n in list(step.items):
            grp = self._groups.get(self._of.get(seq.req_id, -1))
            if grp is None or grp.leader is not seq or seq.num_computed_tokens + n < seq.num_prompt_tokens:
                continue
            grp.done = True
            del self._of[seq.req_id]
            for f in grp.followers:
                del self._of[f.req_id]
                if self.scheduler.fork(f, seq, step):
                    self.stats["forked_prefills"] += 1
                else:
                    self.scheduler.add(f)
            grp.followers = []

    def tick(self) -> None:
        """Schedule the leaders whose group is complete or whose wait is over; a leader that ended
        before its prompt was computed hands the lead to a follower; forget old groups."""
        now = time.monotonic()
        for key, grp in list(self._groups.items()):
            if not grp.scheduled and (now >= grp.deadline or grp.arrived >= grp.count):
                self._schedule(grp)
            if grp.scheduled and not grp.done and grp.leader.status.is_finished:  # cancelled, or failed
                self._of.pop(grp.leader.req_id, None)
                if grp.followers:
                    grp.leader = grp.followers.pop(0)
                    self.scheduler.add(grp.leader)
                else:
                    grp.done = True
            if grp.done and (grp.arrived >= grp.count or now > grp.deadline + _FORGET_S):
                del self._groups[key]

    def cancel(self, req_id: int) -> Sequence | None:
        """Take out a member this holds (not one in the scheduler): the cancelled sequence, or None."""
        key = self._of.get(req_id)
        grp = self._groups.get(key) if key is not None else None
        if grp is None or (grp.leader.req_id == req_id and grp.scheduled):
            return None  # (a scheduled leader is aborted by the scheduler; tick sees it)
        del self._of[req_id]
        grp.count, grp.arrived = grp.count - 1, grp.arrived - 1
        if grp.leader.req_id == req_id:
            seq = grp.leader
            if grp.followers:
                grp.leader = grp.followers.pop(0)
            else:
                del self._groups[key]
        else:
            seq = next(f for f in grp.followers if f.req_id == req_id)
            grp.followers.remove(seq)
        if key in self._groups and grp.arrived >= grp.count and not grp.scheduled:
            self._schedule(grp)
        seq.finish("abort")
        return seq

    def _schedule(self, grp: _Group) -> None:
        grp.scheduled = True
        self.scheduler.add(grp.leader)


@dataclass
class _Waiting:
    """A generation-only member waiting for its leader's KV."""

    seq: Sequence
    opaque: Any  # transfer.opaque.OpaqueState, checked
    streaming: bool
    granted: bool  # its context came granted (direct hand-off): see Handoff.admit


@dataclass
class _Pulling:
    leader: Sequence
    opaque: Any
    waiting: list[_Waiting] = field(default_factory=list)


def same_kv(a: Any, b: Any, prompt_len: int) -> bool:
    """Whether two checked params name the same prompt KV: one context executor, its same blocks."""
    n = -(-prompt_len // a.cache_state.block_size)
    return (a.executor_id == b.executor_id and a.prompt_digest == b.prompt_digest and a.num_tokens == b.num_tokens
            and tuple(a.block_ids[:n]) == tuple(b.block_ids[:n]) and len(a.block_ids) >= n)


class PullGroups:
    """The generation side (see above), for `Handoff`, which owns one and gives it: its scheduler, its
    `pending` requests and `quarantine` (whether a leader's pull is under way, or failed), `release`
    (a context nobody will pull), `alone` (a member that pulls after all), and the engine (`host`)."""

    def __init__(self, scheduler: Scheduler, pending: dict, quarantine: set, host: Any,
                 release: Callable[[Any, int], None], alone: Callable[[Sequence, Any, bool, bool], None]):
        self.scheduler, self.pending, self.quarantine, self.host = scheduler, pending, quarantine, host
        self.release, self.alone = release, alone
        self._groups: dict[int, _Pulling] = {}

    def follow(self, seq: Sequence, opaque: Any, streaming: bool, granted: bool) -> bool:
        """A generation-only request whose params checked out: True if it waits for its group's leader
        here; False: it pulls (it leads, or cannot share)."""
        if seq.group is None or seq.group.count <= 1:
            return False
        grp = self._groups.get(seq.group.key)
        if grp is None:
            self._groups[seq.group.key] = _Pulling(seq, opaque)
            return False
        if self._state(grp.leader) == "gone" or grp.leader.prompt_ids != seq.prompt_ids or not same_kv(grp.opaque, opaque, len(seq.prompt_ids)):
            return False
        grp.waiting.append(_Waiting(seq, opaque, streaming, granted))
        return True

    def tick(self) -> None:
        """Fork the waiting members of leaders whose KV landed; let those of leaders gone pull alone."""
        for key, grp in list(self._groups.items()):
            state = self._state(grp.leader)
            if state == "pending":
                continue
            waiting, grp.waiting = grp.waiting, []
            for w in waiting:
                if state == "landed" and self.scheduler.fork(w.seq, grp.leader):
                    self._forked(w)
                else:
                    self.alone(w.seq, w.opaque, w.streaming, w.granted)
            if state == "gone":
                del self._groups[key]

    def cancel(self, req_id: int) -> bool:
        for grp in self._groups.values():
            for w in grp.waiting:
                if w.seq.req_id == req_id:
                    grp.waiting.remove(w)
                    self.release(w.opaque, req_id)
                    w.seq.finish("abort")
                    self.host.finish(w.seq)
                    return True
        return False

    def _state(self, leader: Sequence) -> str:
        """'pending' (its pull is under way), 'landed' (its prompt's KV is in its blocks) or 'gone'."""
        p = self.pending.get(leader.req_id)
        if p is not None:
            return "gone" if p.cancelled else "pending"
        bm = self.scheduler.block_manager
        if leader.status.is_finished or not bm.has_blocks(leader.req_id) or leader.req_id in self.quarantine:
            return "gone"
        return "landed"

    def _forked(self, w: _Waiting) -> None:
        """Its prompt's KV is its leader's: the context it was promised is not pulled, but released."""
        self.release(w.opaque, w.seq.req_id)
        m = self.host.metrics(w.seq.req_id)
        m.stamp(Hop.KV_LANDED)
        m.kv_transfer_bytes, m.kv_cached_tokens = 0, len(w.seq.prompt_ids)
        if w.streaming:
            self.host.stream(w.seq, [w.seq.output_ids[0]])

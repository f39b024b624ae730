"""Parallel sampling's pieces without MPI: the block fork, the forked step's inputs, the group
bookkeeping, rank 0's routes, and the HTTP API's groups (tests/mpi/test_sample_groups.py runs it all)."""

from __future__ import annotations

import pytest

from disagg_mpi.api import Request, RequestError
from disagg_mpi.engine import sample_groups
from disagg_mpi.engine.block_manager import BlockManager, OutOfBlocksError
from disagg_mpi.engine.sample_groups import PrefillGroups
from disagg_mpi.engine.scheduler import ScheduledStep, Scheduler
from disagg_mpi.engine.sequence import Sequence, SequenceStatus
from disagg_mpi.engine.step_isolation import retry_alone
from disagg_mpi.model.tokenizer import Tokenizer
from disagg_mpi.orchestrator.admission import ModelLimits, check_request
from disagg_mpi.orchestrator.sample_routes import SampleRoutes
from disagg_mpi.sample_group import SampleGroup
from disagg_mpi.serve.protocol import parse_completion

PROMPT = list(range(10, 20))  # 10 tokens: 2 full blocks of 4 and a partial one


def seqs(n: int, max_tokens: int = 3, count: int | None = None, prompt=PROMPT) -> list[Sequence]:
    out = []
    for j in range(n):
        s = Sequence(100 + j, list(prompt), max_tokens)
        s.group = SampleGroup(7, j, count or n)
        out.append(s)
    return out


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(16, 4)
    parent = bm.allocate(1, 13)  # prompt 10 + 3 outputs
    copies = bm.fork(2, 1, 10, 13)
    child = bm.block_table(2)
    assert child[:2] == parent[:2] and child[2] not in parent and len(child) == 4
    assert copies == [(parent[2], child[2])]
    assert bm.num_free == 16 - 4 - 2
    bm.free(1)
    bm.free(2)
    assert bm.num_free == 16 - 2  # the copy's two blocks stay pinned until it ran
    bm.unpin([b for c in copies for b in c])
    bm.check_full()


def test_fork_of_a_context_only_request_shares_every_block_and_copies_nothing():
    bm = BlockManager(16, 4)
    parent = bm.allocate(1, 11)  # context-only: prompt + its first token
    assert bm.fork(2, 1, 10, 11, share_tail=True) == []
    assert bm.block_table(2) == parent and bm.num_free == 13
    bm.free(1)
    assert bm.num_free == 13
    bm.free(2)
    bm.check_full()
    parent = bm.allocate(1, 9)  # a prompt of two full blocks: the block of its first token is shared too
    assert bm.fork(2, 1, 8, 9, share_tail=True) == [] and bm.block_table(2) == parent


def test_fork_without_room_takes_nothing():
    bm = BlockManager(6, 4)
    bm.allocate(1, 13)
    with pytest.raises(OutOfBlocksError):
        bm.fork(2, 1, 10, 30)
    assert not bm.has_blocks(2) and bm.num_free == 2


def test_forked_sequence_samples_its_leaders_row_and_copies_before_it_writes():
    sched = Scheduler(BlockManager(32, 4), max_batch_size=4, max_num_tokens=64)
    groups = PrefillGroups(sched, {})
    leader, follower = seqs(2)
    assert groups.admit(leader) and groups.admit(follower)  # complete: the leader is scheduled
    step = sched.schedule()
    groups.on_step(step)
    assert [(s.req_id, n) for s, n in step.items] == [(100, 10), (101, 0)]
    inp = sched.make_step_inputs(step)
    assert len(inp.input_ids) == 10 and inp.sample_indices == [9, 9] and inp.sample_req_ids == [100, 101]
    assert inp.block_copies == []  # the leader writes its last prompt block in this step
    sched.update(step, {100: 5, 101: 6})
    assert leader.output_ids == [5] and follower.output_ids == [6] and follower.num_computed_tokens == 10
    step = sched.schedule()
    inp = sched.make_step_inputs(step)
    lt, ft = sched.block_manager.block_table(100), sched.block_manager.block_table(101)
    assert inp.block_copies == [[lt[2], ft[2]]] and ft[:2] == lt[:2]
    assert inp.input_ids == [5, 6] and inp.positions == [10, 10]
    sched.update(step, {100: 5, 101: 6})
    assert sched.copies == [] and groups.stats["forked_prefills"] == 1
    while sched.has_work():
        step = sched.schedule()
        sched.update(step, {r: 1 for r in sched.make_step_inputs(step).sample_req_ids})
    sched.block_manager.check_full()


def test_leader_waits_for_its_group_then_alone_after_the_grace(monkeypatch):
    sched = Scheduler(BlockManager(32, 4), max_batch_size=4, max_num_tokens=64)
    groups = PrefillGroups(sched, {})
    leader, follower, _ = seqs(3)
    assert groups.admit(leader) and groups.admit(follower)
    groups.tick()
    assert not sched.has_work() and groups.num_held == 2  # the third member is awaited
    monkeypatch.setattr(sample_groups, "GRACE_S", 0.0)
    groups._groups[7].deadline = 0.0
    groups.tick()
    assert list(sched.waiting) == [leader]


def test_cancelled_leader_hands_the_lead_to_a_follower():
    sched = Scheduler(BlockManager(32, 4), max_batch_size=4, max_num_tokens=64)
    groups = PrefillGroups(sched, {})
    a, b, c = seqs(3)
    for s in (a, b, c):
        assert groups.admit(s)
    sched.abort(100)  # the scheduled leader is cancelled before its prompt was computed
    groups.tick()
    assert list(sched.waiting) == [b]
    step = sched.schedule()
    groups.on_step(step)
    assert [(s.req_id, n) for s, n in step.items] == [(101, 10), (102, 0)]
    assert groups.cancel(101) is None  # (in the scheduler: it aborts there)
    assert a.status is SequenceStatus.FINISHED_ABORTED


def test_late_or_different_member_runs_alone():
    sched = Scheduler(BlockManager(32, 4), max_batch_size=4, max_num_tokens=64)
    groups = PrefillGroups(sched, {})
    a, b, c = seqs(3)
    assert groups.admit(a) and groups.admit(b)
    other = seqs(1, count=3, prompt=PROMPT[:-1])[0]
    assert not groups.admit(other)  # same key, another prompt: never shares
    groups.on_step(sched.schedule())
    assert not groups.admit(c)  # after its leader's prompt was computed


def test_a_forked_member_is_retried_with_its_leader():
    sched = Scheduler(BlockManager(32, 4), max_batch_size=4, max_num_tokens=64)
    groups = PrefillGroups(sched, {})
    a, b = seqs(2)
    assert groups.admit(a) and groups.admit(b)
    step = sched.schedule()
    groups.on_step(step)
    calls = []

    def run(one: ScheduledStep):
        calls.append([s.req_id for s, _ in one.items])
        inp = sched.make_step_inputs(one)
        return dict.fromkeys(inp.sample_req_ids, 1)

    survivors, sampled, failed = retry_alone(step, run)
    assert len(survivors) == 2
    assert calls == [[100, 101]] and sampled == {100: 1, 101: 1} and not failed


def test_members_route_where_the_first_went():
    routes, picks = SampleRoutes(), iter([3, 4, 5])
    g = [SampleGroup(9, j, 3) for j in range(3)]
    assert [routes.pick(m, "gen", [3, 4, 5], lambda: next(picks)) for m in g] == [3, 3, 3]
    assert routes.pick(None, "gen", [3, 4, 5], lambda: next(picks)) == 4
    assert routes._routes == {}  # every member routed: nothing kept


def test_http_n_and_best_of_make_one_group_per_prompt():
    tok = Tokenizer.bytes_only(1024)
    p = parse_completion({"prompt": ["ab", "cd"], "n": 2, "best_of": 3, "seed": 5}, tok, ("m",), 1024)
    groups = [r.sample_group for r in p.requests]
    assert [(g.index, g.count) for g in groups] == [(0, 3), (1, 3), (2, 3)] * 2
    assert len({g.key for g in groups[:3]}) == 1 and groups[0].key != groups[3].key
    assert parse_completion({"prompt": "ab"}, tok, ("m",), 1024).request.sample_group is None


def test_admission_names_a_bad_group_and_the_wire_keeps_a_good_one():
    assert Request.from_dict(Request([1], sample_group=SampleGroup(2**62, 1, 3)).to_dict()).sample_group == \
        SampleGroup(2**62, 1, 3)
    r = Request([1, 2], sample_group=SampleGroup(1, 3, 3))
    with pytest.raises(RequestError, match="sample_group.index=3") as err:
        check_request(r, ModelLimits(1024, 64))
    assert err.value.param == "sample_group"


class _Host:
    """The engine as PullGroups sees it: what it was asked to do."""

    def __init__(self):
        self.finished, self.streamed, self.m = [], [], {}

    def finish(self, seq):
        self.finished.append(seq.req_id)

    def stream(self, seq, tokens):
        self.streamed.append((seq.req_id, tokens))

    def metrics(self, req_id):
        from disagg_mpi.api import RequestMetrics

        return self.m.setdefault(req_id, RequestMetrics())


def _opaque(blocks=(5, 6, 7), ctx_req=1):
    from types import SimpleNamespace

    return SimpleNamespace(executor_id=0, prompt_digest=b"d", num_tokens=10, block_ids=blocks, ctx_req_id=ctx_req,
                           cache_state=SimpleNamespace(block_size=4))


def _pull_side(n=3):
    from disagg_mpi.engine.sample_groups import PullGroups

    sched = Scheduler(BlockManager(32, 4), max_batch_size=4, max_num_tokens=64)
    pending, released, alone, host = {}, [], [], _Host()
    groups = PullGroups(sched, pending, set(), host, lambda o, rid: released.append(rid),
                        lambda seq, o, streaming, granted: alone.append(seq.req_id))
    members = seqs(n)
    for s in members:
        s.output_ids, s.num_computed_tokens = [4], len(PROMPT)
    return sched, groups, pending, released, alone, host, members


def test_pulled_once_then_forked():
    from types import SimpleNamespace

    sched, groups, pending, released, alone, host, (a, b, c) = _pull_side()
    assert not groups.follow(a, _opaque(), True, True)  # the first pulls
    pending[a.req_id] = SimpleNamespace(cancelled=False)
    assert groups.follow(b, _opaque(), True, True) and groups.follow(c, _opaque(), False, True)
    groups.tick()
    assert released == [] and not sched.has_work()  # the leader's pull is under way
    del pending[a.req_id]  # it landed: the leader joins the batch with its blocks
    sched.block_manager.allocate(a.req_id, a.max_total_tokens)
    sched.add_prefilled(a)
    groups.cancel(c.req_id)
    groups.tick()
    assert released == [c.req_id, b.req_id] and host.finished == [c.req_id] and alone == []
    assert list(sched.ready) == [a, b] and b.fork_of == a.req_id
    assert host.m[b.req_id].kv_transfer_bytes == 0 and host.m[b.req_id].kv_cached_tokens == len(PROMPT)
    assert host.streamed == [(b.req_id, [4])]
    lt, bt = sched.block_manager.block_table(a.req_id), sched.block_manager.block_table(b.req_id)
    assert sched.copies == [(lt[2], bt[2])] and bt[:2] == lt[:2]


def test_members_pull_alone_when_the_leader_is_gone_or_their_kv_differs():
    from types import SimpleNamespace

    sched, groups, pending, released, alone, _, (a, b, c) = _pull_side()
    groups.follow(a, _opaque(), False, False)
    pending[a.req_id] = SimpleNamespace(cancelled=False)
    assert not groups.follow(c, _opaque(blocks=(5, 6, 9), ctx_req=3), False, False)  # other blocks: its own KV
    assert groups.follow(b, _opaque(), False, False)
    pending[a.req_id].cancelled = True  # the leader is cancelled while its pull is on the wire
    groups.tick()
    assert alone == [b.req_id] and released == [] and not sched.has_work()

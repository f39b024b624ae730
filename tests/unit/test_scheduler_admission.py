"""Admission to the scheduler: first come first served, or a request that fits passing one that
does not (bounded by max_bypass and max_bypass_s, unbounded while blocks are held outside it),
too large requests refused, aborts from any queue."""

from __future__ import annotations

import pytest

from disagg_mpi.engine.scheduler import RequestTooLargeError, may_pass
from disagg_mpi.engine.sequence import SequenceStatus
from tests.unit.scheduler_steps import make_sched, make_seq, run_step


def test_admission_waits_for_blocks_fcfs_when_bypass_is_off():
    # 6 blocks of 4: a takes 4 blocks, b needs 3 and must wait; c (1 block) must not overtake.
    sched = make_sched(num_blocks=6, block_size=4, max_num_tokens=32, max_bypass=0)
    a, b, c = make_seq(0, 12, max_tokens=4), make_seq(1, 8, max_tokens=4), make_seq(2, 1, 1)
    for s in (a, b, c):
        sched.add(s)
    step, _ = run_step(sched)
    assert [s.req_id for s, _ in step.items] == [0]
    assert b.status is SequenceStatus.WAITING and c.status is SequenceStatus.WAITING
    while a.status is SequenceStatus.RUNNING:
        run_step(sched)
    step, _ = run_step(sched)
    assert [s.req_id for s, _ in step.items] == [1, 2]


def test_a_request_that_fits_passes_one_that_does_not():
    # The same queue with bypass on: c fits beside a and runs at once; b still gets its turn.
    sched = make_sched(num_blocks=6, block_size=4, max_num_tokens=32)
    a, b, c = make_seq(0, 12, max_tokens=4), make_seq(1, 8, max_tokens=4), make_seq(2, 1, 1)
    for s in (a, b, c):
        sched.add(s)
    step, _ = run_step(sched)
    assert [s.req_id for s, _ in step.items] == [0, 2]
    assert b.status is SequenceStatus.WAITING and b.bypassed == 1
    while sched.has_work():
        run_step(sched)
    assert b.status is SequenceStatus.FINISHED_LENGTH
    sched.block_manager.check_full()


def _stream_of_small(sched, first_id, n):
    """Queue n one-block requests, run one step; the ids it admitted."""
    for r in range(first_id, first_id + n):
        sched.add(make_seq(r, 1, 1))
    step, _ = run_step(sched)
    return [s.req_id for s, _ in step.items if s.req_id >= first_id]


def _b_waits_behind_a(**bypass):
    """a runs (4 of 6 blocks); b (3 blocks) is queued and cannot fit: (scheduler, b)."""
    sched = make_sched(num_blocks=6, block_size=4, max_num_tokens=32, max_batch_size=8, **bypass)
    a, b = make_seq(0, 12, max_tokens=8), make_seq(1, 8, max_tokens=4)
    sched.add(a)
    run_step(sched)
    sched.add(b)
    return sched, b


def test_bypass_stops_after_max_bypass_passes():
    # a runs (4 of 6 blocks); b (3 blocks) waits; small ones may pass it twice, then wait behind it.
    sched, b = _b_waits_behind_a(max_bypass=2)
    assert _stream_of_small(sched, 10, 1) == [10]
    assert _stream_of_small(sched, 20, 1) == [20]
    assert b.bypassed == 2
    assert _stream_of_small(sched, 30, 1) == []  # the queue now stops behind b
    order = []  # requests in the order they first ran
    while sched.has_work():
        step, _ = run_step(sched)
        order += [s.req_id for s, _ in step.items if s.req_id not in order]
    assert order.index(1) < order.index(30)  # b went first


def test_bypass_stops_once_the_blocked_request_waited_max_bypass_s():
    sched, b = _b_waits_behind_a(max_bypass_s=0.05)
    assert _stream_of_small(sched, 10, 1) == [10]
    b.arrival_time -= 1.0  # it has waited longer than max_bypass_s
    assert _stream_of_small(sched, 20, 1) == []


def test_a_request_waiting_for_held_blocks_never_stops_the_queue():
    # 6 blocks, 4 held outside the scheduler (an answered context awaiting its generation phase):
    # b (3 blocks) cannot fit until the hold ends, so small requests keep passing it, past any bound.
    sched = make_sched(num_blocks=6, block_size=4, max_num_tokens=32, max_batch_size=8, max_bypass=1,
                       max_bypass_s=0.0)
    sched.block_manager.allocate(99, 16)  # the hold
    b = make_seq(1, 8, max_tokens=4)
    sched.add(b)
    for first in (10, 20, 30):
        assert _stream_of_small(sched, first, 1) == [first]
    assert b.bypassed == 3
    sched.block_manager.free(99)  # the lease ended
    while sched.has_work():
        run_step(sched)
    assert b.status is SequenceStatus.FINISHED_LENGTH


@pytest.mark.parametrize("bypassed, waited, need, drainable, expected", [
    (0, 0.0, 3, 6, True),     # fits once running ones finish: pass within bounds
    (2, 0.0, 3, 6, False),    # passed max_bypass times
    (0, 5.0, 3, 6, False),    # waited max_wait_s
    (9, 99.0, 7, 6, True),    # could not fit even then: held blocks are what it waits for
    (0, 0.0, 6, 6, True),
])
def test_may_pass(bypassed, waited, need, drainable, expected):
    assert may_pass(bypassed, waited, need, drainable, max_bypass=2, max_wait_s=5.0) is expected


def test_may_pass_with_max_bypass_0_is_fcfs():
    assert may_pass(0, 0.0, 3, 6, max_bypass=0, max_wait_s=60.0) is False


def test_too_large_request_rejected_with_reason():
    sched = make_sched(num_blocks=4, block_size=4)
    with pytest.raises(RequestTooLargeError, match=r"needs 5 KV blocks.*pool has 4"):
        sched.add(make_seq(0, prompt_len=15, max_tokens=4))
    sched.add(make_seq(1, prompt_len=12, max_tokens=4))  # exactly fits


def test_abort_frees_blocks_from_any_queue():
    sched = make_sched(num_blocks=8, block_size=4, max_batch_size=1)
    a, b = make_seq(0, 6), make_seq(1, 6)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()  # a running, b waiting (batch size 1)
    assert sched.abort(1) is b and b.status is SequenceStatus.FINISHED_ABORTED
    assert sched.abort(0) is a and a.finish_reason == "abort"
    assert sched.update(step, {0: 5}) == []  # aborted mid-step: ignored
    assert sched.abort(0) is None and not sched.has_work()
    sched.block_manager.check_full()

"""Routing policies and the signed opaque state: pure logic, no MPI."""

from __future__ import annotations

import msgpack
import pytest

from disagg_mpi.orchestrator.router import Router, least_loaded, round_robin
from disagg_mpi.transfer.cache_state import CacheState
from disagg_mpi.transfer.opaque import OpaqueState, OpaqueStateError


def test_round_robin_alternates():
    assert [round_robin([3, 5], t) for t in range(5)] == [3, 5, 3, 5, 3]
    r = Router("round_robin")
    assert [r.pick([0, 1, 2], {}) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_least_loaded_picks_fewest_tokens_and_breaks_ties_in_order():
    assert least_loaded([0, 1, 2], {0: 50, 1: 10, 2: 30}) == 1
    assert least_loaded([0, 1], {0: 7, 1: 7}) == 0
    assert Router("least_loaded").pick([4, 5], {4: 100, 5: 3}) == 5


def test_router_errors():
    with pytest.raises(ValueError, match="no executor"):
        round_robin([], 0)
    with pytest.raises(ValueError, match="not known"):
        Router("random")


def _state(**kw):
    cs = CacheState.create(30, 3, 64, 16, "float32")
    base = dict(executor_id=0, world_ranks=(1,), ctx_req_id=7, block_ids=(3, 4), num_tokens=20, cache_state=cs)
    base.update(kw)
    return OpaqueState(**base)


def test_opaque_round_trip():
    key = b"k" * 32
    s = _state()
    assert OpaqueState.decode(s.encode(key), key) == s


def test_opaque_refuses_forged_altered_and_foreign():
    key = b"k" * 32
    blob = _state().encode(key)
    with pytest.raises(OpaqueStateError, match="bad signature"):
        OpaqueState.decode(blob, b"x" * 32)  # signed by another job
    outer = msgpack.unpackb(blob)
    forged = _state(block_ids=(0, 1))  # points at someone else's blocks
    outer["p"] = forged._payload()
    with pytest.raises(OpaqueStateError, match="bad signature"):
        OpaqueState.decode(msgpack.packb(outer), key)
    with pytest.raises(OpaqueStateError, match="malformed"):
        OpaqueState.decode(b"\x00garbage", key)

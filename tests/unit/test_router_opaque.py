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
    base = {"executor_id": 0, "world_ranks": (1,), "ctx_req_id": 7, "block_ids": (3, 4), "num_tokens": 20,
            "cache_state": cs}
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


def test_opaque_refuses_every_flipped_bit():
    """Any altered byte string is refused, even one that decodes to the same signed payload (a bit
    flipped in the envelope's version field did: the soak test's forged hand-off was then served,
    and claimed the context before the genuine request)."""
    key = b"k" * 32
    blob = _state().encode(key)
    accepted = []
    for i in range(len(blob)):
        for bit in range(8):
            altered = bytearray(blob)
            altered[i] ^= 1 << bit
            try:
                OpaqueState.decode(bytes(altered), key)
            except OpaqueStateError:
                continue
            accepted.append((i, bit))
    assert not accepted, f"altered params accepted at (byte, bit) {accepted[:5]} of {len(blob)} bytes"


def test_kv_aware_prefers_cache_minus_load():
    from disagg_mpi.orchestrator.router import kv_aware

    assert kv_aware([0, 1], {0: 0, 1: 512}, {0: 0, 1: 100}) == 1  # 412 tokens saved beats idle
    assert kv_aware([0, 1], {0: 0, 1: 512}, {0: 0, 1: 900}) == 0  # too busy to be worth it
    assert kv_aware([0, 1], {}, {}) == 0
    assert Router("kv_aware").pick([2, 3], {2: 5, 3: 5}, {3: 64}) == 3


def test_run_locally_threshold():
    from disagg_mpi.orchestrator.router import run_locally

    assert run_locally(100, 80, 32)  # 20 uncached tokens
    assert not run_locally(100, 0, 32)
    assert not run_locally(10, 0, 0)  # disabled


def test_prefix_index_tracks_full_block_chains():
    from disagg_mpi.orchestrator.prefix_index import PrefixIndex, chain_hashes

    idx = PrefixIndex(block_size=4, capacity_blocks=3)
    a = list(range(20))
    assert idx.cached_tokens(a) == 0
    idx.insert(a[:9])  # two full blocks
    assert idx.cached_tokens(a) == 8
    assert idx.cached_tokens(a[:8]) == 4  # the last token is always computed
    assert idx.cached_tokens([99] + a[1:]) == 0  # a different first block breaks the chain
    idx.insert(list(range(100, 112)))  # three more blocks evict the oldest
    assert idx.cached_tokens(a) == 0
    assert chain_hashes(a[:8], 4)[0] == chain_hashes(a[:4], 4)[0]


def test_shared_gpus_are_found_per_node():
    from disagg_mpi.spmd import shared_gpus

    placements = [("a", None, None), ("a", 0, 0), ("a", 1, 0), ("a", 1, 1), ("b", 2, 0), ("a", 3, None)]
    assert shared_gpus(placements) == {("a", 0): [0, 1]}


def test_nccl_only_when_every_tp_rank_has_its_own_gpu():
    from disagg_mpi.runtime.allreduce import gpus_are_distinct

    assert gpus_are_distinct([("a", 0), ("a", 1)])
    assert gpus_are_distinct([("a", 0), ("b", 0)])  # same id, different nodes
    assert not gpus_are_distinct([("a", 0), ("a", 0)])  # two ranks on one GPU: NCCL cannot
    assert not gpus_are_distinct([("a", None), ("a", None)])  # CPU


def test_executor_ranks_share_the_cores_rank_0_does_not_use():
    from disagg_mpi.spmd import threads_per_rank

    assert threads_per_rank(2, 1) == 2      # aggregated on a 2-core laptop: the one executor gets both
    assert threads_per_rank(2, 2) == 1      # 1 context + 1 generation
    assert threads_per_rank(16, 3) == 5 and threads_per_rank(2, 8) == 1

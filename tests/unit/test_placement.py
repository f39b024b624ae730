"""plan_placement (SLURM block distribution), device_for_rank and local_rank, without a cluster."""

from __future__ import annotations

import pytest

from disagg_mpi.config import parse_topology
from disagg_mpi.placement import (
    PlacementError,
    default_gpus_per_node,
    device_for_rank,
    local_rank,
    plan_placement,
)

TC = {"enable_cache_transceiver": True}


def _ex(ranks: list[int], devices: list[int] | None, tp: int = 1, pp: int = 1) -> dict:
    d = {"participant_ids": ranks, "tensor_parallel_size": tp, "pipeline_parallel_size": pp,
         "cache_transceiver_config": TC}
    if devices is not None:
        d["device_ids"] = devices
    return d


def _topo(ctx: list[dict], gen: list[dict]):
    return parse_topology({"context_executors": ctx, "generation_executors": gen})


def test_one_node_of_8_gpus_tp4_plus_tp4() -> None:
    topo = _topo([_ex([1, 2, 3, 4], [0, 1, 2, 3], tp=4)], [_ex([5, 6, 7, 8], [4, 5, 6, 7], tp=4)])
    p = plan_placement(topo, nodes=1, gpus_per_node=8)
    assert (p.world_size, p.ntasks_per_node) == (9, 9)
    assert [r.node for r in p.ranks] == [0] * 9
    assert [r.local_rank for r in p.ranks] == list(range(9))
    assert [r.gpu for r in p.ranks] == [None, 0, 1, 2, 3, 4, 5, 6, 7]
    assert [r.role for r in p.ranks[:2]] == ["orchestrator", "context"]
    assert p.ranks[5].role == "generation" and p.ranks[5].label == "gen0"
    assert p.warnings == ()
    assert "node 0: r0:orch/cpu r1:ctx0/gpu0" in p.format()


def test_two_nodes_context_and_generation_apart_warns() -> None:
    # 9 ranks on 2 nodes: 5 per node; node 1 reuses node-local GPU ids 0-3.
    topo = _topo([_ex([1, 2, 3, 4], [0, 1, 2, 3], tp=4)], [_ex([5, 6, 7, 8], [0, 1, 2, 3], tp=4)])
    p = plan_placement(topo, nodes=2, gpus_per_node=8)
    assert p.ntasks_per_node == 5
    assert p.ranks_on_node(0) == [0, 1, 2, 3, 4] and p.ranks_on_node(1) == [5, 6, 7, 8]
    assert [(r.node, r.local_rank, r.gpu) for r in p.ranks[4:7]] == [(0, 4, 3), (1, 0, 0), (1, 1, 1)]
    assert len(p.warnings) == 1
    assert "context_executors[0]" in p.warnings[0] and "generation_executors[0]" in p.warnings[0]
    assert "network" in p.warnings[0]


def test_two_nodes_two_pairs_each_pair_on_its_node() -> None:
    # 17 ranks, 9 per node: pair A (ranks 1-8) on node 0, pair B (9-16) on node 1.
    topo = _topo([_ex([1, 2, 3, 4], [0, 1, 2, 3], tp=4), _ex([9, 10, 11, 12], [0, 1, 2, 3], tp=4)],
                 [_ex([5, 6, 7, 8], [4, 5, 6, 7], tp=4), _ex([13, 14, 15, 16], [4, 5, 6, 7], tp=4)])
    p = plan_placement(topo, nodes=2, gpus_per_node=8)
    assert {p.node_of(r) for r in range(9)} == {0} and {p.node_of(r) for r in range(9, 17)} == {1}
    # No TP group spans nodes; only the cross pairs (ctx0-gen1, ctx1-gen0) move KV over the network.
    assert not any("tensor-parallel" in w for w in p.warnings)
    cross = [w for w in p.warnings if "network" in w]
    assert len(cross) == 2
    assert any("context_executors[0]" in w and "generation_executors[1]" in w for w in cross)
    assert any("context_executors[1]" in w and "generation_executors[0]" in w for w in cross)


def test_four_nodes_tp_group_spanning_nodes_warns() -> None:
    # 16 ranks on 4 nodes: 4 per node. The TP=4 context group (ranks 1-4) straddles nodes 0 and 1.
    # generation_executors[1] is a TP=7 group on ranks 9-15 (nodes 2 and 3), all on GPU 0.
    topo = _topo([_ex([1, 2, 3, 4], [1, 2, 3, 0], tp=4)],
                 [_ex([5, 6, 7, 8], [1, 2, 3, 4], tp=2, pp=2), _ex(list(range(9, 16)), [0] * 7, tp=7)])
    p = plan_placement(topo, nodes=4, gpus_per_node=8)
    assert p.ntasks_per_node == 4
    assert [p.node_of(r) for r in range(16)] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert [r.local_rank for r in p.ranks[:6]] == [0, 1, 2, 3, 0, 1]
    tp_warnings = [w for w in p.warnings if "tensor-parallel group spans" in w]
    assert len(tp_warnings) == 3
    assert "context_executors[0] pipeline stage 0" in tp_warnings[0] and "[0, 1]" in tp_warnings[0]
    # generation_executors[0] (TP=2, PP=2, ranks 5-8): stage 0 (5, 6) stays on node 1, stage 1 (7, 8)
    # straddles nodes 1 and 2.
    assert "generation_executors[0] pipeline stage 1" in tp_warnings[1] and "[1, 2]" in tp_warnings[1]
    assert not any("generation_executors[0] pipeline stage 0" in w for w in p.warnings)
    assert "generation_executors[1] pipeline stage 0" in tp_warnings[2] and "[2, 3]" in tp_warnings[2]
    # ranks 9-15 all on GPU 0 of their node: one warning per shared GPU.
    shared = [w for w in p.warnings if "share GPU 0" in w]
    assert len(shared) == 2 and "ranks [9, 10, 11]" in shared[0] and "node 3" in shared[1]


def test_four_nodes_of_8_gpus_clean() -> None:
    # 32 ranks + orchestrator would leave node 3 short; use 31 executor ranks + rank 0 = 32, 8 per node.
    ctx = [_ex([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7], tp=7)]
    gen = [_ex(list(range(8 * n, 8 * n + 8)), list(range(8)), tp=8) for n in (1, 2, 3)]
    topo = _topo(ctx, gen)
    p = plan_placement(topo, nodes=4, gpus_per_node=8)
    assert (p.world_size, p.ntasks_per_node) == (32, 8)
    for n in range(4):
        assert p.ranks_on_node(n) == list(range(8 * n, 8 * n + 8))
    assert [r.gpu for r in p.ranks[8:16]] == list(range(8))
    assert not any("tensor-parallel" in w for w in p.warnings)
    assert len([w for w in p.warnings if "network" in w]) == 3  # the context node feeds 3 other nodes


def test_device_id_beyond_the_node_is_an_error() -> None:
    topo = _topo([_ex([1, 2], [0, 8], tp=2)], [_ex([3], [1])])
    with pytest.raises(PlacementError, match=r"device_ids\[1\] = 8 .*--gpus-per-node 9"):
        plan_placement(topo, nodes=1, gpus_per_node=8)
    assert default_gpus_per_node(topo) == 9
    assert plan_placement(topo, nodes=1, gpus_per_node=9).ranks[2].gpu == 8


def test_gpu_topology_on_cpu_nodes_is_an_error() -> None:
    topo = _topo([_ex([1], [0])], [_ex([2], [0])])
    with pytest.raises(PlacementError, match="0 GPU"):
        plan_placement(topo, nodes=1, gpus_per_node=0)


def test_cpu_topology_and_bad_node_counts() -> None:
    topo = _topo([_ex([1], None)], [_ex([2], None)])
    p = plan_placement(topo, nodes=1, gpus_per_node=0)
    assert [r.gpu for r in p.ranks] == [None, None, None] and p.warnings == ()
    assert default_gpus_per_node(topo) == 0
    with pytest.raises(PlacementError, match="exceeds the world size 3"):
        plan_placement(topo, nodes=4, gpus_per_node=0)
    p3 = plan_placement(topo, nodes=3, gpus_per_node=0)
    assert [r.node for r in p3.ranks] == [0, 1, 2] and len(p3.warnings) == 1
    big = _topo([_ex([1, 2, 3, 4], None, tp=4)], [_ex([5, 6, 7, 8], None, tp=4)])  # world 9
    with pytest.raises(PlacementError, match="use --nodes 3"):
        plan_placement(big, nodes=4, gpus_per_node=0)  # 3 per node fills 3 nodes, node 3 empty


def test_device_for_rank_rule() -> None:
    assert device_for_rank(None, 0, 5) is None
    assert device_for_rank([4, 5, 6, 7], 2, local_rank=7) == 6  # by participant index, not local rank
    with pytest.raises(PlacementError):
        device_for_rank([0, 1], 2, 0)
    with pytest.raises(PlacementError, match="negative"):
        device_for_rank([-1], 0, 0)


def test_local_rank_from_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert local_rank() == 3


def test_local_rank_from_shared_memory_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_LOCALID", raising=False)
    from mpi4py import MPI

    assert local_rank(MPI.COMM_SELF) == 0
    assert local_rank() == MPI.COMM_WORLD.Get_rank()  # one node

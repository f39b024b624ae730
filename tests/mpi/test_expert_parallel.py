"""Expert parallelism under mpiexec, token for token equal to transformers: an MoE checkpoint of each
family (written by transformers) served disaggregated with EP on one side and TP on the other (the
KV moves unchanged: attention is TP on both), and an aggregated EP executor.

Job sizes used here: world(3) world(5).
"""

from __future__ import annotations

import pytest

from disagg_mpi import Request, launch
from disagg_mpi.config import parse_topology
from tests.hf_folder import family_checkpoint

pytestmark = pytest.mark.mpi(min_size=2)

PROMPTS = [[5, 17, 300, 42, 7, 99, 100, 3, 250], [11, 12, 13], list(range(20, 60)), [7] * 23]
NEW = 10


def _executor(first: int, tp: int, ep: int, transceiver: bool) -> dict:
    d = {"participant_ids": list(range(first, first + tp)), "tensor_parallel_size": tp,
         "expert_parallel_size": ep, "max_batch_size": 8, "max_num_tokens": 32,   # the 40-token prompt in chunks
         "kv_cache": {"block_size": 4, "num_blocks": 128}}
    if transceiver:
        d["cache_transceiver_config"] = {"enable_cache_transceiver": True}
    return d


def _generate_and_compare(topo, folder, experts: dict[int, int], moved: bool) -> None:
    """Greedy tokens equal transformers'; `experts`: executor -> experts its leader holds per layer."""
    with launch(topo) as orch:
        if orch is None:
            return
        from tests.oracle import hf_greedy

        outs = orch.generate([Request(p, max_tokens=NEW, ignore_eos=True) for p in PROMPTS], timeout=600)
        assert all(o.error_msg is None for o in outs), [o.error_msg for o in outs]
        assert [o.result.output_token_ids for o in outs] == hf_greedy(PROMPTS, NEW, folder, None)
        assert all(((o.result.metrics.kv_transfer_bytes or 0) > 0) == moved for o in outs)
        stats = orch.executor_stats()
        assert {ex: stats[ex]["local_experts"] for ex in experts} == experts   # EP was in force
        orch.wait_pools_full()


@pytest.mark.world(5)
@pytest.mark.parametrize("name,ctx_ep,gen_ep", [("mixtral", 2, 1), ("qwen2-moe", 2, 1), ("qwen3-moe", 1, 2)])
def test_expert_parallel_beside_tensor_parallel(name, ctx_ep, gen_ep):
    """Context TP2 x EP `ctx_ep` -> generation TP2 x EP `gen_ep` (one side EP, the other TP)."""
    folder = family_checkpoint(name)    # every rank asks; one builds it, the others wait
    topo = parse_topology({"model": {"path": str(folder), "dtype": "float32"},
                           "context_executors": [_executor(1, 2, ctx_ep, True)],
                           "generation_executors": [_executor(3, 2, gen_ep, True)]})
    n = {"mixtral": 4, "qwen2-moe": 8, "qwen3-moe": 8}[name]
    _generate_and_compare(topo, folder, {0: n // ctx_ep, 1: n // gen_ep}, moved=True)


@pytest.mark.world(3)
def test_expert_parallel_aggregated():
    """One aggregated TP2 x EP2 executor over Qwen2-MoE (routed experts split, shared expert TP-split)."""
    folder = family_checkpoint("qwen2-moe")
    topo = parse_topology({"model": {"path": str(folder), "dtype": "float32"},
                           "generation_executors": [_executor(1, 2, 2, False)]})
    _generate_and_compare(topo, folder, {0: 4}, moved=False)

"""`model.quantization` through the YAML and the worker: a TP2 int4 executor under mpiexec decodes
what the in-process TP1 int4 executor decodes (and not what fp32 does on these prompts); the same
for int8.

Job sizes used here: world(3)
"""
from __future__ import annotations

import pytest

from disagg_mpi import Request, launch
from disagg_mpi.config import parse_topology

pytestmark = pytest.mark.mpi(min_size=2)

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 12, 13]]
NEW = 8


def _in_process(quantization: str) -> list[list[int]]:
    from disagg_mpi import Executor, ExecutorConfig, KvCacheConfig
    from disagg_mpi.model import load_model

    # Seed 1: its greedy picks have clear margins. The quantized kernels return bf16, so logits can tie
    # (seed 0's first token does, at int4), and a tie may break either way between TP1 and TP2.
    model = load_model("random:tiny", seed=1, quantization=quantization)
    ex = Executor(model, ExecutorConfig(max_batch_size=4, kv_cache_config=KvCacheConfig(4, 64)))
    return [r.result.output_token_ids for r in ex.generate(
        [Request(p, max_tokens=NEW, ignore_eos=True) for p in PROMPTS])]


@pytest.mark.world(3)
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_tp2_quantized_executor_equals_in_process(mode):
    """int8 also runs its load-time collective (the row-parallel scales) over the MPI TP group."""
    topo = parse_topology({
        "model": {"path": "random:tiny", "dtype": "float32", "quantization": mode, "seed": 1},
        "generation_executors": [{"participant_ids": [1, 2], "tensor_parallel_size": 2,
                                  "kv_cache": {"block_size": 4, "num_blocks": 64}}]})
    with launch(topo) as orch:
        if orch is None:
            return
        outs = orch.generate([Request(p, max_tokens=NEW, ignore_eos=True) for p in PROMPTS], timeout=300)
        assert all(o.error_msg is None for o in outs), [o.error_msg for o in outs]
        got = [o.result.output_token_ids for o in outs]
        assert got == _in_process(mode)
        if mode == "int4":   # int8 decodes fp32's tokens on these prompts; int4 does not
            assert got != _in_process("none")   # the option reached the ranks
        orch.wait_pools_full()

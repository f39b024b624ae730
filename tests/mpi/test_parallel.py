"""TP x PP executors and KV re-sharding between different layouts, under mpiexec.

Job sizes used here: world(3) world(4) world(5) world(6) world(7) world(8) world(9)
(scripts/run_tests.py reads the sizes from the markers in these files).
"""

from __future__ import annotations

import itertools

import pytest

from disagg_mpi import Request, launch
from disagg_mpi.config import parse_topology
from tests.mpi.helpers import tiny_prompts

pytestmark = pytest.mark.mpi(min_size=2)

_LAYOUTS = [(tp, pp) for tp in (1, 2, 4) for pp in (1, 2, 3)]


def _executor(first_rank: int, tp: int, pp: int, block_size: int, transceiver: bool) -> dict:
    d = {"participant_ids": list(range(first_rank, first_rank + tp * pp)), "tensor_parallel_size": tp,
         "pipeline_parallel_size": pp, "max_batch_size": 16, "max_num_tokens": 96,
         "kv_cache": {"block_size": block_size, "num_blocks": 256}}
    if transceiver:
        d["cache_transceiver_config"] = {"enable_cache_transceiver": True}
    return d


def _disagg_topology(model: str, ctx: tuple[int, int], gen: tuple[int, int], ctx_bs: int = 4,
                     gen_bs: int = 4) -> object:
    c = _executor(1, *ctx, ctx_bs, True)
    g = _executor(1 + ctx[0] * ctx[1], *gen, gen_bs, True)
    return parse_topology({"model": {"path": model, "dtype": "float32"}, "context_executors": [c],
                           "generation_executors": [g]})


def _agg_topology(model: str, tp: int, pp: int) -> object:
    return parse_topology({"model": {"path": model, "dtype": "float32"},
                           "generation_executors": [_executor(1, tp, pp, 4, False)]})


_REFERENCE: dict[tuple, list[list[int]]] = {}


def _reference(model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Aggregated TP1 PP1 in process: the baseline every layout must equal."""
    key = (model, tuple(map(tuple, prompts)), max_tokens)
    if key not in _REFERENCE:
        from disagg_mpi import Executor, ExecutorConfig, KvCacheConfig

        ex = Executor(model, ExecutorConfig(max_batch_size=16, max_num_tokens=96,
                                            kv_cache_config=KvCacheConfig(4, 512)))
        _REFERENCE[key] = [r.result.output_token_ids for r in ex.generate(
            [Request(p, max_tokens=max_tokens, ignore_eos=True) for p in prompts])]
    return _REFERENCE[key]


def _run_and_compare(topo, prompts, max_tokens, expected_fn) -> None:
    with launch(topo) as orch:
        if orch is None:
            return
        outs = orch.generate([Request(p, max_tokens=max_tokens, ignore_eos=True) for p in prompts], timeout=600)
        assert all(o.error_msg is None for o in outs), [o.error_msg for o in outs]
        got = [o.result.output_token_ids for o in outs]
        assert got == expected_fn(prompts, max_tokens)
        orch.wait_pools_full()


def _pairs():
    for ctx, gen in itertools.product(_LAYOUTS, _LAYOUTS):
        world = 1 + ctx[0] * ctx[1] + gen[0] * gen[1]
        if world <= 9:
            yield pytest.param(ctx, gen, marks=pytest.mark.world(world), id=f"ctx{ctx}-gen{gen}")


@pytest.mark.parametrize("ctx,gen", list(_pairs()))
def test_small_model_resharding(ctx, gen):
    """Small model (8 q heads, 2 KV heads, 6 layers): every TP {1,2,4} x PP {1,2,3} pair in 9 ranks."""
    prompts = tiny_prompts(6)
    _run_and_compare(_disagg_topology("random:tiny", ctx, gen), prompts, 10,
                     lambda p, n: _reference("random:tiny", p, n))


@pytest.mark.world(5)
def test_small_model_block_size_conversion():
    """Context blocks of 4 tokens into generation blocks of 8 (and TP 2 -> 1 at the same time)."""
    prompts = tiny_prompts(6)
    topo = _disagg_topology("random:tiny", (2, 1), (1, 2), ctx_bs=4, gen_bs=8)
    _run_and_compare(topo, prompts, 10, lambda p, n: _reference("random:tiny", p, n))


def _smollm2_expected(prompts, max_tokens):
    from tests.oracle import smollm2_oracle

    oracle_prompts, expected = smollm2_oracle(max_tokens)
    assert prompts == oracle_prompts
    return expected


def _smollm2_prompts():
    from tests.oracle import smollm2_oracle

    return smollm2_oracle(24)[0]


@pytest.mark.oracle
@pytest.mark.parametrize("ctx,gen,world", [
    pytest.param((3, 1), (1, 1), 5, marks=pytest.mark.world(5), id="tp3-to-tp1"),
    pytest.param((1, 1), (3, 1), 5, marks=pytest.mark.world(5), id="tp1-to-tp3"),
    pytest.param((1, 2), (1, 3), 6, marks=pytest.mark.world(6), id="pp2-to-pp3"),
    pytest.param((3, 2), (1, 2), 9, marks=pytest.mark.world(9), id="tp3pp2-to-tp1pp2"),
])
def test_smollm2_resharding_equals_transformers(ctx, gen, world):
    topo = _disagg_topology("smollm2", ctx, gen, ctx_bs=16, gen_bs=16)
    _run_and_compare(topo, _smollm2_prompts(), 24, _smollm2_expected)


@pytest.mark.oracle
@pytest.mark.parametrize("tp,pp", [
    pytest.param(3, 1, marks=pytest.mark.world(4), id="tp3"),
    pytest.param(1, 3, marks=pytest.mark.world(4), id="pp3"),
])
def test_smollm2_aggregated_tp_pp_equals_transformers(tp, pp):
    _run_and_compare(_agg_topology("smollm2", tp, pp), _smollm2_prompts(), 24, _smollm2_expected)

"""Prefix reuse across the disaggregated flow, and the kv_aware router, under mpiexec."""

from __future__ import annotations

import pytest

from disagg_mpi import Request, launch
from tests.mpi.helpers import tiny_topology

pytestmark = pytest.mark.mpi(min_size=2)

_REUSE = {"kv_cache": {"block_size": 16, "num_blocks": 512, "enable_prefix_reuse": True},
          "max_num_tokens": 2048}


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * j) % 1000 + 3 for j in range(n)]


def _one(orch, prompt, max_tokens=8):
    [out] = orch.generate([Request(prompt, max_tokens=max_tokens, ignore_eos=True)], timeout=120)
    assert out.error_msg is None, out.error_msg
    return out.result


@pytest.mark.world(3)
def test_repeated_prompt_reuses_cache_on_both_sides():
    with launch(tiny_topology(1, 1, **_REUSE)) as orch:
        if orch is None:
            return
        prompt = _prompt(1, 1200)
        computed0 = orch.executor_stats()[0]["tokens"]
        cold = _one(orch, prompt)
        computed1 = orch.executor_stats()[0]["tokens"]
        warm = _one(orch, prompt)
        computed2 = orch.executor_stats()[0]["tokens"]
        assert warm.output_token_ids == cold.output_token_ids
        # The context side prefilled the whole prompt once, then only its last block.
        assert computed1 - computed0 >= 1200
        assert computed2 - computed1 <= 16
        # The generation side already held the prefix: only the uncached blocks moved.
        assert cold.metrics.kv_cached_tokens == 0
        assert warm.metrics.kv_cached_tokens >= 1200 - 16 - 15
        assert warm.metrics.kv_transfer_bytes * 10 < cold.metrics.kv_transfer_bytes
        assert warm.metrics.ttft_ms < cold.metrics.ttft_ms
        # A longer prompt sharing the prefix reuses it too, and stays correct.
        longer = prompt + _prompt(2, 40)
        shared = _one(orch, longer)
        assert shared.metrics.kv_cached_tokens >= 1184
        orch.wait_pools_full()  # cached blocks count as free: every reference was dropped


@pytest.mark.world(3)
def test_reused_prefix_gives_the_same_tokens_as_a_fresh_executor():
    """Outputs with reuse equal outputs without it (prefix blocks are shared, never rewritten)."""
    from disagg_mpi import Executor, ExecutorConfig, KvCacheConfig

    prompts = [_prompt(3, 200), _prompt(3, 200) + _prompt(4, 30), _prompt(3, 100)]
    ref = Executor("random:tiny", ExecutorConfig(max_batch_size=4, max_num_tokens=512,
                                                 kv_cache_config=KvCacheConfig(16, 256)))
    want = [r.result.output_token_ids for r in ref.generate(
        [Request(p, max_tokens=8, ignore_eos=True) for p in prompts])]
    with launch(tiny_topology(1, 1, **_REUSE)) as orch:
        if orch is None:
            return
        got = [_one(orch, p).output_token_ids for p in prompts]
        assert got == want
        orch.wait_pools_full()


@pytest.mark.world(4)
def test_kv_aware_routes_repeated_prefixes_to_their_executor():
    with launch(tiny_topology(2, 1, router="kv_aware", **_REUSE)) as orch:
        if orch is None:
            return
        a, b = _prompt(5, 600), _prompt(6, 600)
        first_a = _one(orch, a).metrics.context_executor
        first_b = _one(orch, b).metrics.context_executor
        # Later requests follow their prefix, not a turn counter.
        for _ in range(3):
            assert _one(orch, a + _prompt(7, 5)).metrics.context_executor == first_a
            assert _one(orch, b + _prompt(8, 5)).metrics.context_executor == first_b
        orch.wait_pools_full()


@pytest.mark.world(3)
def test_conditional_disaggregation_skips_the_transfer_for_short_prompts():
    topo = tiny_topology(1, 1, router={"policy": "round_robin", "local_prefill_max_tokens": 32}, **_REUSE)
    with launch(topo) as orch:
        if orch is None:
            return
        short = _one(orch, _prompt(9, 20))
        assert short.metrics.context_executor is None  # ran where it decodes
        assert short.metrics.generation_executor in orch.generation_ids
        long = _one(orch, _prompt(10, 300))
        assert long.metrics.context_executor in orch.context_ids and long.metrics.kv_transfer_bytes > 0
        orch.wait_pools_full()

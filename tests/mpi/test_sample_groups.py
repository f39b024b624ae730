"""Parallel sampling (issue 21) under mpiexec: the n choices of a prompt (`Request.sample_group`, as the
HTTP API's n and best_of make them) compute the prompt once, aggregated and disaggregated, and move
its KV once; each choice gives the tokens it gives alone (the HTTP API's per-choice seeds), so the
aggregated and disaggregated outputs are equal, token for token."""

from __future__ import annotations

import functools
import secrets

import pytest

from disagg_mpi import Executor, ExecutorConfig, KvCacheConfig, Request, SamplingConfig, launch
from disagg_mpi.api import OutputConfig
from disagg_mpi.sample_group import SampleGroup
from disagg_mpi.serve.protocol import _choice_seed
from tests.mpi.helpers import tiny_topology

pytestmark = pytest.mark.mpi(min_size=2)

N, MAX_TOKENS = 4, 6
PROMPT = [(7 * j + 3) % 1000 + 1 for j in range(37)]  # 9 full blocks of 4 and a partial one (copied)


def _choices(grouped: bool, n: int = N, temperature: float = 0.8, seed: int = 99) -> list[Request]:
    key = secrets.randbits(63)
    return [Request(list(PROMPT), max_tokens=MAX_TOKENS, ignore_eos=True,
                    sampling_config=SamplingConfig(temperature=temperature,
                                                   seed=_choice_seed(seed, j) if temperature else None),
                    output_config=OutputConfig(return_log_probs=True), num_logprobs=1,
                    sample_group=SampleGroup(key, j, n) if grouped else None) for j in range(n)]


@functools.lru_cache(maxsize=1)
def _alone() -> list[list[int]]:
    """Today's outputs: each choice its own request (no group), in one in-process executor (rank 0)."""
    ex = Executor("random:tiny", ExecutorConfig(max_batch_size=16, max_num_tokens=256,
                                                kv_cache_config=KvCacheConfig(4, 512)))
    return [r.result.output_token_ids for r in ex.generate(_choices(False))]


def _run(orch, requests) -> tuple[list, dict[int, int]]:
    """(final responses, tokens each executor computed meanwhile)."""
    before = {e: s["tokens"] for e, s in orch.executor_stats().items()}
    outs = orch.generate(requests, timeout=300)
    assert all(o.error_msg is None for o in outs), [o.error_msg for o in outs]
    after = {e: s["tokens"] for e, s in orch.executor_stats().items()}
    return outs, {e: after[e] - before[e] for e in after}


@pytest.mark.world(3)
def test_aggregated_group_prefills_once_on_one_executor():
    """Two aggregated executors (round robin): a group goes to one, computes its prompt once."""
    with launch(tiny_topology(0, 2)) as orch:
        if orch is None:
            return
        want = _alone()
        outs, computed = _run(orch, _choices(False))  # today's way: every choice prefills
        assert sum(computed.values()) == N * (len(PROMPT) + MAX_TOKENS - 1)
        assert [o.result.output_token_ids for o in outs] == want
        outs, computed = _run(orch, _choices(True))
        assert sorted(computed.values()) == [0, len(PROMPT) + N * (MAX_TOKENS - 1)], computed
        assert [o.result.output_token_ids for o in outs] == want
        assert len({o.result.metrics.executor for o in outs}) == 1
        assert len({tuple(o.result.output_token_ids) for o in outs}) == N  # seeded choices differ
        # greedy n=2: identical choices
        outs, _ = _run(orch, _choices(True, n=2, temperature=0.0))
        assert outs[0].result.output_token_ids == outs[1].result.output_token_ids
        assert outs[0].result.log_probs == outs[1].result.log_probs
        orch.wait_pools_full()


@pytest.mark.world(3)
@pytest.mark.parametrize("direct", [True, False])
def test_disaggregated_group_prefills_once_and_moves_its_kv_once(direct):
    ctc = {"enable_cache_transceiver": True, "direct_handoff": direct}
    with launch(tiny_topology(1, 1, cache_transceiver_config=ctc)) as orch:
        if orch is None:
            return
        want = _alone()
        outs, computed = _run(orch, _choices(True))
        assert [o.result.output_token_ids for o in outs] == want  # = aggregated, token for token
        assert computed == {0: len(PROMPT), 1: N * (MAX_TOKENS - 1)}, computed
        moved = [o.result.metrics.kv_transfer_bytes for o in outs]
        assert sorted(moved)[:-1] == [0] * (N - 1) and max(moved) > 0, moved
        assert sorted(o.result.metrics.kv_cached_tokens for o in outs) == [0] + [len(PROMPT)] * (N - 1)
        [alone], _ = _run(orch, _choices(False)[:1])  # one choice alone moves what the group moved
        assert alone.result.metrics.kv_transfer_bytes == max(moved)
        orch.wait_pools_full()


@pytest.mark.world(3)
def test_cancelled_member_ends_alone():
    """A member cancelled as it starts (the first, whose prompt the others share, then another): the
    others finish with their tokens; every block is freed."""
    with launch(tiny_topology(1, 1)) as orch:
        if orch is None:
            return
        for cancelled in (0, 1):
            _cancel_one(orch, cancelled, _alone())
        orch.wait_pools_full()


def _cancel_one(orch, cancelled: int, want: list[list[int]]) -> None:
    gids = orch.submit(_choices(True))
    orch.cancel_request(gids[cancelled])
    final = {}
    while len(final) < N:
        for gid, resp in orch.await_responses(timeout=60):
            if resp.is_final:
                final[gid] = resp
    for j, gid in enumerate(gids):
        if j != cancelled:
            assert final[gid].error_msg is None and final[gid].result.output_token_ids == want[j]


@pytest.mark.world(5)
def test_group_over_pipeline_stages_copies_on_every_rank():
    """Context PP2 -> generation PP2: each stage's ranks fork (and copy) their own layers' blocks."""
    from tests.mpi.helpers import disaggregated_vs_in_process

    got = disaggregated_vs_in_process(lambda: _choices(True))
    if got is None:
        return
    outs, local, _ = got
    want = _alone()
    assert [o.result.output_token_ids for o in outs] == want == [r.result.output_token_ids for r in local]
    moved = [o.result.metrics.kv_transfer_bytes for o in outs]
    assert sorted(moved)[:-1] == [0] * (N - 1) and max(moved) > 0, moved

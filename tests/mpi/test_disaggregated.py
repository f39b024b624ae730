"""The disaggregated service under mpiexec: real ranks, real model, real transfers."""

from __future__ import annotations

import pytest

from disagg_mpi import Request, launch
from disagg_mpi.api import DISAGG_NOT_ENABLED
from tests.mpi.helpers import CONFIGS, tiny_prompts, tiny_topology

pytestmark = pytest.mark.mpi(min_size=2)


def _greedy(prompts, max_tokens=24):
    return [Request(p, max_tokens=max_tokens, ignore_eos=True) for p in prompts]


def _check_equal_to_hf(config_name: str, expect_ctx: bool) -> None:
    from tests.oracle import smollm2_oracle

    with launch(CONFIGS / config_name) as orch:
        if orch is None:
            return
        prompts, expected = smollm2_oracle(24)
        outs = orch.generate(_greedy(prompts), timeout=600)
        for i, (o, want) in enumerate(zip(outs, expected)):
            assert o.error_msg is None, o.error_msg
            assert o.result.output_token_ids == want, f"prompt {i} differs from transformers"
            m = o.result.metrics
            if expect_ctx:
                assert m.context_executor in orch.context_ids
                assert m.generation_executor in orch.generation_ids
                assert m.kv_transfer_bytes > 0
                assert 0 <= m.kv_claim_ms <= m.kv_transfer_ms
                assert -1 <= m.kv_claim_answer_ms <= m.kv_claim_ms + 1   # wall vs monotonic clock
        orch.wait_pools_full()


@pytest.mark.oracle
@pytest.mark.parametrize("config,disaggregated", [
    pytest.param("smollm2-agg.yaml", False, marks=pytest.mark.world(2), id="agg"),
    pytest.param("smollm2-1ctx-1gen.yaml", True, marks=pytest.mark.world(3), id="1ctx-1gen"),
    pytest.param("smollm2-2ctx-1gen.yaml", True, marks=pytest.mark.world(4), id="2ctx-1gen"),
    pytest.param("smollm2-1ctx-2gen.yaml", True, marks=pytest.mark.world(4), id="1ctx-2gen"),
])
def test_smollm2_topology_equals_transformers(config, disaggregated):
    _check_equal_to_hf(config, expect_ctx=disaggregated)


@pytest.mark.world(3)
def test_seed_flow_context_then_generation():
    """The seed's explicit flow: context-only responses hand over the first token."""
    topo = tiny_topology(1, 1)
    with launch(topo) as orch:
        if orch is None:
            return
        prompts = tiny_prompts(6)
        reqs = _greedy(prompts, 8)
        reqs[3].num_prompt_logprobs = 2  # the context answer carries the prompt's logprobs
        gids = orch.enqueue_context(reqs)
        ctx = {}
        while len(ctx) < len(gids):
            for gid, resp in orch.await_context_responses(timeout=60):
                assert resp.error_msg is None, resp.error_msg
                assert resp.result.is_final
                cpp = resp.result.context_phase_params
                assert cpp is not None and len(cpp.first_gen_tokens) == 1 and cpp.opaque_state
                plps = resp.result.prompt_log_probs
                assert (plps is not None) == (gid == gids[3])
                assert plps is None or (len(plps) == len(prompts[3]) and plps[0] is None
                                        and all(len(t.top_ids) == 2 for t in plps[1:]))
                ctx[gid] = cpp
        gen_reqs = []
        for gid, p in zip(gids, prompts):
            r = Request(p, max_tokens=8, ignore_eos=True, context_phase_params=ctx[gid])
            gen_reqs.append(r)
        orch.enqueue_generation(gen_reqs, gids)
        got = {}
        while len(got) < len(gids):
            for gid, resp in orch.await_generation_responses(timeout=60):
                assert resp.error_msg is None, resp.error_msg
                got[gid] = resp.result.output_token_ids
        for gid in gids:
            assert got[gid][0] == ctx[gid].first_gen_tokens[0], "generation must start with the first token"
            assert len(got[gid]) == 8
        orch.wait_pools_full()


@pytest.mark.world(3)
def test_generation_only_benchmark_request_skips_the_context_executor():
    """A generation-only benchmark request (engine/benchmark.py) goes straight to the generation executor,
    which reserves the prompt's blocks without computing them and decodes exactly max_tokens tokens."""
    topo = tiny_topology(1, 1)
    block_size = topo.executors[1].kv_cache.block_size
    with launch(topo) as orch:
        if orch is None:
            return
        [ctx], [gen] = orch.context_ids, orch.generation_ids
        prompt, max_tokens = tiny_prompts(8)[7], 300   # 38 tokens; long enough to look at it mid-decode
        [gid] = orch.submit([Request(prompt, max_tokens, streaming=True, ignore_eos=True,
                                     benchmark_generation_only=True)])
        first = orch.await_responses(timeout=60)   # the first token is streamed as it joins the batch
        assert first and first[0][1].result.output_token_ids == [prompt[-1]], first
        stats = orch.executor_stats()
        assert stats[gen]["running"] == 1, stats     # still decoding: its blocks are those of its prompt
        need = -(-(len(prompt) + max_tokens) // block_size)
        assert stats[gen]["num_blocks"] - stats[gen]["free_blocks"] == need, stats
        got = first
        while not (final := next((r for g, r in got if g == gid and r.is_final), None)):
            got = orch.await_responses(timeout=60)
        assert final.error_msg is None and len(final.result.output_token_ids) == max_tokens   # all, streamed too
        assert final.result.output_token_ids[0] == prompt[-1]
        m = final.result.metrics
        assert m.context_executor is None and m.generation_executor == gen and m.kv_transfer_bytes is None
        stats = orch.wait_pools_full()
        assert stats[ctx]["iterations"] == 0 and stats[ctx]["tokens"] == 0, stats[ctx]   # never reached it
        assert stats[gen]["tokens"] == max_tokens - 1   # one token a decode step: no prefill computed


@pytest.mark.world(2)
def test_disaggregated_request_without_transceiver_is_refused():
    with launch(tiny_topology(0, 1)) as orch:
        if orch is None:
            return
        good = orch.enqueue_requests(_greedy(tiny_prompts(1), 4))
        gids = orch.enqueue_context(_greedy(tiny_prompts(2), 4))
        seen = {}
        while len(seen) < 3:
            for gid, resp in orch.await_responses(timeout=30):
                if resp.is_final:
                    seen[gid] = resp
        for gid in gids:
            assert seen[gid].error_msg == DISAGG_NOT_ENABLED
        assert seen[good[0]].error_msg is None and len(seen[good[0]].result.output_token_ids) == 4
        orch.wait_pools_full()


def _requests_64(prompts, max_tokens):
    """Greedy; every third asks the prompt's logprobs (k 0..3), every fifth streams."""
    return [Request(p, max_tokens=max_tokens, ignore_eos=True, streaming=i % 5 == 0,
                    num_prompt_logprobs=i % 4 if i % 3 == 0 else None) for i, p in enumerate(prompts)]


def _reference_outputs(prompts, max_tokens):
    """The same requests through one in-process executor (aggregated): their final responses."""
    from disagg_mpi import Executor, ExecutorConfig, KvCacheConfig

    ex = Executor("random:tiny", ExecutorConfig(max_batch_size=16, max_num_tokens=256,
                                                kv_cache_config=KvCacheConfig(4, 512)))
    return ex.generate(_requests_64(prompts, max_tokens))


def _same_prompt_logprobs(got, want) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return len(got) == len(want) and got[0] is None and want[0] is None and all(
        a.top_ids == b.top_ids and abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(got[1:], want[1:]))


def _many_in_flight(n_ctx: int, n_gen: int) -> None:
    with launch(tiny_topology(n_ctx, n_gen)) as orch:
        if orch is None:
            return
        prompts = tiny_prompts(64)
        first_out = set()  # streamed requests whose first response carried the prompt's logprobs

        def on_response(gid, resp):
            if not resp.is_final and resp.result.prompt_log_probs is not None:
                assert gid not in first_out, "the prompt's logprobs go out once before the final response"
                first_out.add(gid)

        outs = orch.generate(_requests_64(prompts, 12), timeout=300, on_response=on_response)
        assert len(outs) == 64 and len({o.request_id for o in outs}) == 64
        assert all(o.error_msg is None and o.result.is_final for o in outs)
        wants = _reference_outputs(prompts, 12)
        assert [o.result.output_token_ids for o in outs] == [w.result.output_token_ids for w in wants]
        # the prompt's logprobs: computed by the context executors, kept by rank 0, equal to in process
        assert all(_same_prompt_logprobs(o.result.prompt_log_probs, w.result.prompt_log_probs)
                   for o, w in zip(outs, wants))
        assert sum(o.result.prompt_log_probs is not None for o in outs) == 22
        assert first_out == {o.request_id for i, o in enumerate(outs) if i % 15 == 0}
        ctx_seq = [o.result.metrics.context_executor for o in outs]
        gen_seq = [o.result.metrics.generation_executor for o in outs]
        # Round robin: consecutive requests alternate over the executors of each phase.
        if n_ctx > 1:
            assert ctx_seq[:8] == [orch.context_ids[i % n_ctx] for i in range(8)], ctx_seq[:8]
        assert set(ctx_seq) == set(orch.context_ids)
        assert set(gen_seq) == set(orch.generation_ids)
        for o in outs:
            _check_hops_in_causal_order(o.result.metrics.hops)
        orch.wait_pools_full()


# Every hop of a disaggregated request through the Python API (no HTTP), in causal order
# (hops.py); one node, so the ranks' wall clocks agree.
_DISAGG_HOPS = ("arrival", "dispatch", "admitted", "first_chunk", "ctx_answer_sent", "ctx_answer_received",
                "gen_enqueued", "gen_admitted", "claim_sent", "claim_granted", "kv_landed", "first_token", "final")


# The direct hand-off's (direct_handoff on): rank 0 parks the generation phase first, and the
# context's params go straight to it; rank 0's context-answer hops run beside the hand-off.
_DIRECT_HOPS = ("arrival", "gen_enqueued", "dispatch", "admitted", "first_chunk", "ctx_ready_sent", "gen_admitted",
                "claim_sent", "claim_granted", "kv_landed", "first_token", "final")


def _check_hops_in_causal_order(hops):
    direct = hops is not None and "ctx_ready_sent" in hops
    want = _DIRECT_HOPS if direct else _DISAGG_HOPS
    assert hops is not None and set(hops) == set(want) | ({"ctx_answer_sent", "ctx_answer_received"} if direct
                                                          else set()), hops
    times = [hops[h] for h in want]
    assert times == sorted(times), [(h, round((hops[h] - hops["arrival"]) * 1e3, 3)) for h in want]
    if direct:  # its answer to rank 0 leaves after the notice, and reaches rank 0 before the final one
        assert hops["ctx_ready_sent"] <= hops["ctx_answer_sent"] <= hops["ctx_answer_received"] <= hops["final"]


@pytest.mark.world(3)
def test_64_requests_1ctx_1gen():
    _many_in_flight(1, 1)


@pytest.mark.world(4)
def test_64_requests_2ctx_1gen():
    _many_in_flight(2, 1)


@pytest.mark.world(4)
def test_64_requests_1ctx_2gen():
    _many_in_flight(1, 2)

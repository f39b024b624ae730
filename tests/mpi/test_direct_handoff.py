"""The direct hand-off (`cache_transceiver_config.direct_handoff`) through a real 1 context + 1
generation job: the generation side learns of the context from the context leader, not from rank 0.

The other disaggregated tests (test_disaggregated.py, test_context_params.py, test_cancel_stages.py)
run with it as the topology's default says; DISAGG_DIRECT_HANDOFF=1 or 0 turns it on or off there.
"""

from __future__ import annotations

import pytest

from disagg_mpi import Executor, ExecutorConfig, KvCacheConfig, Request, launch
from tests.mpi.helpers import tiny_prompts, tiny_topology

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.world(3)]

GEN_BLOCKS = 64  # 256 tokens: a few requests at a time, so some wait for blocks (and claim then)
RANK0_HOPS = ("arrival", "gen_enqueued", "dispatch")


def _topology(direct: bool):
    topo = tiny_topology(1, 1, cache_transceiver_config={"enable_cache_transceiver": True, "direct_handoff": direct})
    gen = topo.generation_executors[0]
    gen = gen.model_copy(update={"kv_cache": gen.kv_cache.model_copy(update={"num_blocks": GEN_BLOCKS})})
    return topo.model_copy(update={"generation_executors": [gen]})


def _requests(prompts):
    """Greedy and sampled, streamed and not, with logprobs and the prompt's logprobs."""
    return [Request(p, max_tokens=10, ignore_eos=True, streaming=i % 3 == 0,
                    num_prompt_logprobs=1 if i % 4 == 0 else None, num_logprobs=2,
                    output_config=_logprobs(i % 2 == 0),
                    sampling_config=_sampling(i)) for i, p in enumerate(prompts)]


def _logprobs(on: bool):
    from disagg_mpi.api import OutputConfig

    return OutputConfig(return_log_probs=on)


def _sampling(i: int):
    from disagg_mpi.api import SamplingConfig

    return SamplingConfig(temperature=0.8, top_k=20, seed=100 + i) if i % 2 else SamplingConfig()


def test_direct_hand_off_equals_in_process_and_skips_rank_0(monkeypatch):
    monkeypatch.delenv("DISAGG_DIRECT_HANDOFF", raising=False)  # (it would win over the topology)
    prompts = tiny_prompts(24)
    with launch(_topology(direct=True)) as orch:
        if orch is None:
            return
        assert orch.direct
        outs = orch.generate(_requests(prompts), timeout=300)
        # A prompt the generation pool cannot take: refused there while its context runs; the client
        # gets that error once, and the context's blocks are released at once, not after a lease.
        [too_big] = orch.generate([Request(list(range(1, 251)), max_tokens=10, ignore_eos=True)], timeout=120)
        # A context that its first token ends (a stop token): the context's answer is the final one and
        # the parked generation phase is cancelled.
        first = outs[1].result.output_token_ids[0]
        [stopped] = orch.generate([Request(prompts[1], max_tokens=10, stop_token_ids=[first],
                                           sampling_config=_sampling(1))], timeout=120)
        stats = orch.wait_pools_full(timeout=10)
        assert orch.num_tracked == 0 and stats[1]["parked"] == 0 and stats[0]["held_contexts"] == 0
    want = Executor("random:tiny", ExecutorConfig(max_batch_size=16, max_num_tokens=256,
                                                  kv_cache_config=KvCacheConfig(4, 512))).generate(_requests(prompts))
    assert all(o.error_msg is None for o in outs), [o.error_msg for o in outs]
    assert [o.result.output_token_ids for o in outs] == [w.result.output_token_ids for w in want]
    for o, w in zip(outs, want):
        assert (o.result.log_probs is None) == (w.result.log_probs is None)
        if o.result.log_probs:
            assert [lp.top_ids for lp in o.result.log_probs] == [lp.top_ids for lp in w.result.log_probs]
        assert (o.result.prompt_log_probs is None) == (w.result.prompt_log_probs is None)
    waited = 0
    for o in outs:
        h, m = o.result.metrics.hops, o.result.metrics
        # Rank 0 sent the generation phase before the context even started, so nothing of rank 0's
        # lies between the context's notice and the generation side's admission.
        assert max(h[x] for x in RANK0_HOPS) <= h["admitted"] <= h["ctx_ready_sent"] <= h["gen_admitted"], h
        assert h["gen_enqueued"] < h["ctx_answer_sent"] <= h["ctx_answer_received"], h
        assert h["gen_admitted"] <= h["claim_sent"] <= h["claim_granted"] <= h["kv_landed"] <= h["first_token"]
        assert m.context_executor == 0 and m.generation_executor == 1 and m.kv_transfer_bytes > 0
        waited += h["claim_sent"] < h["claim_granted"]  # waited for blocks, then claimed as usual
    assert waited < len(outs)  # most used the grant that came with the notice
    assert too_big.error_msg and "KV blocks" in too_big.error_msg, too_big
    assert stopped.error_msg is None and stopped.result.output_token_ids == [first]
    assert stopped.result.finish_reason == "stop" and "gen_admitted" not in stopped.result.metrics.hops


def test_off_rank_0_moves_the_request_on(monkeypatch):
    monkeypatch.delenv("DISAGG_DIRECT_HANDOFF", raising=False)
    with launch(_topology(direct=False)) as orch:
        if orch is None:
            return
        assert not orch.direct
        [out] = orch.generate([Request(tiny_prompts(2)[1], max_tokens=4, ignore_eos=True)], timeout=120)
        h = out.result.metrics.hops
        assert "ctx_ready_sent" not in h and h["ctx_answer_received"] <= h["gen_enqueued"] <= h["gen_admitted"]
        orch.wait_pools_full(timeout=10)

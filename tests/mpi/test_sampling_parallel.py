"""Penalties, logit_bias, min_tokens, seeded sampling and logprobs (the prompt's too) through
pipeline-parallel executors, disaggregated (the last PP stage samples, so the token histories cross
ranks in the step plan), and from a TP2 context to a TP1 generation executor: equal to one
aggregated executor in process.

Job sizes used here: world(4), world(5)
"""

from __future__ import annotations

import pytest

from disagg_mpi import Request
from disagg_mpi.api import OutputConfig, SamplingConfig
from tests.mpi.helpers import disaggregated_vs_in_process, tiny_prompts

pytestmark = pytest.mark.mpi(min_size=2)

CONFIGS = [SamplingConfig(frequency_penalty=1.5, presence_penalty=0.5),
           SamplingConfig(repetition_penalty=0.6, logit_bias={5: 4.0, 9: -100.0}),
           SamplingConfig(temperature=0.9, seed=7, top_k=30, min_p=0.05, frequency_penalty=1.0,
                          repetition_penalty=1.3),
           SamplingConfig(temperature=1.1, seed=8, top_p=0.9, logit_bias={2: 100.0}, min_tokens=4)]


def _requests() -> list[Request]:
    prompts = tiny_prompts(4)
    # logprobs on the first and third configs, the prompt's on the second and third: computed on the last
    # stage, sent to the leader with the tokens
    return [Request(p, max_tokens=9, sampling_config=c, ignore_eos=(c.min_tokens == 0), stop_token_ids=[2],
                    output_config=OutputConfig(return_log_probs=j % 2 == 0), num_logprobs=j + 1,
                    num_prompt_logprobs=j if j in (1, 2) else None)
            for p in prompts for j, c in enumerate(CONFIGS)]


@pytest.mark.world(5)
def test_penalties_through_pp2_disaggregated_equal_aggregated_in_process():
    _check(disaggregated_vs_in_process(_requests))


@pytest.mark.world(4)
def test_penalties_from_a_tp2_context_to_a_tp1_generation_equal_aggregated_in_process():
    """Hetero TP: the context's two ranks each hold half the KV heads; the generation rank all of
    them (the KV is re-sharded on the way); the first TP rank samples on both sides."""
    _check(disaggregated_vs_in_process(_requests, ctx=(2, 1), gen=(1, 1)))


def _check(run) -> None:
    if run is None:
        return
    outs, wants, ex = run
    got = [o.result.output_token_ids for o in outs]
    got_lps = [o.result.log_probs for o in outs]
    assert got == [r.result.output_token_ids for r in wants]
    for g, w in zip(got_lps, [r.result.log_probs for r in wants]):  # the first token's came in the hand-off
        assert (g is None) == (w is None)
        if w is not None:
            assert len(g) == len(w) and all(a.top_ids == b.top_ids and abs(a.logprob - b.logprob) < 1e-5
                                            for a, b in zip(g, w))
    for o, w in zip(outs, wants):  # the prompt's: the context executor's last stage computed them
        g, want = o.result.prompt_log_probs, w.result.prompt_log_probs
        assert (g is None) == (want is None)
        if want is not None:
            assert len(g) == len(want) and g[0] is None and all(
                a.top_ids == b.top_ids and abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(g[1:], want[1:]))
    assert sum(o.result.prompt_log_probs is not None for o in outs) == 8
    forced = got[3::4]  # logit_bias forces token 2 (a stop token), held back by min_tokens=4
    assert all(g == g[:4] + [2] and 2 not in g[:4] for g in forced), forced
    plain = [r.result.output_token_ids for r in ex.generate(
        [Request(p, max_tokens=9, ignore_eos=True) for p in tiny_prompts(4)])]
    assert all(a != b for a, b in zip(got[0::4], plain)) and all(a != b for a, b in zip(got[1::4], plain))

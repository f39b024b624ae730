"""The official `openai` SDK against `disagg-mpi serve`, logprobs: completions and chat, streamed,
cut by a stop string, the prompt's (echo), carried from a client's context_only to its
generation_only request, against transformers; and best_of, which ranks candidates by them."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from . import sdk
from .sdk import PROMPTS, by_index, check_offsets, close, complete, ids_of, stop_case

# ---- logprobs ---------------------------------------------------------------------------------------------


def test_completion_logprobs_match_transformers_and_agg_equals_disagg(clients, folder):
    import torch
    from transformers import AutoModelForCausalLM

    got = {}
    for mode, client in clients.items():
        greedy = by_index(complete(client, PROMPTS[:2], logprobs=5).choices)
        sampled = complete(client, PROMPTS[2], logprobs=20, temperature=1.1, seed=5, frequency_penalty=1.0).choices[0]
        for c in (*greedy, sampled):
            assert len(c.logprobs.token_logprobs) == len(ids_of(c)) == 30
            check_offsets(c)
        got[mode] = (*greedy, sampled)
    for a, d in zip(got["agg"], got["disagg"]):
        assert ids_of(a) == ids_of(d) and a.logprobs.tokens == d.logprobs.tokens
        assert close(a.logprobs.token_logprobs, d.logprobs.token_logprobs)  # the first token's too
        assert [list(x) for x in a.logprobs.top_logprobs] == [list(x) for x in d.logprobs.top_logprobs]
        assert all(close(list(x.values()), list(y.values())) for x, y in zip(a.logprobs.top_logprobs,
                                                                              d.logprobs.top_logprobs))
    assert all(len(t) == 20 for t in got["agg"][2].logprobs.top_logprobs)
    # against transformers' log-softmax (fp32), teacher-forced over the greedy and the sampled outputs
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt, c in zip([PROMPTS[0], PROMPTS[1], PROMPTS[2]], got["disagg"]):
        ids = torch.tensor([prompt + ids_of(c)])
        with torch.no_grad():
            ref = torch.log_softmax(hf(ids, attention_mask=torch.ones_like(ids)).logits[0].float(), -1)
        want = [ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(ids_of(c))]
        assert close(c.logprobs.token_logprobs, want, 2e-3)


def test_streamed_logprobs_equal_the_whole_ones(clients):
    whole = complete(clients["agg"], PROMPTS[3], logprobs=3).choices[0]
    for mode, client in clients.items():
        chunks = [c.choices[0] for c in complete(client, PROMPTS[3], logprobs=3, stream=True) if c.choices]
        lps = [c.logprobs for c in chunks if c.logprobs is not None]
        assert sum(len(lp.tokens) for lp in lps) == 30, mode
        assert [t for lp in lps for t in lp.tokens] == whole.logprobs.tokens
        assert [o for lp in lps for o in lp.text_offset] == whole.logprobs.text_offset
        assert close([v for lp in lps for v in lp.token_logprobs], whole.logprobs.token_logprobs)


def test_chat_logprobs_both_modes_streamed_too(clients):
    msgs = [{"role": "user", "content": "w3 w4 w5"}]
    kw = {"model": sdk.MODEL, "messages": msgs, "max_completion_tokens": 12, "logprobs": True, "top_logprobs": 4,
          "extra_body": {"ignore_eos": True}}
    ref = clients["agg"].chat.completions.create(**kw).choices[0]
    content = ref.logprobs.content
    assert len(content) == 12 and "".join(e.token for e in content) == ref.message.content
    assert all(e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 4 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)  # greedy: the best one
    for mode, client in clients.items():
        c = client.chat.completions.create(**kw).choices[0]
        streamed = [e for ch in client.chat.completions.create(**kw, stream=True) if ch.choices
                    and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
        for got in (c.logprobs.content, streamed):
            assert [e.token for e in got] == [e.token for e in content], mode
            assert close([e.logprob for e in got], [e.logprob for e in content])
            assert [[t.token for t in e.top_logprobs] for e in got] == [[t.token for t in e.top_logprobs]
                                                                         for e in content]


def test_a_stop_string_cuts_the_logprobs_too(clients, reference):
    i, stop = stop_case(reference)
    whole = complete(clients["agg"], PROMPTS[i], logprobs=2).choices[0]
    for mode, client in clients.items():
        c = complete(client, PROMPTS[i], logprobs=2, stop=stop).choices[0]
        n = len(ids_of(c))
        assert c.finish_reason == "stop" and n < 30 and len(c.logprobs.token_logprobs) == n, mode
        assert close(c.logprobs.token_logprobs, whole.logprobs.token_logprobs[:n])
        chunks = [x.choices[0] for x in complete(client, PROMPTS[i], logprobs=2, stop=stop, stream=True) if x.choices]
        assert sum(len(x.logprobs.tokens) for x in chunks if x.logprobs) == n


def test_echo_logprobs_score_the_prompt_as_transformers_does(clients, folder):
    """lm-evaluation-harness's loglikelihood call: echo, logprobs=1, max_tokens 1 (or 0): the prompt's
    logprobs first (the first null), computed by the context executor in the disaggregated server."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    prompt, n = PROMPTS[3], len(PROMPTS[3])
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids, attention_mask=torch.ones_like(ids)).logits[0].float(), -1)
    want = [ref[i - 1, prompt[i]].item() for i in range(1, n)]
    for mode, client in clients.items():
        c = complete(client, prompt, echo=True, logprobs=1, max_tokens=1).choices[0]
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == n + 1, mode
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(math.isfinite(v) and v <= 0 for v in lp.token_logprobs[1:])
        assert close(lp.token_logprobs[1:n], want, 2e-3), mode
        assert all(len(t) == 1 for t in lp.top_logprobs[1:])
        check_offsets(c)
        plain = complete(client, prompt, logprobs=1, max_tokens=1).choices[0]
        assert close(lp.token_logprobs[n:], plain.logprobs.token_logprobs) and ids_of(c) == ids_of(plain)
        # max_tokens 0: the prompt alone, nothing generated
        r = complete(client, prompt, echo=True, logprobs=1, max_tokens=0)
        zero = r.choices[0]
        assert ids_of(zero) == [] and zero.finish_reason == "length" and r.usage.completion_tokens == 0, mode
        assert zero.text == c.text[: zero.logprobs.text_offset[-1] + len(zero.logprobs.tokens[-1])]
        assert close(zero.logprobs.token_logprobs[1:], lp.token_logprobs[1:n]) and len(zero.logprobs.tokens) == n
        # streamed: the first chunk carries the prompt's, then one entry per token
        chunks = [x.choices[0] for x in complete(client, prompt, echo=True, logprobs=1, max_tokens=3, stream=True)
                  if x.choices]
        firsts = [x.logprobs for x in chunks if x.logprobs is not None]
        assert firsts[0].token_logprobs[0] is None and close(firsts[0].token_logprobs[1:n], want, 2e-3), mode
        assert sum(len(x.tokens) for x in firsts) == n + 3
        assert "".join(x.text for x in chunks) == "".join(t for x in firsts for t in x.tokens)
        streamed0 = [x for x in complete(client, prompt, echo=True, logprobs=1, max_tokens=0, stream=True) if x.choices]
        assert len(streamed0) == 1 and streamed0[0].choices[0].finish_reason == "length"
        assert close(streamed0[0].choices[0].logprobs.token_logprobs[1:], want, 2e-3)
    # a string prompt: its words are the tokens, at their offsets in the echoed text
    c = complete(clients["disagg"], "w5 w9 w44", echo=True, logprobs=2, max_tokens=0).choices[0]
    assert c.text == "w5 w9 w44" and c.logprobs.tokens == ["w5", " w9", " w44"] and c.logprobs.text_offset == [0, 2, 5]
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs[1:])


def test_bad_logprobs_are_400_naming_the_field(agg):
    for call, param in [(lambda: complete(agg, PROMPTS[0], logprobs=21), "logprobs"),
                        (lambda: complete(agg, "w1 w2", max_tokens=0), "max_tokens"),
                        (lambda: agg.chat.completions.create(model=sdk.MODEL,
                                                             messages=[{"role": "user", "content": "x"}],
                                                             logprobs=True, top_logprobs=21), "top_logprobs")]:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.body["param"] == param


def test_context_only_then_generation_only_carries_the_first_logprobs(clients):
    """A client that runs the two phases itself: the first token's logprobs come back in both answers,
    the generation side's from the signed hand-off state, equal to one aggregated request's."""
    client = clients["disagg"]
    whole = complete(clients["agg"], PROMPTS[4], logprobs=3, max_tokens=8).choices[0]
    ctx = complete(client, PROMPTS[4], logprobs=3, max_tokens=8,
                   extra_body={"ignore_eos": True, "disaggregated_params": {"request_type": "context_only"}})
    dp = ctx.choices[0].model_extra["disaggregated_params"]
    assert close(ctx.choices[0].logprobs.token_logprobs, whole.logprobs.token_logprobs[:1])
    gen = {"request_type": "generation_only", "first_gen_tokens": dp["first_gen_tokens"],
           "ctx_request_id": dp["ctx_request_id"], "opaque_state": dp["opaque_state"]}
    with pytest.raises(openai.BadRequestError) as info:  # more alternatives than the context phase computed
        complete(client, PROMPTS[4], logprobs=4, max_tokens=8, extra_body={"ignore_eos": True,
                                                                          "disaggregated_params": gen})
    assert info.value.body["param"] == "logprobs"
    c = complete(client, PROMPTS[4], logprobs=3, max_tokens=8,
                 extra_body={"ignore_eos": True, "disaggregated_params": gen}).choices[0]
    assert ids_of(c) == ids_of(whole) and close(c.logprobs.token_logprobs, whole.logprobs.token_logprobs)
    assert [list(t) for t in c.logprobs.top_logprobs] == [list(t) for t in whole.logprobs.top_logprobs]


# ---- best_of -------------------------------------------------------------------------------------------


def _total_logprob(choice) -> float:
    return sum(choice.logprobs.token_logprobs)


def test_best_of_returns_the_n_most_likely_candidates(agg):
    """best_of=4, n=2 samples the same four candidates as n=4 (same seed), returns the two with the
    highest cumulative logprob, best first, and bills all four."""
    kw = {"max_tokens": 6, "temperature": 1.5, "seed": 11, "extra_body": {"ignore_eos": True}}
    four = complete(agg, PROMPTS[0], n=4, logprobs=0, **kw).choices
    totals = [_total_logprob(c) for c in four]
    assert len(set(totals)) == 4, totals     # four different candidates
    best = complete(agg, PROMPTS[0], n=2, best_of=4, logprobs=0, **kw)
    want = sorted(range(4), key=lambda i: -totals[i])[:2]
    assert [ids_of(c) for c in best.choices] == [ids_of(four[i]) for i in want]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == 4 * 6
    plain = complete(agg, PROMPTS[0], n=1, best_of=4, **kw).choices   # logprobs not asked: not shown
    assert len(plain) == 1 and plain[0].logprobs is None and ids_of(plain[0]) == ids_of(four[want[0]])


def test_best_of_is_refused_where_it_cannot_hold(agg):
    for kw, words in (({"n": 3, "best_of": 2}, "integer in [n=3"),
                      ({"best_of": 4, "stream": True}, "cannot be streamed")):
        with pytest.raises(openai.BadRequestError) as e:
            complete(agg, PROMPTS[0], **kw)
        assert e.value.body["param"] == "best_of" and words in e.value.body["message"]

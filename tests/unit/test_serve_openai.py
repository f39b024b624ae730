"""The official `openai` SDK against `disagg-mpi serve`: stop strings, penalties, logit_bias, batched
prompts and echo, logprobs, each on an aggregated server (mpiexec -n 2) and a 1 context + 1 generation
server (mpiexec -n 3) that must answer token for token alike. The model is word_model.py's small
random Llama whose tokens are words, so its output is text; greedy unless seeded.

The two servers are module fixtures (serve_server.launch): started once for every test here.
"""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from tests.unit.serve_server import AGG_TOPOLOGY, KEY, TOPOLOGY, launch
from tests.unit.word_model import write_word_model

PROMPTS = [[(5 * i + 17 * j + 3) % 500 for j in range(3 + 4 * i)] for i in range(6)]
LONG = {"max_tokens": 30, "extra_body": {"ignore_eos": True}}
MODEL = ""  # the model folder: the served model's name (set by the `folder` fixture)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("openai")


@pytest.fixture(scope="module")
def folder(workdir):
    global MODEL
    MODEL = str(write_word_model(workdir / "words"))
    return MODEL


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def agg(workdir, folder):
    with launch(workdir, "agg", AGG_TOPOLOGY.replace('"random:tiny"', f'"{folder}"'), 2) as srv:
        yield _client(srv)


@pytest.fixture(scope="module")
def disagg(workdir, folder, agg):  # after agg: the two start one after the other on a 2-core machine
    with launch(workdir, "disagg", TOPOLOGY.replace('"random:tiny"', f'"{folder}"'), 3) as srv:
        yield _client(srv)


@pytest.fixture(scope="module")
def clients(agg, disagg):
    return {"agg": agg, "disagg": disagg}


def ids_of(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def complete(client, prompt, **kw):
    args = {**LONG, **kw}
    return client.completions.create(model=MODEL, prompt=prompt, **args)


@pytest.fixture(scope="module")
def reference(agg):
    """Greedy text and tokens of each prompt, without stop strings (aggregated)."""
    out = []
    for p in PROMPTS:
        c = complete(agg, p).choices[0]
        out.append((c.text, ids_of(c)))
    return out


def stop_case(reference, skip: int = 0):
    """(prompt index, stop string): the end of one word, the space and the start of the next (so the
    stop spans two tokens), at its first place in the text, after some words."""
    for i, (text, _) in enumerate(reference[skip:], skip):
        for space in range(12, len(text) - 3):
            s = text[space - 1: space + 3]
            if text[space] == " " and text.find(s) == space - 1:
                return i, s
    pytest.fail(f"no stop string in the reference outputs: {reference}")


# ---- stop strings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["agg", "disagg"])
def test_stop_string_ends_the_text_before_it(clients, reference, mode):
    i, stop = stop_case(reference)
    text = reference[i][0]
    c = complete(clients[mode], PROMPTS[i], stop=stop).choices[0]
    assert stop not in c.text and len(c.text) >= 10
    assert c.text == text[: text.index(stop)] and c.finish_reason == "stop"
    got = ids_of(c)
    assert got == reference[i][1][: len(got)] and len(got) < len(reference[i][1])
    c = complete(clients[mode], PROMPTS[i], stop=[stop, "\x00never"],
                 extra_body={"ignore_eos": True, "include_stop_str_in_output": True}).choices[0]
    assert c.text == text[: text.index(stop) + len(stop)] and c.finish_reason == "stop"


@pytest.mark.parametrize("mode", ["agg", "disagg"])
def test_streamed_stop_never_leaks(clients, reference, mode):
    i, stop = stop_case(reference, 1)
    text = reference[i][0]
    chunks = list(complete(clients[mode], PROMPTS[i], stop=stop, stream=True,
                           stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len(pieces) > 2
    assert "".join(pieces) == text[: text.index(stop)]  # everything sent: no stop character among it
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    got = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert chunks[-1].usage.completion_tokens == len(got) and got == reference[i][1][: len(got)]


def test_chat_stop_in_both_modes(clients):
    msgs = [{"role": "user", "content": "Hello there"}]
    full = clients["agg"].chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=30,
                                                  extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stop = stop_case([(text, None)])[1]
    for mode in ("agg", "disagg"):
        c = clients[mode].chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=30,
                                                  stop=[stop], extra_body={"ignore_eos": True})
        assert c.choices[0].message.content == text[: text.index(stop)]
        assert c.choices[0].finish_reason == "stop"
        streamed = clients[mode].chat.completions.create(model=MODEL, messages=msgs, stream=True,
                                                         max_completion_tokens=30, stop=stop,
                                                         extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_tools_and_bad_stop_are_400(agg):
    with pytest.raises(openai.BadRequestError) as info:
        complete(agg, PROMPTS[0], stop=["a", "b", "c", "d", "e"])
    assert info.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as info:
        agg.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                    tools=[{"type": "function", "function": {"name": "f"}}])
    assert info.value.body["param"] == "tools"


def test_run_jsonl_stop_lines(workdir, folder, reference, clients):
    """`disagg-mpi run` (1 context + 1 generation) ends lines at their stop strings like the server."""
    import json
    import subprocess
    import sys

    from tests.unit.http_client import clean_env

    i, stop = stop_case(reference)
    text = reference[i][0]
    lines = [{"id": "a", "input_ids": PROMPTS[i], "max_tokens": 30, "ignore_eos": True, "stop": stop},
             {"id": "a", "input_ids": PROMPTS[i], "max_tokens": 30, "ignore_eos": True, "stop": [stop],
              "include_stop_str_in_output": True, "stream": True},
             {"id": "c", "input_ids": PROMPTS[i], "max_tokens": 30, "ignore_eos": True},
             {"id": "d", "input_ids": PROMPTS[i], "stop": ["a"] * 5},
             {"id": "e", "input_ids": PROMPTS[i], "max_tokens": 30, "ignore_eos": True, "stop": stop, "logprobs": 2},
             {"id": "f", "input_ids": PROMPTS[i], "max_tokens": 2, "prompt_logprobs": 1}]
    (workdir / "stop.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = subprocess.run([sys.executable, "-m", "disagg_mpi.cli", "run", "--config", str(workdir / "disagg.yaml"),
                           "--input", str(workdir / "stop.jsonl"), "--output", str(workdir / "stop.out")],
                          env=clean_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = [json.loads(x) for x in (workdir / "stop.out").read_text().splitlines()]
    cut = text.index(stop)
    assert (out[0]["text"], out[0]["finish_reason"]) == (text[:cut], "stop")
    assert (out[1]["text"], out[1]["finish_reason"]) == (text[: cut + len(stop)], "stop")
    assert out[0]["output_ids"] == out[1]["output_ids"] == reference[i][1][: len(out[0]["output_ids"])]
    assert (out[2]["text"], out[2]["output_ids"]) == reference[i]
    assert out[3]["finish_reason"] == "error" and "at most 4" in out[3]["error"]
    # logprobs: one per kept token (cut at the stop too), as the aggregated server gives them
    want = complete(clients["agg"], PROMPTS[i], logprobs=2).choices[0].logprobs
    assert out[4]["output_ids"] == out[0]["output_ids"] and len(out[4]["logprobs"]) == len(out[0]["output_ids"])
    assert close([x["logprob"] for x in out[4]["logprobs"]], want.token_logprobs[: len(out[4]["logprobs"])])
    assert all(len(x["top"]) == 2 for x in out[4]["logprobs"])
    # prompt logprobs (vLLM's name; the context executor computes them): the aggregated server's echo
    scored = complete(clients["agg"], PROMPTS[i], echo=True, logprobs=1, max_tokens=1).choices[0].logprobs
    got = out[5]["prompt_logprobs"]
    assert len(got) == len(PROMPTS[i]) and got[0] is None and all(len(x["top"]) == 1 for x in got[1:])
    assert close([x["logprob"] for x in got[1:]], scored.token_logprobs[1: len(PROMPTS[i])])


# ---- penalties, logit_bias, min_tokens, top_k, min_p ----------------------------------------------------

PENALTIES = [({"frequency_penalty": -1.5}, {}), ({"presence_penalty": -2.0}, {}), ({}, {"repetition_penalty": 0.5}),
             ({"logit_bias": {"7": 6.0, "100": -100}}, {}),
             ({"frequency_penalty": 0.9, "presence_penalty": -1.7}, {"repetition_penalty": 1.3})]


def test_penalties_agg_equals_disagg_greedy_and_seeded(clients, reference):
    """Penalty state is recomputed from prompt + output on the generation executor: the disaggregated
    tokens equal the aggregated ones, greedy and seeded, and each penalty changes the output."""
    for kw, extra in PENALTIES:
        for sampling in ({}, {"temperature": 0.9, "seed": 11}, {"temperature": 1.2, "seed": 12, "top_p": 0.9}):
            got = {}
            for mode, client in clients.items():
                c = complete(client, PROMPTS[:2], extra_body={"ignore_eos": True, **extra}, **kw, **sampling)
                got[mode] = [ids_of(ch) for ch in sorted(c.choices, key=lambda ch: ch.index)]
            assert got["agg"] == got["disagg"], (kw, extra, sampling)
            if not sampling:
                assert all(g != r[1] for g, r in zip(got["agg"], reference[:2])), (kw, extra)


def test_logit_bias_forces_and_min_tokens_holds_eos(clients):
    for mode, client in clients.items():
        c = complete(client, PROMPTS[0], logit_bias={"42": 100}).choices[0]
        assert ids_of(c) == [42] * 30
        # EOS (token 1) forced, but not before 5 tokens: 5 others, then EOS ends the request
        c = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=20, logit_bias={"1": 100},
                                      extra_body={"min_tokens": 5}).choices[0]
        assert len(ids_of(c)) == 6 and ids_of(c)[-1] == 1 and 1 not in ids_of(c)[:5], mode
        assert c.finish_reason == "stop"
        seeded = [ids_of(complete(client, PROMPTS[1], temperature=1.0, seed=3,
                                  extra_body={"ignore_eos": True, "top_k": 2, "min_p": 0.2}).choices[0])
                  for _ in range(2)]
        assert seeded[0] == seeded[1]


def test_bad_penalties_are_400_naming_the_field(agg):
    for kw, param in [({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
                      ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"99999": 1}}, "logit_bias"),
                      ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty")]:
        with pytest.raises(openai.BadRequestError) as info:
            agg.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2, **kw)
        assert info.value.body["param"] == param


# ---- batched prompts, echo, n ---------------------------------------------------------------------------


def by_index(choices):
    return sorted(choices, key=lambda ch: ch.index)


def test_batched_prompts_in_order_equal_single_requests(clients, reference):
    for mode, client in clients.items():
        c = complete(client, PROMPTS)
        assert [ids_of(ch) for ch in by_index(c.choices)] == [r[1] for r in reference], mode
        assert [ch.index for ch in by_index(c.choices)] == list(range(len(PROMPTS)))
        assert c.usage.prompt_tokens == sum(map(len, PROMPTS)) and c.usage.completion_tokens == 30 * len(PROMPTS)


def test_string_prompts_with_echo_and_stop(clients, reference):
    texts = ["w5 w9 w44", "w100 w3 w100"]
    for mode, client in clients.items():
        plain = by_index(complete(client, texts).choices)
        echoed = by_index(complete(client, texts, echo=True).choices)
        assert [e.text for e in echoed] == [t + p.text for t, p in zip(texts, plain)], mode
        assert [ids_of(e) for e in echoed] == [ids_of(p) for p in plain]
        _, stop = stop_case([(plain[1].text, None)])
        streamed = list(complete(client, texts, echo=True, stop=stop, stream=True))
        text = {0: "", 1: ""}
        for ch in streamed:
            for x in ch.choices:
                text[x.index] += x.text
        assert text == {0: texts[0] + plain[0].text, 1: texts[1] + plain[1].text[: plain[1].text.index(stop)]}


def test_n_choices_seeded_differ_and_repeat(clients):
    runs = {}
    for mode, client in clients.items():
        runs[mode] = [[ids_of(ch) for ch in by_index(complete(client, PROMPTS[:2], n=3, temperature=1.0,
                                                                  seed=21).choices)] for _ in range(2)]
        assert runs[mode][0] == runs[mode][1], mode  # the same seed: the same choices
        first = runs[mode][0]
        assert len(first) == 6 and len({tuple(x) for x in first[:3]}) == 3  # choices differ
    assert runs["agg"] == runs["disagg"]
    one = ids_of(complete(clients["agg"], PROMPTS[0], temperature=1.0, seed=21).choices[0])
    assert one == runs["agg"][0][0]  # choice 0 is the request's own seed
    chat = clients["disagg"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w1 w2"}],
                                                     n=2, max_completion_tokens=5, temperature=1.0, seed=4)
    assert len(chat.choices) == 2 and all(c.finish_reason == "length" for c in chat.choices)
    assert chat.usage.completion_tokens == 10


def test_suffix_refused(agg):
    with pytest.raises(openai.BadRequestError) as info:
        agg.completions.create(model=MODEL, prompt="w1", suffix="w2")
    assert info.value.body["param"] == "suffix"


# ---- logprobs ---------------------------------------------------------------------------------------------


def close(a, b, tol=1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def check_offsets(c) -> None:
    """The token strings add up to the text, each at its text_offset."""
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text
    assert all(c.text[o:o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens))


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
    kw = {"model": MODEL, "messages": msgs, "max_completion_tokens": 12, "logprobs": True, "top_logprobs": 4,
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
                        (lambda: agg.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
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


# ---- streaming: one event per token (issue 23) ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["agg", "disagg"])
def test_stream_sends_each_token_as_its_own_event(clients, mode):
    """Each generated token is its own SSE event, carrying exactly that token's text (the word model's
    tokens are words: every token decodes to whole characters, so no event waits for the next one),
    in the order of the non-streamed output, and the usage counts as many tokens as events."""
    n = 48
    whole = complete(clients[mode], PROMPTS[2], max_tokens=n)
    chunks = list(complete(clients[mode], PROMPTS[2], max_tokens=n, stream=True,
                           stream_options={"include_usage": True}))
    content = [c.choices[0] for c in chunks if c.choices]
    assert [c.usage.completion_tokens for c in chunks if c.usage] == [n]
    assert [len(ids_of(c)) for c in content] == [1] * n  # one token an event, none without one
    for c in content:
        assert c.text.split() == [f"w{ids_of(c)[0]}"], (ids_of(c), c.text)
    assert [ids_of(c)[0] for c in content] == ids_of(whole.choices[0])

"""The official `openai` SDK against `disagg-mpi serve`, the text it returns: stop strings (and
`disagg-mpi run`'s), penalties, logit_bias, min_tokens, batched prompts and echo, n, one event per
streamed token; the aggregated and the disaggregated server must answer token for token alike."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from . import sdk
from .sdk import PROMPTS, by_index, close, complete, ids_of, stop_case

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
    full = clients["agg"].chat.completions.create(model=sdk.MODEL, messages=msgs, max_completion_tokens=30,
                                                  extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stop = stop_case([(text, None)])[1]
    for mode in ("agg", "disagg"):
        c = clients[mode].chat.completions.create(model=sdk.MODEL, messages=msgs, max_completion_tokens=30,
                                                  stop=[stop], extra_body={"ignore_eos": True})
        assert c.choices[0].message.content == text[: text.index(stop)]
        assert c.choices[0].finish_reason == "stop"
        streamed = clients[mode].chat.completions.create(model=sdk.MODEL, messages=msgs, stream=True,
                                                         max_completion_tokens=30, stop=stop,
                                                         extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.index(stop)]


def test_tools_and_bad_stop_are_400(agg):
    with pytest.raises(openai.BadRequestError) as info:
        complete(agg, PROMPTS[0], stop=["a", "b", "c", "d", "e"])
    assert info.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as info:
        agg.chat.completions.create(model=sdk.MODEL, messages=[{"role": "user", "content": "x"}],
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
        c = client.completions.create(model=sdk.MODEL, prompt=PROMPTS[0], max_tokens=20, logit_bias={"1": 100},
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
            agg.completions.create(model=sdk.MODEL, prompt=PROMPTS[0], max_tokens=2, **kw)
        assert info.value.body["param"] == param


# ---- batched prompts, echo, n ---------------------------------------------------------------------------


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
    chat = clients["disagg"].chat.completions.create(model=sdk.MODEL, messages=[{"role": "user", "content": "w1 w2"}],
                                                     n=2, max_completion_tokens=5, temperature=1.0, seed=4)
    assert len(chat.choices) == 2 and all(c.finish_reason == "length" for c in chat.choices)
    assert chat.usage.completion_tokens == 10


def test_suffix_refused(agg):
    with pytest.raises(openai.BadRequestError) as info:
        agg.completions.create(model=sdk.MODEL, prompt="w1", suffix="w2")
    assert info.value.body["param"] == "suffix"


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

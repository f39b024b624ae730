"""The official `openai` SDK against `disagg-mpi serve`: stop strings, penalties, logit_bias, batched
prompts and echo, each on an aggregated server (mpiexec -n 2) and a 1 context + 1 generation
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


def test_run_jsonl_stop_lines(workdir, folder, reference):
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
             {"id": "d", "input_ids": PROMPTS[i], "stop": ["a"] * 5}]
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

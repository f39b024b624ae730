"""No client can hurt another (issue 20), against a real `disagg-mpi serve` under mpiexec.

One module-scoped server (serve_server.py's topology: 1 context + 1 generation executor,
random:tiny). Each attack runs while a victim stream decodes on the same generation executor;
the victim must end with every token of its reference answer and finish_reason "length".
"""
# ruff: noqa: F811 - the tests take the imported fixtures by name

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request

import pytest

aiohttp = pytest.importorskip("aiohttp")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.http_client import post, run, stream
from tests.unit.serve_server import AUTH, PROMPTS, server, workdir  # noqa: F401 - fixtures

VOCAB = 1024  # random:tiny
VICTIM = {"prompt": PROMPTS[3], "max_tokens": 300, "ignore_eos": True}
BIG = 2**64


@pytest.fixture(scope="module")
def batch_run():
    """serve_server's `server` starts a `disagg-mpi run` beside it for test_serve_http.py; not needed here."""


@pytest.fixture(scope="module")
def victim_ref(server):
    status, body = run(_one(server, "/v1/completions", VICTIM))
    assert status == 200, body
    return body["choices"][0]["token_ids"]


async def _one(server, path, body):
    async with aiohttp.ClientSession() as s:
        return await post(s, server.url + path, body, AUTH)


def _cmpl(s, server, body=None, raw=None):
    return post(s, server.url + "/v1/completions", body, AUTH, raw)


async def _handle(s, server, prompt, max_tokens=8):
    """A genuine context_only answer: its disaggregated_params."""
    status, ctx = await _cmpl(s, server, {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                                          "disaggregated_params": {"request_type": "context_only"}})
    assert status == 200, ctx
    return ctx["choices"][0]["disaggregated_params"]


def _gen(dp, **over):
    return {"request_type": "generation_only", "first_gen_tokens": dp["first_gen_tokens"],
            "ctx_request_id": dp["ctx_request_id"], "opaque_state": dp["opaque_state"], **over}


def with_victim(server, victim_ref, attack):
    """Run `attack(session)` while a victim stream decodes; check the victim; return the attack's result."""
    async def go():
        async with aiohttp.ClientSession() as s:
            started = asyncio.Event()
            victim = asyncio.create_task(stream(s, server.url + "/v1/completions", {**VICTIM, "stream": True},
                                                AUTH, started))
            await asyncio.wait_for(started.wait(), 60)
            out = await attack(s)
            during = not victim.done()
            return out, during, await victim
    out, during, events = run(go())
    chunks = [e for _, e in events]
    assert chunks[-1] == "[DONE]", chunks[-3:]
    assert not any("error" in c for c in chunks[:-1]), [c for c in chunks if "error" in c]
    tokens = [t for c in chunks[:-1] for t in c["choices"][0]["token_ids"]]
    assert tokens == victim_ref
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert during, "the victim finished before the attack ended: the test proves nothing"
    return out


def _refused(status, body, param, needle=""):
    assert status == 400, (status, body)
    assert body["error"]["param"] == param, body
    assert needle in body["error"]["message"], body


def _wait_idle(server, timeout=30.0):
    """/health once nothing is in flight; rank 0 must then track no request at all."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(server.url + "/health") as r:
            h = json.loads(r.read())
        if h["in_flight"] == 0 and h["tracked"] == 0 or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


# ---- 1, 2: the hand-off ------------------------------------------------------------------------------


def test_out_of_vocabulary_first_token_fails_alone(server, victim_ref):
    prompt = PROMPTS[1]

    async def attack(s):
        _, whole = await _cmpl(s, server, {"prompt": prompt, "max_tokens": 8, "ignore_eos": True})
        dp = await _handle(s, server, prompt)
        bad = await _cmpl(s, server, {"prompt": prompt, "max_tokens": 8, "ignore_eos": True,
                                      "disaggregated_params": _gen(dp, first_gen_tokens=[VOCAB + 5])})
        genuine = await _cmpl(s, server, {"prompt": prompt, "max_tokens": 8, "ignore_eos": True,
                                          "disaggregated_params": _gen(dp)})
        return whole, bad, genuine
    whole, bad, genuine = with_victim(server, victim_ref, attack)
    _refused(*bad, "disaggregated_params.first_gen_tokens", "outside the vocabulary")
    assert genuine[0] == 200, genuine
    assert genuine[1]["choices"][0]["token_ids"] == whole["choices"][0]["token_ids"]


def test_first_tokens_and_prompt_are_bound_to_the_signed_state(server, victim_ref):
    prompt = PROMPTS[5]
    body = {"prompt": prompt, "max_tokens": 8, "ignore_eos": True}

    async def attack(s):
        _, whole = await _cmpl(s, server, body)
        dp = await _handle(s, server, prompt)
        t = dp["first_gen_tokens"][0]
        tries = [_gen(dp, first_gen_tokens=[(t + 1) % VOCAB]), _gen(dp, first_gen_tokens=[t, 5])]
        out = [await _cmpl(s, server, {**body, "disaggregated_params": p}) for p in tries]
        other = [(prompt[0] + 1) % VOCAB] + prompt[1:]  # same length, other tokens
        out.append(await _cmpl(s, server, {**body, "prompt": other, "disaggregated_params": _gen(dp)}))
        genuine = await _cmpl(s, server, {**body, "disaggregated_params": _gen(dp)})
        replay = await _cmpl(s, server, {**body, "disaggregated_params": _gen(dp)})
        return whole, out, genuine, replay
    whole, (altered, extra, other), genuine, replay = with_victim(server, victim_ref, attack)
    _refused(*altered, "disaggregated_params.first_gen_tokens", "differ from the token(s) the context phase")
    _refused(*extra, "disaggregated_params.first_gen_tokens", "differ from the token(s) the context phase")
    _refused(*other, "prompt", "prompt differs")
    # none of the refusals consumed the context: the genuine request still gets its KV
    assert genuine[0] == 200, genuine
    assert genuine[1]["choices"][0]["token_ids"] == whole["choices"][0]["token_ids"]
    _refused(*replay, "disaggregated_params", "already")  # an engine-side refusal names its field too


# ---- 4: integers of 2**64 and more ---------------------------------------------------------------------


def test_huge_integers_are_400_and_leave_no_bookkeeping(server, victim_ref):
    prompt = PROMPTS[0]
    base = {"prompt": prompt, "max_tokens": 4, "ignore_eos": True}

    async def attack(s):
        dp = await _handle(s, server, prompt, max_tokens=4)
        bodies = {"seed": {**base, "seed": BIG}, "top_k": {**base, "top_k": BIG},
                  "stop_token_ids": {**base, "stop_token_ids": [3, BIG]},
                  "disaggregated_params.first_gen_tokens": {
                      **base, "disaggregated_params": _gen(dp, first_gen_tokens=[BIG])},
                  "disaggregated_params.ctx_request_id": {
                      **base, "disaggregated_params": _gen(dp, ctx_request_id=BIG)}}
        out = {k: await _cmpl(s, server, b) for k, b in bodies.items()}
        out["genuine"] = await _cmpl(s, server, {**base, "disaggregated_params": _gen(dp)})
        return out
    out = with_victim(server, victim_ref, attack)
    for param in ("seed", "top_k", "stop_token_ids", "disaggregated_params.first_gen_tokens",
                  "disaggregated_params.ctx_request_id"):
        _refused(*out[param], param)
    assert out["genuine"][0] == 200, out["genuine"]
    h = _wait_idle(server)
    assert h["in_flight"] == 0 and h["tracked"] == 0, h


# ---- 5: text that is not Unicode, JSON too deep ------------------------------------------------------


def test_lone_surrogates_and_deep_json_are_400(server, victim_ref):
    async def attack(s):
        prompt = await _cmpl(s, server, raw=b'{"prompt": "a\\ud800b", "max_tokens": 2}')
        chat = await post(s, server.url + "/v1/chat/completions", None, AUTH,
                          raw=b'{"messages": [{"role": "user", "content": "x\\udfffy"}], "max_tokens": 2}')
        deep = b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}"  # under max_body_bytes, over the parser's stack
        nested = await _cmpl(s, server, raw=deep)
        return prompt, chat, nested
    prompt, chat, nested = with_victim(server, victim_ref, attack)
    _refused(*prompt, "prompt", "surrogate")
    _refused(*chat, "messages[0].content", "surrogate")
    _refused(*nested, None, "nested too deeply")


# ---- 7: what clients and operators see ------------------------------------------------------------------


def _outcomes(server):
    with urllib.request.urlopen(server.url + "/metrics") as r:
        fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    return {s.labels["outcome"]: s.value for s in fams["disagg_requests"].samples if s.name.endswith("_total")}


def test_refusals_count_as_refused_not_error(server, victim_ref):
    before = _outcomes(server)

    async def attack(s):
        return [await _cmpl(s, server, {"prompt": [VOCAB], "max_tokens": 2}),
                await _cmpl(s, server, {"prompt": [5], "max_tokens": 2, "seed": BIG})]
    oov, seed = with_victim(server, victim_ref, attack)
    _refused(*oov, "prompt", "outside the vocabulary")
    _refused(*seed, "seed")
    after = _outcomes(server)
    assert after["refused"] - before.get("refused", 0) == 2
    assert after["error"] == before["error"]


# ---- fuzz: 4xx or a correct answer, never 5xx -------------------------------------------------------------

_ODD_INTS = st.sampled_from([-1, 2**31, 2**63 - 1, 2**63, BIG, -(2**63) - 1, 2**100])
_WEIRD = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=4), st.sampled_from(["a\ud800"]),
                   st.integers(-3, 1100), _ODD_INTS,
                   st.lists(st.one_of(st.integers(-3, 1100), _ODD_INTS), min_size=1, max_size=3),
                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
# A servable body (small: a few tokens each), then one or two of its fields replaced by odd values:
# a body that is wrong in many places at once is refused for the first, and tests little else.
_VALID = st.fixed_dictionaries(
    {"prompt": st.one_of(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8), st.text(min_size=1, max_size=12))},
    optional={"max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
              "top_k": st.one_of(st.integers(0, 2000), _ODD_INTS), "seed": st.one_of(st.integers(0, 2**63 - 1), _ODD_INTS),
              "ignore_eos": st.booleans(), "stream": st.booleans(),
              "stop_token_ids": st.lists(st.one_of(st.integers(0, VOCAB - 1), _ODD_INTS), max_size=2)})
_DISAGG = st.fixed_dictionaries(
    {"request_type": st.sampled_from(["context_only", "generation_only", "context_and_generation", "x"])},
    optional={"first_gen_tokens": st.one_of(st.lists(st.one_of(st.integers(-1, VOCAB + 1), _ODD_INTS),
                                                     max_size=3), _WEIRD),
              "ctx_request_id": st.one_of(st.integers(-1, 50), _WEIRD),
              "opaque_state": st.one_of(st.sampled_from(["AAAA", "gqF2AaFwxAA=", "!!"]), _WEIRD)})
_FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos", "n",
           "stop", "user", "disaggregated_params"]
_CHANGES = st.lists(st.tuples(st.sampled_from(_FIELDS), st.one_of(_WEIRD, _DISAGG)), max_size=2)
_BODY = st.builds(lambda body, changes: {**body, **dict(changes)}, _VALID, _CHANGES)
_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                            "content": st.one_of(st.text(max_size=10), _WEIRD)}),
                     min_size=1, max_size=3)
_CHAT_CHANGES = st.lists(st.tuples(st.sampled_from(["messages", "max_completion_tokens"] + _FIELDS[1:]),
                                   st.one_of(_WEIRD, _DISAGG, _MESSAGES)), max_size=2)
_CHAT_BODY = st.builds(lambda body, messages, changes: {**{k: v for k, v in body.items() if k != "prompt"},
                                                         "messages": messages, **dict(changes)},
                       _VALID, _MESSAGES, _CHAT_CHANGES)


def _from_sse(raw: bytes) -> dict:
    """A stream as the body it stands for: every token and the last finish_reason (or its error)."""
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events and events[-1] == b"[DONE]", raw[-200:]
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    if errors:
        return {"stream_error": errors[0]}
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    return {"choices": [{"token_ids": [t for ch in choices for t in ch["token_ids"]],
                         "finish_reason": choices[-1]["finish_reason"]}]}


def _post_sync(url, body):
    data = json.dumps(body).encode()  # (NaN and Infinity too: the server's parser takes them)
    req = urllib.request.Request(url, data, {"Content-Type": "application/json", **AUTH})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            if r.headers.get("Content-Type", "").startswith("text/event-stream"):
                return r.status, _from_sse(raw)
            return r.status, json.loads(raw)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _check_answer(body, status, out, max_tokens_field="max_tokens"):
    """4xx with a message, or a 200 whose answer is well formed: never a 5xx, never a broken stream."""
    assert status < 500, (body, out)
    if status != 200:
        assert out["error"]["message"], out
        return
    assert "stream_error" not in out, (body, out)
    [choice] = out["choices"]
    assert choice["finish_reason"] in ("stop", "length"), out
    assert all(0 <= t < VOCAB for t in choice["token_ids"]), out
    mode = (body.get("disaggregated_params") or {}).get("request_type")
    default = 16 if max_tokens_field == "max_tokens" else 128
    limit = 1 if mode == "context_only" else (body.get(max_tokens_field) or body.get("max_tokens") or default)
    assert 1 <= len(choice["token_ids"]) <= limit, out


@settings(max_examples=int(os.environ.get("DISAGG_FUZZ_EXAMPLES", "100")), deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
@given(body=_BODY)
def test_fuzz_bodies_get_4xx_or_a_correct_answer(server, body):
    _check_answer(body, *_post_sync(server.url + "/v1/completions", body))


@settings(max_examples=int(os.environ.get("DISAGG_FUZZ_EXAMPLES", "60")), deadline=10_000,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_CHAT_BODY)
def test_fuzz_chat_bodies_get_4xx_or_a_correct_answer(server, body):
    _check_answer(body, *_post_sync(server.url + "/v1/chat/completions", body), "max_completion_tokens")


def test_after_the_fuzz_nothing_is_left_behind(server):
    h = _wait_idle(server)
    assert h["in_flight"] == 0 and h["tracked"] == 0, h

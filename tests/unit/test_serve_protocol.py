"""OpenAI bodies -> engine requests (no server, no MPI)."""

from __future__ import annotations

import base64

import pytest

from disagg_mpi.api import Response, Result
from disagg_mpi.model.tokenizer import Tokenizer
from disagg_mpi.serve.protocol import (
    CONTEXT_ONLY,
    GENERATION_ONLY,
    ApiError,
    parse_chat,
    parse_completion,
    parse_json_body,
)
from disagg_mpi.serve.responses import chunk, full_body
from disagg_mpi.stops import StopTracker

TOK = Tokenizer.bytes_only(1024)
NAMES = ("random:tiny",)


def comp(**body):
    return parse_completion(body, TOK, NAMES, 1024)


def refused(fn, body, param=None, status=400, contains=None):
    with pytest.raises(ApiError) as info:
        fn(body, TOK, NAMES, 1024)
    err = info.value
    assert err.status == status, err.message
    if param is not None:
        assert err.param == param, err.message
    if contains:
        assert contains in err.message
    body = err.body()["error"]
    assert body["type"] and body["message"]
    return err


def test_completion_text_ids_and_params():
    p = comp(prompt="hi", max_tokens=5, temperature=0.5, top_p=0.9, top_k=7, seed=3, stop_token_ids=[2],
             ignore_eos=True, n=1, user="u", logprobs=None, model="random:tiny")
    r = p.request
    assert r.input_token_ids == TOK.encode("hi") and r.max_tokens == 5
    assert (r.sampling_config.temperature, r.sampling_config.top_p, r.sampling_config.top_k,
            r.sampling_config.seed) == (0.5, 0.9, 7, 3)
    assert r.stop_token_ids == [2] and r.ignore_eos and not p.stream
    assert comp(prompt=[5, 6, 7]).request.input_token_ids == [5, 6, 7]
    assert comp(prompt=[[5, 6]]).request.input_token_ids == [5, 6]
    assert comp(prompt="x").request.max_tokens == 16
    assert comp(prompt="x").request.sampling_config.temperature == 0.0


@pytest.mark.parametrize("body,param", [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a", [1, 2]]}, "prompt"),
    ({"prompt": [[1, 2], [3, "x"]]}, "prompt[1]"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": ["x"] * 5, "n": 16}, "n"),
    ({"prompt": ["x", "y"], "disaggregated_params": {"request_type": "context_only"}}, "disaggregated_params"),
    ({"prompt": [1, 5000]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "3"}, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": 1.5}, "top_k"),
    ({"prompt": "x", "seed": -2}, "seed"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0, "echo": False}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens"),
    ({"prompt": "x", "logprobs": 2, "echo": True, "disaggregated_params": {
        "request_type": "generation_only", "first_gen_tokens": [1], "ctx_request_id": 1, "opaque_state": "AA=="}},
     "echo"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "stop": "a", "include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
    ({"prompt": "x", "ignore_eos": "no"}, "ignore_eos"),
    ({"prompt": "x", "stop_token_ids": [1.5]}, "stop_token_ids"),
    ({"prompt": "x", "disaggregated_params": {"request_type": "bogus"}}, "disaggregated_params.request_type"),
    ({"prompt": "x", "disaggregated_params": {"request_type": "generation_only", "first_gen_tokens": [1],
                                              "ctx_request_id": 1, "opaque_state": "!!"}},
     "disaggregated_params.opaque_state"),
    ({"prompt": "x", "stream": True, "disaggregated_params": {"request_type": "context_only"}}, "stream"),
])
def test_bad_completion_bodies(body, param):
    refused(parse_completion, body, param)


def test_unknown_model_is_404():
    refused(parse_completion, {"prompt": "x", "model": "gpt-4"}, "model", 404)


def test_not_json():
    for raw in (b"", b"nope", b"[1, 2]", b"\xff"):
        with pytest.raises(ApiError) as info:
            parse_json_body(raw)
        assert info.value.status == 400


def test_chat_and_its_errors():
    p = parse_chat({"messages": [{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
                   TOK, NAMES, 1024)
    text = TOK.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert p.request.input_token_ids == TOK.encode(text) and p.kind == "chat"
    assert parse_chat({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3},
                      TOK, NAMES).request.max_tokens == 3
    refused(parse_chat, {}, "messages")
    refused(parse_chat, {"messages": []}, "messages")
    refused(parse_chat, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role")
    refused(parse_chat, {"messages": [{"role": "user", "content": 3}]}, "messages[0].content")
    refused(parse_chat, {"messages": [{"role": "user", "content": "x"}], "prompt": "y"}, "prompt")


def test_disaggregated_params_in_and_out():
    p = comp(prompt="x", disaggregated_params={"request_type": "context_only"})
    assert p.mode == CONTEXT_ONLY
    opaque = b"\x00state\xff"
    g = comp(prompt="x", disaggregated_params={"request_type": "generation_only", "first_gen_tokens": [9],
                                                "ctx_request_id": 4,
                                                "opaque_state": base64.b64encode(opaque).decode()})
    assert g.mode == GENERATION_ONLY
    cpp = g.request.context_phase_params
    assert (cpp.req_id, cpp.first_gen_tokens, cpp.opaque_state) == (4, [9], opaque)
    from disagg_mpi.api import ContextPhaseParams

    resp = Response(1, Result([9], True, None, ContextPhaseParams(4, [9], opaque)))
    body = full_body(p, [(resp, "t")])
    dp = body["choices"][0]["disaggregated_params"]
    assert dp == body["disaggregated_params"]
    assert dp["request_type"] == "context_only" and dp["ctx_request_id"] == 4 and dp["first_gen_tokens"] == [9]
    assert base64.b64decode(dp["opaque_state"]) == opaque
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def test_bodies_and_chunks():
    p = comp(prompt="ab", stream=True, stream_options={"include_usage": True})
    assert p.stream and p.include_usage
    c = chunk(p, "x", [5], None)
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "x"
    q = parse_chat({"messages": [{"role": "user", "content": "x"}], "stream": True}, TOK, NAMES)
    c = chunk(q, "y", [5], None, first=True)
    assert c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"] == {"role": "assistant",
                                                                                     "content": "y"}
    body = full_body(q, [(Response(1, Result([5, 6], True, "stop")), "hi")])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert body["choices"][0]["finish_reason"] == "stop"


def test_incremental_decoder_holds_partial_characters():
    ids = TOK.encode("héllo ✓")
    dec = StopTracker(TOK)
    parts = [dec.add([t]) for t in ids] + [dec.finish()]
    assert "".join(parts) == "héllo ✓"
    assert all("\ufffd" not in s for s in parts)


from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_mpi.orchestrator.admission import check_logprobs

_any_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2000) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=15)
_field_names = st.sampled_from(["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed",
                                "stream", "stream_options", "n", "model", "stop_token_ids", "ignore_eos",
                                "disaggregated_params", "logprobs", "user", "bogus", "stop",
                                "include_stop_str_in_output", "presence_penalty", "frequency_penalty",
                                "repetition_penalty", "logit_bias", "min_tokens", "min_p", "top_logprobs", "echo"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_field_names, _any_json, max_size=6), st.booleans())
def test_any_body_parses_or_gets_a_4xx(body, chat):
    """Fuzz: a body is either a request or an ApiError with a 4xx status and a message, never a crash."""
    from disagg_mpi.serve.protocol import ApiError

    try:
        p = (parse_chat if chat else parse_completion)(body, TOK, NAMES, 1024)
    except ApiError as err:
        assert 400 <= err.status < 500 and str(err)
        return
    for r in p.requests:  # what the edge let through, the engine's own checks accept
        r.sampling_config.validate()
        assert r.sampling_config.min_tokens <= r.max_tokens
        check_logprobs(r)


def test_penalties_bias_stop_fields_reach_the_request():
    p = comp(prompt="hi", max_tokens=5, presence_penalty=1.5, frequency_penalty=-0.5, repetition_penalty=1.2,
             logit_bias={"7": -100, "9": 2.5}, min_tokens=3, min_p=0.05, top_k=-1, stop=["a b", "c"],
             include_stop_str_in_output=True)
    sc, r = p.request.sampling_config, p.request
    assert (sc.presence_penalty, sc.frequency_penalty, sc.repetition_penalty, sc.min_p, sc.min_tokens,
            sc.top_k) == (1.5, -0.5, 1.2, 0.05, 3, 0)
    assert sc.logit_bias == {7: -100.0, 9: 2.5}
    assert r.stop_words == ["a b", "c"] and r.include_stop_str_in_output
    assert comp(prompt="hi", stop="x").request.stop_words == ["x"]
    assert comp(prompt="hi").request.sampling_config.logit_bias is None
    from disagg_mpi.api import Request

    assert Request.from_dict(r.to_dict()) == r  # the bias's int keys survive the msgpack-ready form


@pytest.mark.parametrize("body,param", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias"),
    ({"logit_bias": {"1024": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 17}, "min_tokens"),
    ({"min_p": 1.5}, "min_p"),
])
def test_bad_penalty_values_name_their_field(body, param):
    refused(parse_completion, {"prompt": "x", **body}, param)


def test_batched_prompts_n_and_echo():
    p = comp(prompt=["ab", "c"], n=3, echo=True, temperature=1.0, seed=5)
    assert [r.input_token_ids for r in p.requests] == [TOK.encode("ab")] * 3 + [TOK.encode("c")] * 3
    assert p.echo == ["ab"] * 3 + ["c"] * 3 and p.n == 3
    assert p.prompt_tokens == len(TOK.encode("ab")) + len(TOK.encode("c"))  # each prompt once
    seeds = [r.sampling_config.seed for r in p.requests]
    assert seeds[0] == 5 and len(set(seeds[:3])) == 3 and seeds[:3] == seeds[3:]  # per choice, same per prompt
    assert comp(prompt=["ab", "c"], n=3, temperature=1.0, seed=5).requests[1].sampling_config.seed == seeds[1]
    q = comp(prompt=[[5, 6], [7]])
    assert [r.input_token_ids for r in q.requests] == [[5, 6], [7]] and q.echo == ["", ""]
    assert comp(prompt=[5, 6], echo=True).echo == [TOK.decode([5, 6])]
    body = full_body(p, [(Response(i, Result([9], True, "length")), "z") for i in range(6)])
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert body["choices"][3]["text"] == "cz" and body["usage"]["completion_tokens"] == 6


# ---- logprobs ------------------------------------------------------------------------------------


CHAT = {"messages": [{"role": "user", "content": "x"}]}


def test_echo_with_logprobs_asks_the_prompt_logprobs_and_max_tokens_0_scores_only():
    p = comp(prompt=[5, 6, 7], logprobs=2, echo=True, max_tokens=0)
    r = p.request
    assert r.num_prompt_logprobs == 2 and r.num_logprobs == 2 and r.output_config.return_log_probs
    assert p.score_only and r.max_tokens == 1  # the executors compute one token; the client sees none
    assert comp(prompt=[5], logprobs=2).request.num_prompt_logprobs is None  # without echo: not asked
    assert comp(prompt=[5], echo=True).request.num_prompt_logprobs is None  # without logprobs: not asked
    assert not comp(prompt=[5], echo=True, max_tokens=3).score_only


def test_echo_logprobs_body_puts_the_prompt_first():
    from disagg_mpi.api import TokenLogprobs
    from disagg_mpi.serve.responses import echo_logprobs, logprobs_body

    prompt, out = TOK.encode("abc"), TOK.encode("d")
    plps = [None, TokenLogprobs(-1.0, (out[0],), (-0.5,)), TokenLogprobs(-2.0, (prompt[0],), (-0.25,))]
    gen = logprobs_body("completion", TOK, out, [TokenLogprobs(-3.0, (out[0],), (-3.0,))], ["d"], 1, 3)
    body = echo_logprobs(TOK, prompt, plps, 1, gen)
    assert body["tokens"] == ["a", "b", "c", "d"] and body["text_offset"] == [0, 1, 2, 3]
    assert body["token_logprobs"] == [None, -1.0, -2.0, -3.0]
    assert body["top_logprobs"] == [None, {"d": -0.5}, {"a": -0.25}, {"d": -3.0}]
    assert echo_logprobs(TOK, prompt, plps, 0, None)["top_logprobs"] is None  # k = 0: no alternatives


def test_logprobs_fields_become_the_request_output_config():
    r = parse_completion({"prompt": "x", "logprobs": 3}, TOK, NAMES, 1024).request
    assert r.output_config.return_log_probs and r.num_logprobs == 3
    assert parse_completion({"prompt": "x", "logprobs": 0}, TOK, NAMES, 1024).request.logprobs_k == 0
    assert parse_completion({"prompt": "x"}, TOK, NAMES, 1024).request.logprobs_k is None
    assert parse_chat({**CHAT, "logprobs": True, "top_logprobs": 20}, TOK, NAMES).request.logprobs_k == 20
    assert parse_chat({**CHAT, "logprobs": True}, TOK, NAMES).request.logprobs_k == 0
    assert parse_chat({**CHAT, "logprobs": False}, TOK, NAMES).request.logprobs_k is None


@pytest.mark.parametrize("extra,param", [({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
                                         ({"top_logprobs": 2}, "top_logprobs"),
                                         ({"logprobs": 3}, "logprobs"),
                                         ({"top_logprobs": -1, "logprobs": True}, "top_logprobs")])
def test_bad_chat_logprobs(extra, param):
    refused(parse_chat, {**CHAT, **extra}, param)


def test_logprobs_bodies_in_openai_shapes():
    from disagg_mpi.api import TokenLogprobs
    from disagg_mpi.serve.responses import logprobs_body

    lps = [TokenLogprobs(-0.5, (104, 105), (-0.5, -1.0)), TokenLogprobs(-2.0, (104, 105), (-0.1, -0.2))]
    c = logprobs_body("completion", TOK, [104, 105], lps, ["h", "ij"], 2, offset=3)
    assert c == {"tokens": ["h", "ij"], "token_logprobs": [-0.5, -2.0], "text_offset": [3, 4],
                 "top_logprobs": [{"h": -0.5, TOK.decode([105]): -1.0}, {TOK.decode([104]): -0.1, "ij": -0.2}]}
    assert logprobs_body("completion", TOK, [104], lps[:1], ["h"], 0)["top_logprobs"] is None
    ch = logprobs_body("chat", TOK, [104, 105], lps, ["h", "é"], 1)
    assert ch["content"][1] == {"token": "é", "logprob": -2.0, "bytes": [0xC3, 0xA9],
                                "top_logprobs": [{"token": TOK.decode([104]), "logprob": -0.1,
                                                  "bytes": list(TOK.decode([104]).encode())}]}

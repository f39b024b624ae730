"""Bad requests get a clear error Response and do not disturb good ones; bad JSONL lines a LineError."""
import json
import math

import pytest

from disagg_mpi.api import (
    DISAGG_NOT_ENABLED,
    ContextPhaseParams,
    ExecutorConfig,
    KvCacheConfig,
    Request,
    RequestType,
    SamplingConfig,
)
from disagg_mpi.engine.executor import Executor
from disagg_mpi.jobs import LineError, parse_line
from disagg_mpi.model import load_model, load_tokenizer
from disagg_mpi.orchestrator.admission import check_logprobs

GOOD = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 12, 13], list(range(20, 60))]
VOCAB = 1024  # random:tiny
CONTEXT = 2048  # random:tiny's max_position_embeddings


@pytest.fixture(scope="module")
def model():
    m = load_model("random:tiny", seed=11)
    assert (m.config.vocab_size, m.config.max_position_embeddings) == (VOCAB, CONTEXT)
    return m


def make_executor(model, num_blocks=1024):
    return Executor(model, ExecutorConfig(max_batch_size=4, max_num_tokens=32,
                                          kv_cache_config=KvCacheConfig(block_size=4, num_blocks=num_blocks)))


def good(i):
    return Request(list(GOOD[i]), max_tokens=10, ignore_eos=True)


def sc(**kw):
    return SamplingConfig(**kw)


# (name, request, substring the error message must contain)
BAD = [
    ("empty prompt", Request([], max_tokens=4), "prompt is empty"),
    ("id == vocab", Request([5, VOCAB, 6], max_tokens=4), f"outside the vocabulary [0, {VOCAB})"),
    ("negative id", Request([-1], max_tokens=4), "outside the vocabulary"),
    ("float id", Request([5, 2.5], max_tokens=4), "outside the vocabulary"),
    ("string id", Request(["7"], max_tokens=4), "outside the vocabulary"),
    ("over context", Request([5] * 2000, max_tokens=49), f"exceeds the model's context of {CONTEXT} tokens"),
    ("max_tokens over context", Request([5], max_tokens=CONTEXT), "exceeds the model's context"),
    ("max_tokens 0", Request([5], max_tokens=0), "max_tokens=0 must be an integer >= 1"),
    ("max_tokens negative", Request([5], max_tokens=-3), "max_tokens=-3"),
    ("max_tokens float", Request([5], max_tokens=2.5), "max_tokens=2.5"),
    ("beam width 2", Request([5], sampling_config=sc(beam_width=2)), "beam_width=2 is not supported"),
    ("beam width 0", Request([5], sampling_config=sc(beam_width=0)), "beam_width=0 is not supported"),
    ("temperature < 0", Request([5], sampling_config=sc(temperature=-0.5)), "temperature=-0.5 must be >= 0"),
    ("temperature nan", Request([5], sampling_config=sc(temperature=math.nan)), "temperature=nan"),
    ("top_p 0", Request([5], sampling_config=sc(temperature=1.0, top_p=0.0, seed=1)), "top_p=0.0 must be in (0, 1]"),
    ("top_p > 1", Request([5], sampling_config=sc(temperature=1.0, top_p=1.5, seed=1)), "top_p=1.5"),
    ("top_p nan", Request([5], sampling_config=sc(temperature=1.0, top_p=math.nan, seed=1)), "top_p=nan"),
    ("top_k < 0", Request([5], sampling_config=sc(temperature=1.0, top_k=-1, seed=1)), "top_k=-1 must be"),
    ("top_k float", Request([5], sampling_config=sc(temperature=1.0, top_k=2.5, seed=1)), "top_k=2.5"),
    ("seed < 0", Request([5], sampling_config=sc(temperature=1.0, seed=-1)), "seed=-1"),
    ("temperature inf", Request([5], sampling_config=sc(temperature=math.inf, seed=1)),
     "temperature=inf must be a finite number"),
    ("temperature str", Request([5], sampling_config=sc(temperature="0.5")), "temperature='0.5' must be a finite"),
    ("temperature None", Request([5], sampling_config=sc(temperature=None)), "temperature=None must be a finite"),
    ("top_p str", Request([5], sampling_config=sc(top_p="1")), "top_p='1' must be a finite number"),
    ("no sampling_config", Request([5], sampling_config=None), "sampling_config must be a SamplingConfig"),
    ("bool id", Request([True, 5], max_tokens=4), "outside the vocabulary"),
    ("ids not a list", Request(5, max_tokens=4), "input_token_ids must be a list of token ids"),
    ("stop ids str", Request([5], stop_token_ids="ab"), "stop_token_ids='ab' must be a list"),
    ("stop ids floats", Request([5], stop_token_ids=[1.5]), "stop_token_ids=[1.5] must be a list"),
    ("context only", Request([5, 6], request_type=RequestType.REQUEST_TYPE_CONTEXT_ONLY), DISAGG_NOT_ENABLED),
    ("generation only", Request([5, 6], request_type=RequestType.REQUEST_TYPE_GENERATION_ONLY,
                                context_phase_params=ContextPhaseParams(1, [7], b"x")), DISAGG_NOT_ENABLED),
]


def test_disagg_message_is_exact():
    assert DISAGG_NOT_ENABLED == "Disaggregated serving is not enabled, please check the configuration"


@pytest.mark.parametrize("name,req,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_request_alone(model, name, req, msg):
    ex = make_executor(model)
    req.client_id = f"client-{name}"
    rid = ex.enqueue_request(req)
    [r] = ex.await_responses(rid)
    assert r.has_error() and r.is_final and r.result is None
    assert msg in r.error_msg, r.error_msg
    if msg == DISAGG_NOT_ENABLED:
        assert r.error_msg == DISAGG_NOT_ENABLED
    assert r.client_id == f"client-{name}"
    ex.check_blocks_free()
    assert ex.get_latest_iteration_stats()["iterations"] == 0  # no step was run for it


def test_numpy_and_torch_integers_are_accepted(model):
    np = pytest.importorskip("numpy")
    import torch
    ref = make_executor(model).generate([good(0)])[0].result.output_token_ids
    ex = make_executor(model)
    a, b = ex.generate([Request(list(np.array(GOOD[0])), max_tokens=np.int64(10), ignore_eos=True,
                                stop_token_ids=[np.int32(VOCAB + 1)]),
                        Request(list(torch.tensor(GOOD[0])), max_tokens=10, ignore_eos=True)])
    assert a.result.output_token_ids == ref and b.result.output_token_ids == ref
    assert all(type(t) is int for t in a.result.output_token_ids)
    ex.check_blocks_free()


def test_request_too_large_for_the_pool(model):
    ex = make_executor(model, num_blocks=8)  # 32 tokens of KV
    [r] = ex.generate([Request([5] * 30, max_tokens=10)])
    assert r.has_error() and "KV blocks" in r.error_msg and "pool has 8" in r.error_msg
    ex.check_blocks_free()


def test_bad_and_good_in_one_batch(model):
    ref = [r.result.output_token_ids for r in make_executor(model).generate([good(i) for i in range(3)])]
    ex = make_executor(model)
    reqs, kinds = [], []
    for k, (_, req, msg) in enumerate(BAD):
        reqs.append(req)
        kinds.append(msg)
        if k % 7 == 0:  # good requests interleaved with the bad ones
            reqs.append(good(k // 7 % 3))
            kinds.append(k // 7 % 3)
    resps = ex.generate(reqs)
    for resp, kind in zip(resps, kinds):
        if isinstance(kind, int):
            assert not resp.has_error(), resp.error_msg
            assert resp.result.output_token_ids == ref[kind]
            assert resp.result.finish_reason == "length"
        else:
            assert resp.has_error() and kind in resp.error_msg
    ex.check_blocks_free()


def test_bad_request_while_others_run(model):
    ref = make_executor(model).generate([good(2)])[0].result.output_token_ids
    ex = make_executor(model)
    rid = ex.enqueue_request(good(2))
    ex._engine.step()
    bad = ex.enqueue_request(Request([VOCAB + 5]))
    [r] = ex.await_responses(bad)
    assert r.has_error()
    rest = []
    while True:
        out = ex.await_responses(rid)
        rest += out
        if any(x.is_final for x in out):
            break
    assert rest[-1].result.output_token_ids == ref
    ex.check_blocks_free()


# ---- JSONL lines -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("random:tiny")


@pytest.mark.parametrize("raw,needle", [
    ("not json", "is not valid JSON"),
    ("", "is not valid JSON"),
    ('{"id": "a", "prompt": "x"', "is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('"just a string"', "must be a JSON object"),
    ('{"id": "a", "prompt": "x", "colour": "red"}', "colour: unknown field"),
    ('{"id": "a", "prompt": "x", "input_ids": [1, 2]}', "exactly one of prompt, messages, input_ids"),
    ('{"id": "a"}', "exactly one of prompt, messages, input_ids"),
    ('{"id": "a", "prompt": 5}', "prompt:"),
    ('{"id": "a", "input_ids": "1 2 3"}', "input_ids:"),
    ('{"id": "a", "input_ids": [1, "x"]}', "input_ids.1:"),
    ('{"id": "a", "prompt": "x", "max_tokens": "many"}', "max_tokens:"),
    ('{"id": "a", "prompt": "x", "max_tokens": 0}', "max_tokens:"),
    ('{"id": "a", "prompt": "x", "temperature": -1}', "temperature:"),
    ('{"id": "a", "prompt": "x", "top_p": 0}', "top_p:"),
    ('{"id": "a", "prompt": "x", "top_k": 1.5}', "top_k:"),
    ('{"id": "a", "prompt": "x", "seed": -2}', "seed:"),
    ('{"id": "a", "prompt": "x", "stream": "yes please"}', "stream:"),
    ('{"id": "a", "messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role:"),
    ('{"id": "a", "messages": [{"role": "user"}]}', "messages.0.content:"),
    ('{"id": "a", "messages": "hi"}', "messages:"),
    ('{"id": "a", "prompt": ""}', "the prompt is empty"),
    ('{"id": "a", "input_ids": []}', "the prompt is empty"),
    ('{"id": "a", "prompt": "x", "response_format": {"type": "yaml"}}', "response_format: response_format type"),
    (('{"id": "a", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": '
      '{"type": "object", "properties": {"n": {"type": "nonsense"}}}}}}'), "response_format:"),
])
def test_parse_line_errors(tok, raw, needle):
    with pytest.raises(LineError) as ei:
        parse_line(raw, 7, tok)
    assert needle in str(ei.value), str(ei.value)
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    expected_id = data["id"] if isinstance(data, dict) and isinstance(data.get("id"), str) else "line 7"
    assert ei.value.line_id == expected_id


def test_parse_line_id_fallback(tok):
    with pytest.raises(LineError) as ei:
        parse_line('{"id": 5, "prompt": "x"}', 3, tok)
    assert "id:" in str(ei.value) and ei.value.line_id == "5"


def test_parse_line_good(tok):
    line_id, req = parse_line(json.dumps({"id": "q1", "prompt": "hello", "max_tokens": 3, "temperature": 0.5,
                                          "top_k": 4, "top_p": 0.9, "seed": 2, "stop_token_ids": [9],
                                          "ignore_eos": True, "stream": True}), 1, tok)
    assert line_id == "q1" and req.client_id == "q1" and req.input_token_ids == tok.encode("hello")
    assert req.max_tokens == 3 and req.ignore_eos and req.streaming and req.stop_token_ids == [9]
    assert req.sampling_config == SamplingConfig(1, 0.5, 4, 0.9, 2)
    _, req = parse_line('{"id": "m", "messages": [{"role": "user", "content": "hi"}]}', 2, tok)
    assert req.input_token_ids == tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))


def test_parse_line_sampling_extras_and_stop(tok):
    _, req = parse_line(json.dumps({"id": "p", "input_ids": [5], "presence_penalty": 1.0, "frequency_penalty": -0.5,
                                    "repetition_penalty": 1.2, "logit_bias": {"7": -100, "9": 3}, "min_tokens": 2,
                                    "min_p": 0.1, "stop": "ab", "include_stop_str_in_output": True}), 1, tok)
    assert req.sampling_config == SamplingConfig(1, 0.0, 0, 1.0, None, 0.1, 1.0, -0.5, 1.2, {7: -100.0, 9: 3.0}, 2)
    assert req.stop_words == ["ab"] and req.include_stop_str_in_output
    _, req = parse_line(json.dumps({"id": "p", "input_ids": [5], "logprobs": 20}), 1, tok)
    assert req.logprobs_k == 20
    assert parse_line(json.dumps({"id": "p", "input_ids": [5]}), 1, tok)[1].logprobs_k is None
    for bad in ({"presence_penalty": 3}, {"repetition_penalty": 0}, {"logit_bias": {"7": 200}},
                {"min_tokens": -1}, {"stop": ["a"] * 5}, {"logprobs": 21}, {"logprobs": True}):
        with pytest.raises(LineError, match=next(iter(bad))):
            parse_line(json.dumps({"id": "p", "input_ids": [5], **bad}), 1, tok)


def test_parse_line_deeply_nested(tok):
    with pytest.raises(LineError):
        parse_line("[" * 100_000, 1, tok)


def test_parse_line_lone_surrogate(tok):
    with pytest.raises(LineError):
        parse_line('{"id": "a", "prompt": "x\\ud800"}', 1, tok)


# ---- property: parse_line returns a Request or raises LineError, nothing else --------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_FIELDS = ["id", "prompt", "messages", "input_ids", "max_tokens", "temperature", "top_k", "top_p", "seed",
           "stop_token_ids", "ignore_eos", "stream", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "logit_bias", "min_tokens", "stop", "include_stop_str_in_output", "logprobs"]
_field_values = {
    "id": st.text(max_size=10) | _json,
    "prompt": st.text(max_size=30) | _json,
    "messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "robot"]),
         "content": st.text(max_size=20) | _json}), max_size=3) | _json,
    "input_ids": st.lists(st.integers(-5, 2000), max_size=6) | _json,
    "max_tokens": st.integers(-2, 100) | _json,
    "temperature": st.floats() | _json,
    "top_k": st.integers(-2, 50) | _json,
    "top_p": st.floats() | _json,
    "seed": st.integers(-2, 2**64) | _json,
    "stop_token_ids": st.lists(st.integers(-1, 2000), max_size=3) | _json,
    "ignore_eos": st.booleans() | _json,
    "stream": st.booleans() | _json,
    "min_p": st.floats() | _json,
    "presence_penalty": st.floats(-3, 3) | _json,
    "frequency_penalty": st.floats() | _json,
    "repetition_penalty": st.floats(-1, 3) | _json,
    "logit_bias": st.dictionaries(st.integers(-5, 2000).map(str) | st.text(max_size=3),
                                  st.floats(-150, 150) | _json, max_size=3) | _json,
    "min_tokens": st.integers(-2, 100) | _json,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=3), max_size=6) | _json,
    "include_stop_str_in_output": st.booleans() | _json,
    "logprobs": st.integers(-2, 25) | _json,
}
# Mostly objects with the known fields (well-typed or not), some with arbitrary keys.
_objects = (st.fixed_dictionaries({}, optional=_field_values)
            | st.dictionaries(st.sampled_from(_FIELDS) | st.text(max_size=8), _json, max_size=5))


@hypothesis.settings(max_examples=300, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(obj=_objects | _json)
def test_parse_line_property(tok, obj):
    raw = json.dumps(obj)  # NaN / Infinity included, as Python's json writes and reads them
    try:
        line_id, req = parse_line(raw, 1, tok)
    except LineError as err:
        assert isinstance(err.line_id, str) and str(err)
        return
    assert isinstance(req, Request) and req.input_token_ids
    assert isinstance(obj, dict) and line_id == obj["id"] == req.client_id
    assert isinstance(req.max_tokens, int) and req.max_tokens >= 1
    req.sampling_config.validate()  # what the line let through, the engine's own checks accept
    check_logprobs(req)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(raw=st.text(max_size=60))
def test_parse_line_property_raw_text(tok, raw):
    try:
        parse_line(raw, 1, tok)
    except LineError:
        pass


@pytest.mark.parametrize("raw,needle", [
    ('{"id": "a", "prompt": "x", "temperature": Infinity}', "temperature"),
    ('{"id": "a", "input_ids": [true, 2]}', "input_ids"),
    ('{"id": "a", "prompt": "x", "seed": 18446744073709551616}', "seed"),
])
def test_parse_line_refuses_lenient_values(tok, raw, needle):
    with pytest.raises(LineError, match=needle):
        parse_line(raw, 1, tok)


def test_parse_line_response_format(tok):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    _, req = parse_line(json.dumps({"id": "j", "prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}), 1, tok)
    assert req.guided_decoding is not None and json.loads(req.guided_decoding.guide) == schema
    _, plain = parse_line(json.dumps({"id": "t", "prompt": "x", "response_format": {"type": "text"}}), 2, tok)
    assert plain.guided_decoding is None


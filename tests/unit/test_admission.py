"""The pure edge checks: rank 0's request check (orchestrator/admission.py), the hand-off binding
(engine/handoff_check.py), their HTTP names (serve/protocol.py) and step isolation's bookkeeping."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_mpi.api import ContextPhaseParams, Request, RequestError, RequestType, SamplingConfig
from disagg_mpi.engine.handoff_check import check_handoff
from disagg_mpi.engine.scheduler import ScheduledStep
from disagg_mpi.engine.step_isolation import retry_alone
from disagg_mpi.orchestrator.admission import ModelLimits, admitted, check_request
from disagg_mpi.serve.protocol import ApiError, http_param, parse_json_body
from disagg_mpi.serve.responses import finish_reason
from disagg_mpi.transfer.cache_state import CacheState
from disagg_mpi.transfer.opaque import OpaqueState, prompt_digest

LIMITS = ModelLimits(vocab_size=100, max_context=64)
GEN = RequestType.REQUEST_TYPE_GENERATION_ONLY


def gen(first=(7,), req_id=3, opaque=b"x", **kw):
    return Request([1, 2, 3], 4, request_type=GEN, context_phase_params=ContextPhaseParams(req_id, list(first), opaque),
                   **kw)


def refused(r, param, needle="", generation_only=None):
    with pytest.raises(RequestError) as err:
        check_request(r, LIMITS, generation_only)
    assert err.value.param == param, (err.value.param, str(err.value))
    assert needle in str(err.value)


# (request, the field it names, a piece of the message)
BAD = [
    (Request([]), "input_token_ids", "empty"),
    (Request([1, 100]), "input_token_ids", "[100]"),
    (Request([-1]), "input_token_ids", "outside the vocabulary [0, 100)"),
    (Request([2**64]), "input_token_ids", "outside"),
    (Request([True]), "input_token_ids", "outside"),
    (Request([1.0]), "input_token_ids", "outside"),
    (Request("abc"), "input_token_ids", "must be a list"),
    (Request([1], max_tokens=0), "max_tokens", "max_tokens=0 must be an integer >= 1"),
    (Request([1], max_tokens=2**64), "max_tokens", "max_tokens=18446744073709551616"),
    (Request([1], max_tokens=2.0), "max_tokens", ">= 1"),
    (Request([1] * 60, max_tokens=5), "max_tokens", "prompt (60 tokens) + max_tokens (5) exceeds the model's"),
    (Request([1], sampling_config=None), "sampling_config", "SamplingConfig"),
    (Request([1], sampling_config=SamplingConfig(beam_width=2)), "sampling_config.beam_width", "only 1"),
    (Request([1], sampling_config=SamplingConfig(temperature=math.nan)), "sampling_config.temperature", "finite"),
    (Request([1], sampling_config=SamplingConfig(temperature=-1.0)), "sampling_config.temperature", ">= 0"),
    (Request([1], sampling_config=SamplingConfig(temperature="1")), "sampling_config.temperature", "'1'"),
    (Request([1], sampling_config=SamplingConfig(top_p=0.0)), "sampling_config.top_p", "(0, 1]"),
    (Request([1], sampling_config=SamplingConfig(top_p=1.5)), "sampling_config.top_p", "(0, 1]"),
    (Request([1], sampling_config=SamplingConfig(top_k=2**63)), "sampling_config.top_k", "[0, 2**63)"),
    (Request([1], sampling_config=SamplingConfig(top_k=-1)), "sampling_config.top_k", "[0, 2**63)"),
    (Request([1], sampling_config=SamplingConfig(seed=2**64)), "sampling_config.seed", "[0, 2**63)"),
    (Request([1], sampling_config=SamplingConfig(seed=-1)), "sampling_config.seed", "[0, 2**63)"),
    (Request([1], stop_token_ids=[2**64]), "stop_token_ids", "[0, 2**63)"),
    (Request([1], stop_token_ids=[-3]), "stop_token_ids", "[0, 2**63)"),
    (Request([1], stop_token_ids=["a"]), "stop_token_ids", "integer"),
    (Request([1], stop_token_ids=5), "stop_token_ids", "must be a list"),
    (Request([1], ignore_eos=1), "ignore_eos", "true or false"),
    (Request([1], streaming="yes"), "streaming", "true or false"),
    (Request([1], client_id="a\ud800"), "client_id", "UTF-8"),
    (Request([1], client_id=5), "client_id", "string"),
    (gen(first=()), "context_phase_params.first_gen_tokens", "empty"),
    (gen(first=(100,)), "context_phase_params.first_gen_tokens", "outside the vocabulary"),
    (gen(first=(2**64,)), "context_phase_params.first_gen_tokens", "outside the vocabulary"),
    (gen(req_id=2**64), "context_phase_params.req_id", "must be"),
    (gen(req_id=-1), "context_phase_params.req_id", "must be"),
    (gen(opaque=b""), "context_phase_params.opaque_state", "bytes"),
    (gen(opaque="AAAA"), "context_phase_params.opaque_state", "bytes"),
    (Request([1], request_type=GEN), "context_phase_params", "needs context_phase_params"),
    ("not a request", "request", "Request"),
]


@pytest.mark.parametrize("req,param,needle", BAD, ids=[f"{i}:{b[1]}" for i, b in enumerate(BAD)])
def test_a_bad_value_is_refused_by_name(req, param, needle):
    refused(req, param, needle)


def test_good_requests_pass():
    check_request(Request([0, 99], max_tokens=62), LIMITS)  # exactly the context
    check_request(Request([np.int64(5)], max_tokens=np.int32(3), stop_token_ids=[2**63 - 1, 200]), LIMITS)
    check_request(Request([1], sampling_config=SamplingConfig(temperature=0.7, top_k=2**63 - 1, top_p=1.0,
                                                              seed=2**63 - 1)), LIMITS)
    check_request(gen(), LIMITS)


def test_admitted_is_a_copy_with_plain_ints():
    r = gen(first=(np.int64(7),), req_id=np.int32(3), stop_token_ids=[np.int64(4)],
            sampling_config=SamplingConfig(temperature=np.float32(0.5), top_k=np.int16(2), seed=np.uint8(1)))
    r.input_token_ids = [np.int64(1), np.int32(2)]
    a = admitted(r, LIMITS)
    assert a is not r and type(r.input_token_ids[0]) is np.int64  # the caller's request is left alone
    msgpack.packb(a.to_dict())
    assert a.input_token_ids == [1, 2] and a.context_phase_params.first_gen_tokens == [7]
    assert (a.sampling_config.top_k, a.sampling_config.seed, a.stop_token_ids) == (2, 1, [4])
    with pytest.raises(RequestError):
        admitted(Request([LIMITS.vocab_size]), LIMITS)


def test_generation_only_is_checked_as_the_caller_says():
    r = Request([1], context_phase_params=None)
    check_request(r, LIMITS, generation_only=False)
    refused(r, "context_phase_params", generation_only=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-2**65, 2**65), min_size=1, max_size=4), st.integers(-2**65, 2**65),
       st.one_of(st.none(), st.integers(-2**65, 2**65)))
def test_whatever_passes_fits_msgpack_and_the_model(ids, max_tokens, seed):
    r = Request(ids, max_tokens, SamplingConfig(temperature=1.0, seed=seed))
    try:
        check_request(r, LIMITS)
    except RequestError as err:
        assert err.param in ("input_token_ids", "max_tokens", "sampling_config.seed")
        return
    msgpack.packb(r.to_dict())  # crosses the control plane
    assert all(0 <= t < LIMITS.vocab_size for t in ids) and len(ids) + max_tokens <= LIMITS.max_context


# ---- the hand-off binding ------------------------------------------------------------------------------


def _signed(prompt=(1, 2, 3), first=(7,), ctx_req_id=3):
    cs = CacheState.create(2, 1, 8, 4, "float32")
    return OpaqueState(0, (1,), ctx_req_id, (0,), len(prompt), cs, 0.0, prompt_digest(list(prompt)), tuple(first))


def test_handoff_accepts_exactly_what_was_signed():
    check_handoff(ContextPhaseParams(3, [7], b""), _signed(), [1, 2, 3])


@pytest.mark.parametrize("cpp,prompt,param,needle", [
    (ContextPhaseParams(3, [8], b""), [1, 2, 3], "context_phase_params.first_gen_tokens", "differ"),
    (ContextPhaseParams(3, [7, 5], b""), [1, 2, 3], "context_phase_params.first_gen_tokens", "differ"),
    (ContextPhaseParams(4, [7], b""), [1, 2, 3], "context_phase_params.req_id", "does not match"),
    (ContextPhaseParams(3, [7], b""), [1, 2], "input_token_ids", "2 tokens but the context phase computed 3"),
    (ContextPhaseParams(3, [7], b""), [1, 2, 4], "input_token_ids", "prompt differs"),
])
def test_handoff_refuses_anything_else(cpp, prompt, param, needle):
    with pytest.raises(RequestError) as err:
        check_handoff(cpp, _signed(), prompt)
    assert err.value.param == param and needle in str(err.value)


def test_signed_first_tokens_survive_the_round_trip_and_are_signed():
    key = b"k" * 32
    blob = _signed(first=(7, 9)).encode(key)
    assert OpaqueState.decode(blob, key).first_tokens == (7, 9)
    outer = msgpack.unpackb(blob)
    payload = msgpack.unpackb(outer["p"])
    payload[-1] = [8, 9]  # the first tokens, altered
    outer["p"] = msgpack.packb(payload)
    with pytest.raises(ValueError, match="bad signature"):
        OpaqueState.decode(msgpack.packb(outer), key)


# ---- HTTP names, bodies and finish reasons ------------------------------------------------------------------


@pytest.mark.parametrize("param,kind,want", [
    ("input_token_ids", "completion", "prompt"), ("input_token_ids", "chat", "messages"),
    ("sampling_config.seed", "chat", "seed"), ("max_tokens", "completion", "max_tokens"),
    ("context_phase_params.req_id", "completion", "disaggregated_params.ctx_request_id"),
    ("context_phase_params.first_gen_tokens", "chat", "disaggregated_params.first_gen_tokens"),
    ("context_phase_params", "completion", "disaggregated_params"), (None, "completion", None),
])
def test_http_param_names(param, kind, want):
    assert http_param(param, kind) == want


def test_json_nested_100000_deep_is_a_400():
    with pytest.raises(ApiError) as err:
        parse_json_body(b"[" * 100_000 + b"]" * 100_000)
    assert err.value.status == 400 and "nested too deeply" in err.value.message


def test_finish_reasons_are_openai_values_plus_cancelled():
    assert [finish_reason(r) for r in ("stop", "length", "cancelled", None)] == ["stop", "length", "cancelled",
                                                                                  "length"]


# ---- step isolation's bookkeeping (the engine test with a real model is test_step_isolation.py) ---------------


def test_retry_alone_keeps_the_good_and_names_the_bad():
    items = [(type("S", (), {"req_id": i})(), 1) for i in range(4)]

    def run(step):
        [(seq, _)] = step.items
        if seq.req_id == 2:
            raise IndexError("index out of range in self")
        return {seq.req_id: 10 + seq.req_id}
    survivors, sampled, failed = retry_alone(ScheduledStep(items), run)
    assert [s.req_id for s, _ in survivors.items] == [0, 1, 3]
    assert sampled == {0: 10, 1: 11, 3: 13}
    assert list(failed) == [2] and isinstance(failed[2], IndexError)

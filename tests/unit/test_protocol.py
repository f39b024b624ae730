"""protocol.py: every record survives the wire, and anything else is refused by name."""

from __future__ import annotations

import re

import msgpack
import pytest

from disagg_mpi import protocol as P
from disagg_mpi.api import (
    ContextPhaseParams,
    OutputConfig,
    Request,
    RequestMetrics,
    RequestType,
    Response,
    Result,
    SamplingConfig,
    TokenLogprobs,
)
from disagg_mpi.engine.model_runner import StepPlan


def _examples() -> list[P.Message]:
    req = Request([5, 6, 7], max_tokens=4, sampling_config=SamplingConfig(temperature=0.7, top_k=3, seed=9),
                  streaming=True, request_type=RequestType.REQUEST_TYPE_GENERATION_ONLY,
                  context_phase_params=ContextPhaseParams(3, [11], b"\x00sig"), stop_token_ids=[2],
                  client_id="c", output_config=OutputConfig(return_log_probs=True), num_logprobs=2)
    with_lps = Response(6, Result([3], False, log_probs=[TokenLogprobs(-0.5, (3, 8), (-0.5, -1.25))]))
    resp = Response(4, Result([1, 2], True, "length", ContextPhaseParams(1, [2], b"o"),
                                   RequestMetrics(ttft_ms=1.5, kv_transfer_bytes=64)))
    plan = StepPlan.from_dict(_plan_dict())
    return [
        P.Enqueue([(7, req)]), P.Enqueue([(8, req)], True), P.Cancel(7), P.StatsRequest(), P.Shutdown(),
        P.Ready(1, None, "cpu"), P.Ready(2, "rank 3: boom"),
        P.Responses(1, [resp, Response(5, None, "bad"), with_lps, Response(6, None, "full", retry_after=7.0)], 12,
                    30), P.ExecutorStats(0, {"free_blocks": 3}),
        P.Enqueue([(9, req)], notify=[2, 10]), P.Enqueue([(10, req)], await_context=True),
        P.Claim(4, 9, [1, 2, 3], 1), P.ClaimReply(9, None, 12.5, "node-a"), P.Release(4, None),
        P.ContextReady(10, 4, [11], b"\x00signed"),
        P.Step(plan), P.Pull(9, b"opaque", [4, 5]), P.StopMember(), P.Pulled(9, 4096),
        P.PullAsk(101, [1, 2], [0, 6], [0, 2], True, 4, {"num_layers": 6}, None, "node-a", None),
        P.PullAnswer(P.PullPath.COPY, "different nodes"), P.PullAnswer(P.PullPath.IPC, ipc={"handle": b"h"}),
        P.PullDone(),
    ]


def _plan_dict() -> dict:
    inputs = {"input_ids": [5, 6], "positions": [0, 1], "slot_mapping": [8, 9], "query_start_loc": [0, 2],
              "context_lens": [2], "block_tables": [[2, -1]], "sample_indices": [1], "sample_req_ids": [7]}
    from disagg_mpi.engine.sequence import SamplingParams

    wire = SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=11, presence_penalty=0.5).to_wire()
    return {"inputs": inputs, "sampling": [list(wire)], "keys": [[11, 0]], "histories": [[5, 6]], "logprobs": [3]}


def test_every_record_kind_has_an_example():
    assert {type(m) for m in _examples()} == set(P.message_kinds().values())


@pytest.mark.parametrize("msg", _examples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    got = P.decode(P.encode(msg), msg.TAG)
    assert type(got) is type(msg)
    if isinstance(msg, P.Enqueue):
        assert got.items == msg.items and got.client_holds is msg.client_holds
        assert got.notify == msg.notify and got.await_context is msg.await_context
    elif isinstance(msg, P.Responses):
        assert [r.to_dict() for r in got.responses] == [r.to_dict() for r in msg.responses]
        assert got.responses[2].result.log_probs == msg.responses[2].result.log_probs
        assert got.responses[0].result.log_probs is None and "log_probs" not in msg.responses[0].to_dict()["result"]
        assert got.responses[3].retry_after == 7.0
    elif isinstance(msg, P.Step):
        assert got.plan.to_dict() == msg.plan.to_dict()
    else:
        assert got == msg


def test_records_are_smaller_than_the_dicts_they_replaced():
    claim = P.Claim(123, 456, list(range(64)), 1)
    old = msgpack.packb({"op": "claim", "ctx_req_id": 123, "gen_req_id": 456, "blocks": list(range(64)),
                         "executor": 1})
    assert len(P.encode(claim)) < len(old)
    assert len(P.encode(P.Cancel(5))) < len(msgpack.packb({"op": "cancel", "req_id": 5}))


@pytest.mark.parametrize("payload, words", [
    (b"\xc1", "not msgpack"),
    (msgpack.packb({"op": "cancel", "req_id": 1}), "not a [kind, fields...] record"),
    (msgpack.packb([999, 1]), "unknown message kind 999"),
    (msgpack.packb([P.Cancel.KIND]), "Cancel has 0 fields; it takes 1"),
    (msgpack.packb([P.Cancel.KIND, 1, 2]), "Cancel has 2 fields; it takes 1"),
    (msgpack.packb([P.Cancel.KIND, "7"]), "Cancel.req_id is a str, not int"),
    (msgpack.packb([P.Enqueue.KIND, [[1, {"max_tokens": 3}]]]), "malformed Enqueue: KeyError"),
])
def test_malformed_messages_are_refused_by_name(payload, words):
    with pytest.raises(P.ProtocolError, match=re.escape(words)):
        P.decode(payload)


def test_a_record_on_the_wrong_tag_is_refused():
    with pytest.raises(P.ProtocolError, match="Claim arrived on tag 1; it belongs on tag 3"):
        P.decode(P.encode(P.Claim(1, 2, [], 0)), P.Tag.TO_EXECUTOR)


def test_optional_trailing_fields_may_be_left_out():
    assert P.decode(msgpack.packb([P.Ready.KIND, 1, None])) == P.Ready(1, None, None)


def test_an_enqueue_without_the_direct_fields_is_an_ordinary_one():
    """A sender that knows no direct hand-off (two fields) still speaks the protocol."""
    req = Request([1, 2], max_tokens=2)
    got = P.decode(msgpack.packb([P.Enqueue.KIND, [[3, req.to_dict()]], True]), P.Tag.TO_EXECUTOR)
    assert got.client_holds is True and got.notify is None and got.await_context is False


@pytest.mark.parametrize("fields, words", [
    ([False, [1], False], "Enqueue.notify=[1] is not allowed; a [rank, request id] pair of ints or None"),
    ([False, ["1", 2], False], "Enqueue.notify=['1', 2] is not allowed"),
    ([False, None, 1], "Enqueue.await_context=1 is not allowed; a bool"),
    ([0, None, False], "Enqueue.client_holds=0 is not allowed; a bool"),
])
def test_bad_direct_fields_of_an_enqueue_are_refused_by_name(fields, words):
    payload = msgpack.packb([P.Enqueue.KIND, [[3, Request([1], max_tokens=2).to_dict()]], *fields])
    with pytest.raises(P.ProtocolError, match=re.escape(words)):
        P.decode(payload, P.Tag.TO_EXECUTOR)


def test_kinds_are_unique():
    with pytest.raises(TypeError, match="taken by Cancel"):
        @P._record(P.Cancel.KIND, P.Tag.TO_EXECUTOR)
        class Again(P.Message):
            pass

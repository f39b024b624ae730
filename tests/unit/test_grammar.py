"""Guided decoding (engine/grammar.py): bitmask application, the sampler with masks, grammar checks,
matchers over a byte tokenizer, the plan's masks on the wire, the hand-off's grammar digest, and an
in-process executor whose random model can only emit JSON through the mask."""

from __future__ import annotations

import json

import pytest
import torch

from disagg_mpi.api import ContextPhaseParams, GuidedDecodingParams, Request, RequestError, SamplingConfig
from disagg_mpi.engine.grammar import Grammars, grammar_of, guide_digest, mask_width
from disagg_mpi.engine.grammar_masks import apply_masks, fill_masks, unpack
from disagg_mpi.engine.handoff_check import check_handoff
from disagg_mpi.engine.model_runner import StepPlan
from disagg_mpi.engine.sampler import sample
from disagg_mpi.engine.scheduler import StepInputs
from disagg_mpi.engine.sequence import SamplingParams
from disagg_mpi.model.tokenizer import Tokenizer
from disagg_mpi.serve.errors import ApiError
from disagg_mpi.serve.sampling_fields import response_format
from disagg_mpi.transfer.cache_state import CacheState
from disagg_mpi.transfer.opaque import OpaqueState, prompt_digest

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["ok", "n"], "additionalProperties": False}
VOCAB = 300  # bytes_only: ids 0-2 special (2 is EOS), then byte b is id 3 + b


def _bits(allowed: list[list[int]], vocab: int) -> torch.Tensor:
    masks = torch.zeros(len(allowed), mask_width(vocab), dtype=torch.int64)
    for r, toks in enumerate(allowed):
        for t in toks:
            masks[r, t // 32] |= 1 << (t % 32)
    return (masks - (masks >= 2**31).long() * 2**32).to(torch.int32)  # as int32 words (two's complement)


def test_unpack_reads_bit_t_of_word_t_div_32():
    allowed = [[0, 31, 32, 63, 69], [5]]
    got = unpack(_bits(allowed, 70), 70)
    assert got.shape == (2, 70)
    assert [torch.nonzero(row).flatten().tolist() for row in got] == allowed


def test_apply_masks_forbids_only_the_masked_rows_and_leaves_the_input():
    logits = torch.randn(3, 70)
    before = logits.clone()
    out = apply_masks(logits, [2, 0], _bits([[7, 40], [69]], 70))
    assert torch.equal(logits, before)
    assert torch.equal(out[1], logits[1])
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [7, 40]
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [69]
    assert apply_masks(logits, [], None) is logits


def test_sample_picks_only_allowed_tokens_greedy_and_random():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    allowed = [[3, 50], [99], [10, 11, 12], [0]]
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=2.0, top_p=0.9, seed=2), SamplingParams(temperature=0.0)]
    masks = _bits(allowed, 100)
    for pos in range(20):
        toks = sample(logits, params, [(p.seed or 0, pos) for p in params], mask_rows=[0, 1, 2, 3], masks=masks)
        assert all(t in a for t, a in zip(toks, allowed))
    assert toks[0] == max(allowed[0], key=lambda t: logits[0, t])
    # Without masks the greedy rows take the plain argmax (not allowed here): the mask is what constrains.
    plain = sample(logits, params, [(p.seed or 0, 0) for p in params])
    assert plain[0] == int(logits[0].argmax()) and plain[0] not in allowed[0]


def test_grammar_of_refuses_bad_specs_naming_the_field():
    assert grammar_of(GuidedDecodingParams("json"))
    assert grammar_of(GuidedDecodingParams("json_schema", json.dumps(SCHEMA)))
    for params, words in [(GuidedDecodingParams("json_schema", '{"type": "foo"}'), "foo"),
                          (GuidedDecodingParams("json_schema", "{bad"), "not valid JSON"),
                          (GuidedDecodingParams("json_schema", "[1]"), "must be an object"),
                          (GuidedDecodingParams("regex", "a+"), "guide_type"),
                          ("json", "GuidedDecodingParams")]:
        with pytest.raises(RequestError, match=words) as err:
            grammar_of(params)
        assert err.value.param == "guided_decoding"


def test_response_format_is_parsed_and_a_bad_schema_is_a_400_naming_it():
    assert response_format({}) is None
    assert response_format({"response_format": {"type": "text"}}) is None
    assert response_format({"response_format": {"type": "json_object"}}) == GuidedDecodingParams("json")
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    got = response_format({"response_format": rf})
    assert got.guide_type == "json_schema" and json.loads(got.guide) == SCHEMA
    for bad in [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
                {"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "xml"}, "json"]:
        with pytest.raises(ApiError) as err:
            response_format({"response_format": bad})
        assert err.value.status == 400 and err.value.param == "response_format"


@pytest.fixture(scope="module")
def grammars():
    return Grammars(lambda: Tokenizer.bytes_only(VOCAB), VOCAB)


def _byte_ids(text: str) -> list[int]:
    return [3 + b for b in text.encode()]


def test_matcher_masks_follow_the_output_and_refuse_a_wrong_token(grammars):
    state = grammars.state(GuidedDecodingParams("json_schema", json.dumps(SCHEMA)))
    first = unpack(fill_masks([state], [[]], VOCAB), VOCAB)[0]
    assert first.nonzero().flatten().tolist() == _byte_ids("{")  # compact JSON: no leading whitespace
    text = '{"ok": true, "n": 12}'
    ids = _byte_ids(text)
    after = unpack(fill_masks([state], [ids], VOCAB), VOCAB)[0]
    assert after.nonzero().flatten().tolist() == [2]  # complete: EOS only
    assert state.consumed == len(ids)
    fresh = grammars.state(GuidedDecodingParams("json_schema", json.dumps(SCHEMA)))
    with pytest.raises(RequestError, match="does not follow") as err:
        fresh.follow(_byte_ids('{"ok": 1'))
    assert err.value.param == "guided_decoding"


def test_step_plan_carries_masks_over_the_wire():
    inp = StepInputs([1, 2], [0, 1], [0, 1], [0, 1, 2], [1, 1], [[0], [1]], [0, 1], [7, 8])
    masks = _bits([[1, 5], [64]], 70)
    plan = StepPlan(inp, [SamplingParams(guided=True)] * 2, [(0, 0), (0, 0)], [None, None],
                    mask_rows=[1, 0], masks=masks)
    back = StepPlan.from_dict(plan.to_dict())
    assert back.mask_rows == [1, 0] and torch.equal(back.masks, masks)
    assert back.sampling[0].guided and not back.sampling[0].plain_greedy
    # a greedy guided row is still an argmax (the runner takes it on the device and runs ahead of
    # the host: overlap.py); a sampled one, or logits adjusted on the host, is not
    assert SamplingParams(guided=True, temperature=0.0).masked_greedy and SamplingParams(temperature=0.0).masked_greedy
    for other in (SamplingParams(guided=True, temperature=1.0),
                  SamplingParams(guided=True, temperature=0.0, logit_bias=((5, 1.0),)),
                  SamplingParams(guided=True, temperature=0.0, presence_penalty=0.5)):
        assert not other.masked_greedy
    assert StepPlan.from_dict(StepPlan(inp, [SamplingParams()] * 2, [(0, 0)] * 2).to_dict()).masks is None


def test_handoff_binds_the_grammar():
    schema = GuidedDecodingParams("json_schema", json.dumps(SCHEMA))
    cs = CacheState.create(2, 1, 4, 4, "float32")
    opaque = OpaqueState(0, (1,), 5, (0,), 3, cs, 0.0, prompt_digest([1, 2, 3]), (9,),
                         guide_digest=guide_digest(schema))
    opaque = OpaqueState.decode(opaque.encode(b"k"), b"k")
    cpp = ContextPhaseParams(5, [9], b"")
    check_handoff(cpp, opaque, [1, 2, 3], guide_digest(schema))
    for other in [None, GuidedDecodingParams("json")]:
        with pytest.raises(RequestError, match="guided_decoding differs") as err:
            check_handoff(cpp, opaque, [1, 2, 3], guide_digest(other))
        assert err.value.param == "guided_decoding"


def test_executor_random_model_emits_only_json_prefixes():
    """random:tiny's tokens are bytes: without a mask its output is not JSON; with one it is, byte by byte."""
    from disagg_mpi.api import ExecutorConfig
    from disagg_mpi.engine.executor import Executor

    ex = Executor("random:tiny", ExecutorConfig(dtype="float32"))
    vocab = ex.model.config.vocab_size
    params = GuidedDecodingParams("json_schema", json.dumps(SCHEMA))
    outs = {}
    for guided in (None, params):
        rid = ex.enqueue_request(Request([5, 6, 7], 24, SamplingConfig(temperature=1.0, seed=3), ignore_eos=False,
                                         guided_decoding=guided))
        out: list[int] = []
        while True:
            (r,) = ex.await_responses(rid, timeout=60)[-1:]
            assert r.error_msg is None, r.error_msg
            out += r.result.output_token_ids
            if r.result.is_final:
                break
        outs[guided is not None] = out
    check = Grammars(lambda: Tokenizer.bytes_only(vocab), vocab).state(params)
    check.follow(outs[True])  # raises if any token left the grammar
    with pytest.raises(RequestError):
        Grammars(lambda: Tokenizer.bytes_only(vocab), vocab).state(params).follow(outs[False])
    text = bytes(t - 3 for t in outs[True] if 3 <= t < 259).decode(errors="replace")
    assert text.startswith('{"ok": ')

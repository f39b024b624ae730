"""Overlapped decode (engine/overlap.py): the engine's prediction of the next decode step.

The runner only launches a predicted step on CUDA graphs (tests/gpu/test_decode_graphs.py
checks the tokens there); here the engine runs on CPU with a group that records each plan,
and every prediction is checked against the step the scheduler really builds next.
"""
from __future__ import annotations

import itertools

import pytest

from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request, SamplingConfig
from disagg_mpi.engine.executor import Executor
from disagg_mpi.engine.overlap import is_predicted, next_decode_inputs, overlap_enabled
from disagg_mpi.engine.scheduler import StepInputs
from disagg_mpi.model import load_model


def _decode(positions, tables, bs=4):
    b = len(positions)
    slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
    return StepInputs(input_ids=[7] * b, positions=list(positions), slot_mapping=slots,
                      query_start_loc=list(range(b + 1)), context_lens=[p + 1 for p in positions],
                      block_tables=tables, sample_indices=list(range(b)), sample_req_ids=list(range(10, 10 + b)))


def test_next_decode_inputs_moves_one_position_and_crosses_blocks():
    inp = _decode([2, 3], [[5, 9], [1, 4]])
    nxt = next_decode_inputs(inp, 4)
    assert nxt.positions == [3, 4]
    assert nxt.context_lens == [4, 5]
    assert nxt.slot_mapping == [5 * 4 + 3, 4 * 4 + 0]   # the second crosses into its block 4
    assert nxt.block_tables == inp.block_tables and nxt.sample_req_ids == inp.sample_req_ids
    assert nxt == _decode([3, 4], [[5, 9], [1, 4]])   # input ids kept: the device replaces them


@pytest.mark.parametrize("tables", [[[5]], [[5, -1]]], ids=["past-table", "padding"])
def test_next_decode_inputs_refuses_past_the_reserved_blocks(tables):
    assert next_decode_inputs(_decode([3], tables), 4) is None


def test_is_predicted_checks_every_field():
    inp = _decode([2, 3], [[5, 9], [1, 4]])
    pred = next_decode_inputs(inp, 4)
    actual = _decode([3, 4], [[5, 9], [1, 4]])
    actual.input_ids = [100, 200]
    assert is_predicted(pred, actual, [100, 200])
    assert not is_predicted(pred, actual, [100, 201])   # other tokens than the device fed
    for field, value in [("positions", [3, 5]), ("slot_mapping", [0, 0]), ("context_lens", [4, 6]),
                         ("sample_req_ids", [10, 12]), ("block_tables", [[5, 9], [1, 3]])]:
        other = _decode([3, 4], [[5, 9], [1, 4]])
        other.input_ids = [100, 200]
        setattr(other, field, value)
        assert not is_predicted(pred, other, [100, 200]), field
    shorter = _decode([3], [[5, 9]])   # a sequence left
    shorter.input_ids = [100]
    assert not is_predicted(pred, shorter, [100])


def test_overlap_switch(monkeypatch):
    monkeypatch.delenv("DISAGG_OVERLAP_DECODE", raising=False)
    assert overlap_enabled()
    monkeypatch.setenv("DISAGG_OVERLAP_DECODE", "0")
    assert not overlap_enabled()


# ---- the engine's predictions against the scheduler's real next step --------------------


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny", seed=7)


def _recording_executor(model, max_batch_size=4):
    cfg = ExecutorConfig(max_batch_size=max_batch_size, max_num_tokens=64,
                         kv_cache_config=KvCacheConfig(block_size=4, num_blocks=128))
    ex = Executor(model, cfg)
    ex._engine._chains = True   # as with CUDA graphs: the engine predicts, the CPU runner ignores it
    steps = []   # (plan, tokens returned)
    run = ex._engine.group.run_step

    def record(plan):
        out = run(plan)
        steps.append((plan, out.tokens))
        return out

    ex._engine.group.run_step = record
    return ex, steps


def _check_predictions(steps):
    """Every prediction followed by a step of the same sequences equals that step; returns
    (predictions, of them matched)."""
    made = matched = 0
    for (plan, tokens), (after, _) in itertools.pairwise(steps):
        if plan.next_inputs is None:
            continue
        made += 1
        if after.inputs.sample_req_ids == plan.inputs.sample_req_ids:
            assert is_predicted(plan.next_inputs, after.inputs, tokens)
            matched += 1
    return made, matched


def test_predictions_match_every_next_decode_step(model):
    ex, steps = _recording_executor(model)
    prompts = [[5, 17, 300, 42, 7], [11, 12, 13], list(range(20, 33))]
    resps = ex.generate([Request(p, max_tokens=9, ignore_eos=True) for p in prompts])
    assert all(len(r.result.output_token_ids) == 9 for r in resps)
    made, matched = _check_predictions(steps)
    # One prefill step, then 8 decode steps: all but the last (which ends by length) predict.
    assert len(steps) == 9 and made == 7 and matched == 7
    assert steps[-1][0].next_inputs is None
    ex.check_blocks_free()


def test_no_prediction_while_a_request_waits_or_samples(model):
    ex, steps = _recording_executor(model, max_batch_size=1)
    ex.generate([Request([1, 2, 3], max_tokens=5, ignore_eos=True),
                 Request([4, 5, 6], max_tokens=5, ignore_eos=True)])
    first = [p for p, _ in steps if p.inputs.sample_req_ids == [1]]
    assert first and all(p.next_inputs is None for p in first)   # request 2 waited all along
    second = [p for p, _ in steps if p.inputs.sample_req_ids == [2]]
    assert sum(p.next_inputs is not None for p in second) == 3   # alone: decodes 1-3 of 4
    ex2, steps2 = _recording_executor(model)
    ex2.generate([Request([1, 2, 3], max_tokens=6, sampling_config=SamplingConfig(temperature=0.8, seed=1)),
                  Request([4, 5, 6], max_tokens=6, ignore_eos=True)])
    assert all(p.next_inputs is None for p, _ in steps2)


def test_a_stop_token_makes_the_prediction_miss(model):
    ex, steps = _recording_executor(model)
    ref = ex.generate([Request([5, 17, 300], max_tokens=8, ignore_eos=True)])[0].result.output_token_ids
    stop = ref[3]
    first = ref.index(stop)
    ex, steps = _recording_executor(model)
    out = ex.generate([Request([5, 17, 300], max_tokens=8, ignore_eos=True, stop_token_ids=[stop]),
                       Request([9, 8, 7, 6], max_tokens=8, ignore_eos=True)])
    assert out[0].result.output_token_ids == ref[:first + 1]
    # The step that sampled the stop token predicted a step with both sequences; the next
    # real step has one: the runner would drop what it launched.
    stop_step = next(i for i, (p, t) in enumerate(steps) if p.inputs.sample_req_ids[:1] == [1]
                     and t[0] == stop)
    plan, tokens = steps[stop_step]
    assert plan.next_inputs is not None
    assert not is_predicted(plan.next_inputs, steps[stop_step + 1][0].inputs, tokens)
    ex.check_blocks_free()


def test_a_newcomer_waits_one_step_instead_of_dropping_the_launched_one(model, monkeypatch):
    # With a step launched ahead for the running sequences, a request that arrives meanwhile is
    # admitted one step later: the launched step is used as predicted, nothing is thrown away.
    from disagg_mpi.engine import executor as executor_mod

    monkeypatch.setattr(executor_mod._LocalGroup, "chain_pending", property(lambda self: True))
    ex, steps = _recording_executor(model)
    a = ex.enqueue_request(Request([5, 17, 300], max_tokens=10, ignore_eos=True))
    for _ in range(4):
        ex._engine.step()
    b = ex.enqueue_request(Request([9, 8, 7, 6], max_tokens=4, ignore_eos=True))
    while ex._engine.busy:
        ex._engine.step()
    ids = [p.inputs.sample_req_ids for p, _ in steps]
    first_b = next(i for i, r in enumerate(ids) if b in r)
    assert ids[first_b - 1] == [a]
    # The step after b arrived is the one predicted before it arrived ...
    assert is_predicted(steps[first_b - 2][0].next_inputs, steps[first_b - 1][0].inputs, steps[first_b - 2][1])
    # ... and b came one step later, into a step that made no prediction (b was waiting).
    assert first_b == 5 and steps[first_b - 1][0].next_inputs is None
    outs = {r.request_id: r for r in ex.await_responses()}
    assert len(outs[a].result.output_token_ids) == 10 and len(outs[b].result.output_token_ids) == 4
    ex.check_blocks_free()

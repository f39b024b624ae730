"""Phase-free scheduler: budgets, chunked prefill, ordering, stop rules, prefilled requests, random
workloads. (Admission order, bypass and aborts: test_scheduler_admission.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_mpi.engine.block_manager import BlockManager
from disagg_mpi.engine.scheduler import Scheduler
from disagg_mpi.engine.sequence import SamplingParams, Sequence, SequenceStatus
from tests.unit.scheduler_steps import EOS, make_sched, make_seq, run_step


def test_budget_and_batch_size_respected_every_step():
    sched = make_sched(max_batch_size=3, max_num_tokens=10)
    for r in range(8):
        sched.add(make_seq(r, prompt_len=3 + 2 * r, max_tokens=3))
    steps = 0
    while sched.has_work():
        step, _ = run_step(sched)
        assert 0 < step.num_tokens <= 10
        assert len(step) <= 3 and len(sched.running) <= 3
        steps += 1
        assert steps < 100
    sched.block_manager.check_full()


def test_chunked_prefill_positions_and_slots():
    sched = make_sched(block_size=4, max_num_tokens=8)
    seq = make_seq(0, prompt_len=19, max_tokens=2)
    sched.add(seq)
    table = None
    seen_positions: list[int] = []
    chunks = []
    while seq.output_ids == []:
        step = sched.schedule()
        inp = sched.make_step_inputs(step)
        table = sched.block_manager.block_table(0)
        chunks.append(step.items[0][1])
        assert inp.input_ids == seq.prompt_ids[inp.positions[0] : inp.positions[-1] + 1]
        assert inp.slot_mapping == [table[p // 4] * 4 + p % 4 for p in inp.positions]
        assert inp.context_lens == [inp.positions[-1] + 1]
        seen_positions += inp.positions
        # Only the chunk that ends the prompt samples, at its last token.
        assert inp.sample_indices == ([len(inp.positions) - 1] if seen_positions[-1] == 18 else [])
        sched.update(step, {0: 5} if inp.sample_req_ids else {})
    assert chunks == [8, 8, 3]
    assert seen_positions == list(range(19))
    # Decode: the last output token at position num_tokens - 1.
    inp = sched.make_step_inputs(sched.schedule())
    assert inp.input_ids == [5] and inp.positions == [19]
    assert inp.slot_mapping == [table[19 // 4] * 4 + 19 % 4]
    assert inp.sample_indices == [0] and inp.context_lens == [20]


def test_decode_first_then_prefill_chunks_then_admission():
    sched = make_sched(max_batch_size=4, max_num_tokens=6)
    a, b, c = make_seq(0, 2, max_tokens=5), make_seq(1, 10, max_tokens=5), make_seq(2, 3)
    sched.add(a)
    run_step(sched)  # a prefilled, sampled its first token
    sched.add(b)
    sched.add(c)
    step, _ = run_step(sched)
    assert [(s.req_id, n) for s, n in step.items] == [(0, 1), (1, 5)]
    step, _ = run_step(sched)
    # b's running prefill goes before c's admission and uses up the budget.
    assert [(s.req_id, n) for s, n in step.items] == [(0, 1), (1, 5)]
    step, _ = run_step(sched)
    # Two decodes first, then c admitted with what is left.
    assert [(s.req_id, n) for s, n in step.items] == [(0, 1), (1, 1), (2, 3)]


def test_staggered_arrivals_all_finish_with_block_accounting():
    sched = make_sched(num_blocks=20, block_size=4, max_batch_size=3, max_num_tokens=8)
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4, 5], 7: [6]}
    finished: list[int] = []
    for t in range(200):
        for r in arrivals.get(t, []):
            sched.add(make_seq(r, prompt_len=5 + 3 * r, max_tokens=3 + r))
        if not sched.has_work() and t > 7:
            break
        _, done = run_step(sched)
        finished += [s.req_id for s in done]
        assert sched.block_manager.num_blocks - sched.block_manager.num_free <= 20
    assert sorted(finished) == list(range(7))
    sched.block_manager.check_full()


@pytest.mark.parametrize(
    "kw, tokens, reason, n_out",
    [
        ({}, [5, EOS, 5], "stop", 2),  # eos stops
        ({"ignore_eos": True}, [5, EOS, 5, 5], "length", 4),  # ... unless ignored
        ({"stop_token_ids": {9}}, [5, 9], "stop", 2),  # stop ids stop
        ({"stop_token_ids": {9}, "ignore_eos": True}, [9], "stop", 1),  # ignore_eos spares stop ids
        ({}, [5, 5, 5, 5, 5], "length", 4),  # max_tokens
    ],
)
def test_stop_rules(kw, tokens, reason, n_out):
    sched = make_sched()
    seq = make_seq(0, 3, max_tokens=4, **kw)
    sched.add(seq)
    for t in tokens:
        _, done = run_step(sched, token=t)
        if done:
            break
    assert done == [seq] and seq.finish_reason == reason
    assert len(seq.output_ids) == n_out
    assert (
        seq.status
        is {"stop": SequenceStatus.FINISHED_STOPPED, "length": SequenceStatus.FINISHED_LENGTH}[reason]
    )
    sched.block_manager.check_full()


def test_add_prefilled_goes_straight_to_decode():
    sched = make_sched(block_size=4)
    seq = make_seq(3, prompt_len=6, max_tokens=3)
    seq.num_computed_tokens, seq.output_ids = 6, [42]
    table = sched.block_manager.allocate(3, seq.max_total_tokens)
    sched.add_prefilled(seq)
    step = sched.schedule()
    inp = sched.make_step_inputs(step)
    assert step.items == [(seq, 1)]
    assert inp.input_ids == [42] and inp.positions == [6]
    assert inp.slot_mapping == [table[1] * 4 + 2] and inp.sample_req_ids == [3]
    sched.update(step, {3: 8})
    assert seq.output_ids == [42, 8]


def test_keep_blocks_survive_finish_until_caller_frees():
    sched = make_sched()
    seq = make_seq(0, prompt_len=6, max_tokens=1, keep_blocks=True)
    sched.add(seq)
    _, done = run_step(sched)
    assert done == [seq] and not sched.has_work()
    assert len(sched.block_manager.block_table(0)) == 2  # still held for the KV hand-off
    sched.block_manager.free(0)
    sched.block_manager.check_full()


def test_add_prefilled_validates():
    sched = make_sched()
    seq = make_seq(3, prompt_len=6, max_tokens=3)
    with pytest.raises(ValueError, match="num_computed_tokens.*no blocks"):
        sched.add_prefilled(seq)
    done = make_seq(4, prompt_len=6, max_tokens=1)
    done.num_computed_tokens, done.output_ids = 6, [42]
    sched.block_manager.allocate(4, done.max_total_tokens)
    with pytest.raises(ValueError, match="already finished"):
        sched.add_prefilled(done)


def test_num_inflight_tokens_counts_prefill_and_generation():
    sched = make_sched(max_num_tokens=4)
    sched.add(make_seq(0, prompt_len=10, max_tokens=5))
    sched.add(make_seq(1, prompt_len=2, max_tokens=3))
    assert sched.num_inflight_tokens() == 15 + 5
    run_step(sched)  # 4 prompt tokens of request 0
    assert sched.num_inflight_tokens() == 11 + 5


def test_block_tables_padded_and_sample_indices_flat():
    sched = make_sched(block_size=2, max_num_tokens=16)
    sched.add(make_seq(0, prompt_len=3, max_tokens=1))
    sched.add(make_seq(1, prompt_len=7, max_tokens=1))
    inp = sched.make_step_inputs(sched.schedule())
    assert inp.query_start_loc == [0, 3, 10]
    assert inp.sample_indices == [2, 9] and inp.sample_req_ids == [0, 1]
    assert len(inp.block_tables[0]) == len(inp.block_tables[1]) == 4
    assert inp.block_tables[0][2:] == [-1, -1]


def test_prefix_reuse_skips_cached_prompt_blocks():
    sched = make_sched(block_size=4, max_num_tokens=64, reuse=True)
    shared = list(range(100, 112))
    first = Sequence(0, shared + [1, 2], 2)
    sched.add(first)
    while sched.has_work():
        run_step(sched)
    second = Sequence(1, shared + [3], 2)
    sched.add(second)
    step = sched.schedule()
    assert step.items == [(second, 1)]  # 12 tokens found in the cache
    assert sched.make_step_inputs(step).positions == [12]


def test_max_num_tokens_must_fit_a_batch_of_decodes():
    with pytest.raises(ValueError, match="max_num_tokens"):
        Scheduler(BlockManager(8, 4), max_batch_size=8, max_num_tokens=4)


def test_sampling_params_validation():
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy
    for bad, match in [
        ({"temperature": -1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(
        st.tuples(st.integers(1, 30), st.integers(1, 6), st.integers(0, 5)), min_size=1, max_size=8
    ),
    max_batch_size=st.integers(1, 4),
    extra_budget=st.integers(0, 12),
    reuse=st.booleans(),
    chunk=st.one_of(st.none(), st.integers(1, 8)),
)
def test_random_workloads_finish_and_return_every_block(prompts, max_batch_size, extra_budget, reuse, chunk):
    """Random prompts / arrivals / budgets / prefill chunks: limits hold, positions are contiguous,
    all finish."""
    sched = make_sched(
        num_blocks=16,
        block_size=4,
        max_batch_size=max_batch_size,
        max_num_tokens=max_batch_size + extra_budget,
        reuse=reuse,
        prefill_chunk_tokens=chunk,
    )
    arrivals: dict[int, list[Sequence]] = {}
    for r, (plen, max_tokens, at) in enumerate(prompts):
        # Two prompt families, so prefix reuse (when on) finds shared blocks.
        prompt = [10 + (r % 2 * 7 + i) % 50 for i in range(plen)]
        arrivals.setdefault(at, []).append(Sequence(r, prompt, max_tokens))
    finished = []
    for t in range(500):
        for seq in arrivals.get(t, []):
            sched.add(seq)
        if t > 5 and not sched.has_work():
            break
        decoding = {s.req_id for s in sched.running if s.is_prefill_done}
        step = sched.schedule()
        inp = sched.make_step_inputs(step)
        assert step.num_tokens <= sched.max_num_tokens and len(step) <= max_batch_size
        assert decoding <= {s.req_id for s, _ in step.items}  # every running decode, every step
        if chunk is not None and decoding:
            assert sum(n for s, n in step.items if s.req_id not in decoding) <= chunk  # prompt tokens
        for (seq, n), lo in zip(step.items, inp.query_start_loc):
            assert inp.positions[lo : lo + n] == list(
                range(seq.num_computed_tokens, seq.num_computed_tokens + n)
            )
        finished += sched.update(step, {r: 7 for r in inp.sample_req_ids})
    assert len(finished) == len(prompts)
    assert all(len(s.output_ids) == s.max_tokens for s in finished)
    sched.block_manager.check_full()


def test_a_long_prompt_is_chunked_while_every_running_decode_gets_a_token_each_step():
    """Issue 23: a long prompt arriving among running decodes is prefilled one budget-sized chunk a
    step, and every running decode gets its token in every step, the chunks' steps included."""
    budget, decoders = 32, 3
    sched = make_sched(num_blocks=128, block_size=4, max_batch_size=8, max_num_tokens=budget)
    running = [make_seq(r, prompt_len=5, max_tokens=40) for r in range(decoders)]
    for seq in running:
        sched.add(seq)
    run_step(sched)  # the short prompts prefill together and sample their first tokens
    long = make_seq(9, prompt_len=100, max_tokens=2)
    sched.add(long)
    chunks = []
    while not long.output_ids:
        before = [len(s.output_ids) for s in running]
        step, _ = run_step(sched)
        n = {s.req_id: k for s, k in step.items}
        assert all(n[s.req_id] == 1 for s in running), step.items  # every decode, every step
        assert [len(s.output_ids) for s in running] == [b + 1 for b in before]
        assert step.num_tokens <= budget
        chunks.append(n[long.req_id])
        assert len(chunks) < 10
    assert chunks == [budget - decoders] * 3 + [100 - 3 * (budget - decoders)], chunks


def test_prefill_chunk_tokens_bounds_the_prompt_tokens_beside_decodes():
    """With a large budget the scheduler would put whole prompts beside the decodes (the 8B configs:
    8,192 tokens, eight 1,024-token prompts a step); `prefill_chunk_tokens` caps the prompt tokens of
    a step that decodes, and a step with nothing to decode still takes the whole budget."""
    sched = make_sched(num_blocks=256, block_size=4, max_batch_size=8, max_num_tokens=128)
    capped = make_sched(num_blocks=256, block_size=4, max_batch_size=8, max_num_tokens=128, prefill_chunk_tokens=16)
    for s in (sched, capped):
        s.add(make_seq(0, prompt_len=50, max_tokens=6))
        first, _ = run_step(s)
        assert [(q.req_id, n) for q, n in first.items] == [(0, 50)]  # alone: the whole prompt at once
        s.add(make_seq(1, prompt_len=40, max_tokens=2))
        s.add(make_seq(2, prompt_len=30, max_tokens=2))
    step, _ = run_step(sched)
    assert [(q.req_id, n) for q, n in step.items] == [(0, 1), (1, 40), (2, 30)]  # 70 prompt tokens
    prompt_tokens = []
    while any(q.req_id == 0 for q in capped.running):
        decoding = {q.req_id for q in capped.running if q.is_prefill_done}
        step, _ = run_step(capped)
        assert all(n == 1 for q, n in step.items if q.req_id in decoding)  # every decode, every step
        assert decoding <= {q.req_id for q, _ in step.items}
        prompt_tokens.append(sum(n for q, n in step.items if q.req_id not in decoding))
    assert prompt_tokens == [16, 16, 16, 16, 6], prompt_tokens  # 70 prompt tokens, 16 a step


def test_prefill_chunk_tokens_must_be_positive():
    with pytest.raises(ValueError, match="prefill_chunk_tokens must be >= 1"):
        make_sched(prefill_chunk_tokens=0)

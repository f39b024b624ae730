"""In-flight batching without phases (vLLM v1 style).

A step is a list of (sequence, tokens to compute this step). Each sequence only
tracks `num_computed_tokens`; prefill, chunked prefill and decode fall out of
comparing it with `num_tokens`. A sequence samples a token in a step exactly
when the step brings `num_computed_tokens` up to `num_tokens`.

Blocks for prompt + max_tokens are reserved at admission, so a running
sequence never waits for memory: no preemption and no deadlock, at the price
of admitting fewer requests than an optimistic allocator would.

A step that decodes computes at most `prefill_chunk_tokens` prompt tokens (when set; else up to
`max_num_tokens`): a running decode waits on at most one such chunk of someone else's prefill per
token. (Issue 23: under the 8B configs' 8,192-token budget one step may take eight 1,024-token
prompts beside the decodes, and every stream waits for them; docs/benchmarks-log.md saw ITL p99
~0.2 s from such steps.) A step with nothing to decode takes the whole budget, so an idle executor
prefills as fast as before.

A waiting request whose blocks do not fit does not hold back the ones behind it
that do (`may_pass`), but only a bounded number of times or for a bounded time:
then the queue stops behind it, so the blocks running requests free go to it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from disagg_mpi.engine.block_manager import BlockManager, OutOfBlocksError
from disagg_mpi.engine.sequence import Sequence, SequenceStatus

# Bounds on passing a waiting request that does not fit (process knobs DISAGG_MAX_BYPASS and
# DISAGG_MAX_BYPASS_SECONDS): a 37-token chat must not wait behind a long prompt for minutes
# (issue 20 saw 75-117 s), and the long prompt must not wait forever behind a stream of chats.
MAX_BYPASS = 32
MAX_BYPASS_SECONDS = 10.0


def may_pass(bypassed: int, waited_s: float, need_blocks: int, drainable_blocks: int,
             max_bypass: int = MAX_BYPASS, max_wait_s: float = MAX_BYPASS_SECONDS) -> bool:
    """May a request queued behind one that does not fit now be admitted before it?

    Yes while the blocked request has been passed fewer than `max_bypass` times and has waited
    less than `max_wait_s`; then no: the queue stops behind it, and the blocks that running
    requests free go to it. Yes in any case when it would not fit even once every running request
    has finished (`need_blocks > drainable_blocks`: free blocks + those of running requests):
    what it waits for is blocks held for a hand-off (a claim or a lease frees them), and
    stopping the queue would only idle the executor, the starvation this rule exists to end.
    `max_bypass=0`: first come, first served, but for that case.
    """
    if need_blocks > drainable_blocks:
        return True
    return bypassed < max_bypass and waited_s < max_wait_s


class RequestTooLargeError(ValueError):
    """The request cannot fit the block pool even when it is empty; `param`: the field to change."""

    def __init__(self, message: str, param: str | None = "max_tokens"):
        super().__init__(message)
        self.param = param


@dataclass
class ScheduledStep:
    items: list[tuple[Sequence, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class StepInputs:
    """Flat model inputs of one step, as plain lists (tensors are the runner's job)."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]  # block_id * block_size + offset, per new token
    query_start_loc: list[int]  # B + 1 cumulative new-token counts
    context_lens: list[int]  # tokens in the cache per sequence after this step
    block_tables: list[list[int]]  # padded with -1 to the longest table
    sample_indices: list[int]  # flat index of the last token of each sampling sequence
    sample_req_ids: list[int]
    # [source, destination] block copies to make before the step writes any KV (BlockManager.fork)
    block_copies: list[list[int]] = field(default_factory=list)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_num_tokens: int,
                 max_bypass: int = MAX_BYPASS, max_bypass_s: float = MAX_BYPASS_SECONDS,
                 prefill_chunk_tokens: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1 (or unset: up to max_num_tokens), "
                             f"got {prefill_chunk_tokens}")
        # Every running sequence must be able to decode in every step; otherwise
        # some would starve behind the budget.
        if max_num_tokens < max_batch_size:
            raise ValueError(
                f"max_num_tokens ({max_num_tokens}) must be >= max_batch_size "
                f"({max_batch_size}) so that a full batch of decodes fits one step"
            )
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_bypass, self.max_bypass_s = max_bypass, max_bypass_s
        self.waiting: deque[Sequence] = deque()  # need blocks; FCFS, but see may_pass
        self.ready: deque[Sequence] = deque()  # KV already present, need a batch slot only
        self.running: list[Sequence] = []  # hold blocks; at most max_batch_size
        # Parallel sampling (fork): block copies the next step makes first, those the step being
        # computed made (unpinned by update), and those due once the step being computed wrote them.
        self.copies: list[tuple[int, int]] = []
        self._ran_copies: list[tuple[int, int]] = []
        self._forked: list[tuple[int, int]] = []

    # ---- queues ----------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self._check_new(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def check_fits(self, seq: Sequence) -> None:
        """RequestTooLargeError unless the request fits the pool when it is empty."""
        bm = self.block_manager
        needed = bm.blocks_needed(seq.max_total_tokens)
        if needed > bm.num_blocks:
            # (No request id: it is this executor's, not the client's. A context-only request
            # computes its prompt and one token here, whatever max_tokens the client asked.)
            here = ("the first token" if seq.keep_blocks
                    else f"max_tokens {seq.max_tokens}")
            raise RequestTooLargeError(
                f"the request needs {needed} KV blocks (prompt {seq.num_prompt_tokens} tokens"
                f" + {here}, block_size {bm.block_size}) but the "
                f"pool has {bm.num_blocks}; shorten the prompt, lower max_tokens or give the "
                "executor more KV blocks",
                "input_token_ids" if seq.keep_blocks else "max_tokens",
            )

    def fork(self, seq: Sequence, leader: Sequence, step: ScheduledStep | None = None) -> bool:
        """Parallel sampling: `seq` shares the prompt KV of `leader` (the same prompt) instead of
        computing it (BlockManager.fork). With `step`, which computes the leader's last prompt chunk:
        it joins that step computing nothing, and samples its first token from the leader's row.
        Without (a generation-only request whose leader's KV landed; its first token is known): it is
        queued as prefilled. False, with nothing changed: no room (the caller runs it alone)."""
        if step is not None and len(self.running) >= self.max_batch_size:
            return False
        try:
            copies = self.block_manager.fork(seq.req_id, leader.req_id, seq.num_prompt_tokens,
                                             seq.max_total_tokens, share_tail=seq.keep_blocks)
        except OutOfBlocksError:
            return False
        seq.fork_of, seq.num_computed_tokens = leader.req_id, seq.num_prompt_tokens
        if step is None:
            self.copies += copies  # (the leader's KV is in: copied before the next step writes)
            self.add_prefilled(seq)
        else:
            self._forked += copies  # (this step writes the leader's last prompt block: the next copies it)
            self._start(seq)
            step.items.append((seq, 0))
        return True

    def add_prefilled(self, seq: Sequence) -> None:
        """Queue a generation-only sequence whose prompt KV is already in its blocks.

        The caller allocated the blocks under `seq.req_id` (prompt + max_tokens)
        and moved the KV in; the first token came from the context executor.
        """
        bm = self.block_manager
        problems = []
        if seq.num_computed_tokens != seq.num_prompt_tokens:
            problems.append(
                f"num_computed_tokens is {seq.num_computed_tokens}, "
                f"expected the prompt length {seq.num_prompt_tokens}"
            )
        if len(seq.output_ids) != 1:
            problems.append(f"expected exactly the first token in output_ids, got {seq.output_ids}")
        if not bm.has_blocks(seq.req_id):
            problems.append("no blocks allocated under its req_id")
        elif len(bm.block_table(seq.req_id)) < bm.blocks_needed(seq.max_total_tokens):
            problems.append(f"blocks do not cover prompt + max_tokens ({seq.max_total_tokens})")
        if problems:
            raise ValueError(f"add_prefilled(request {seq.req_id}): " + "; ".join(problems))
        self._check_new(seq)
        reason = seq.check_stop(seq.output_ids[0])
        if reason is not None:
            raise ValueError(
                f"add_prefilled(request {seq.req_id}): already finished by its first token "
                f"({reason!r}); answer it without scheduling"
            )
        seq.status = SequenceStatus.WAITING
        self.ready.append(seq)

    def abort(self, req_id: int) -> Sequence | None:
        """Remove the sequence from whichever queue holds it and free its blocks."""
        for queue in (self.waiting, self.ready, self.running):
            for seq in queue:
                if seq.req_id == req_id:
                    queue.remove(seq)
                    self.block_manager.free(req_id)
                    seq.finish("abort")
                    return seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.ready or self.running)

    def num_inflight_tokens(self) -> int:
        """Tokens still to compute or generate over all queued and running sequences."""
        return sum(s.remaining_tokens for q in (self.waiting, self.ready, self.running) for s in q)

    # ---- one step --------------------------------------------------------------

    def schedule(self, admit: bool = True) -> ScheduledStep:
        """The next step; `admit=False` leaves the ready and waiting queues for a later step."""
        step = ScheduledStep()
        budget = self.max_num_tokens
        # Decodes first: one token each, latency-critical, and they always fit
        # (running <= max_batch_size <= max_num_tokens).
        for seq in self.running:
            if seq.is_prefill_done:
                step.items.append((seq, 1))
                budget -= 1
        # Prompt tokens beside decodes: one chunk, so that the decodes are not held up for long.
        decoding = bool(step.items) or (admit and bool(self.ready))
        prefill = self.prefill_chunk_tokens if decoding and self.prefill_chunk_tokens is not None else budget
        # Then prefills already under way, in admission order.
        for seq in self.running:
            if not seq.is_prefill_done and min(budget, prefill) > 0:
                n = min(seq.remaining_prefill, budget, prefill)
                step.items.append((seq, n))
                budget, prefill = budget - n, prefill - n
        if not admit:
            return step
        # Then new sequences: those with KV already present (no blocks needed) ...
        while self.ready and len(self.running) < self.max_batch_size and budget > 0:
            seq = self.ready.popleft()
            self._start(seq)
            step.items.append((seq, 1))
            budget -= 1
        # ... and waiting ones, in arrival order; one whose blocks do not fit lets those behind it
        # pass, within bounds (may_pass).
        if self.waiting and len(self.running) < self.max_batch_size and min(budget, prefill) > 0:
            self._admit_waiting(step, min(budget, prefill))
        return step

    def _admit_waiting(self, step: ScheduledStep, budget: int) -> None:
        bm, now = self.block_manager, time.monotonic()
        # Blocks that will be free once every running request finishes; the rest are held for a
        # hand-off (answered contexts, pulls in flight). (Prefix-shared blocks make it an estimate.)
        drainable = bm.num_free + sum(len(bm.block_table(s.req_id)) for s in self.running)
        passed: list[Sequence] = []  # blocked requests that the ones admitted now overtake
        for seq in list(self.waiting):
            if len(self.running) >= self.max_batch_size or budget <= 0:
                break
            if not self._reserve(seq):
                if not may_pass(seq.bypassed, now - seq.arrival_time, bm.blocks_needed(seq.max_total_tokens),
                                drainable, self.max_bypass, self.max_bypass_s):
                    break
                passed.append(seq)
                continue
            self.waiting.remove(seq)
            self._start(seq)
            for blocked in passed:
                blocked.bypassed += 1
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            step.items.append((seq, n))
            budget -= n

    def update(self, step: ScheduledStep, sampled: dict[int, int]) -> list[Sequence]:
        """Apply a computed step and its sampled tokens; returns the finished sequences.

        Finished sequences leave the scheduler and free their blocks, unless
        `keep_blocks` is set (context-only: the caller frees after the hand-off).
        """
        finished = []
        bm = self.block_manager
        bm.unpin([b for copy in self._ran_copies for b in copy])
        self.copies = [c for c in self.copies if c not in self._ran_copies] + self._forked
        self._ran_copies, self._forked = [], []
        for seq, n in step.items:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted between schedule() and update()
            seq.num_computed_tokens += n
            if bm.enable_prefix_reuse and not seq.fake_context:  # (fake KV must never be shared)
                bm.commit_full_blocks(seq.req_id, seq.all_ids[: seq.num_computed_tokens])
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # partial prefill chunk: nothing sampled
            if seq.req_id not in sampled:
                raise KeyError(f"request {seq.req_id} completed its tokens but got no sample")
            token = sampled[seq.req_id]
            seq.output_ids.append(token)
            reason = seq.check_stop(token)
            if reason is not None:
                seq.finish(reason)
                self.running.remove(seq)
                if not seq.keep_blocks:
                    bm.free(seq.req_id)
                finished.append(seq)
        return finished

    def make_step_inputs(self, step: ScheduledStep) -> StepInputs:
        bs = self.block_manager.block_size
        out = StepInputs([], [], [], [0], [], [], [], [], [list(c) for c in self.copies])
        self._ran_copies = list(self.copies)
        rows: dict[int, int] = {}  # req_id -> its sampled row
        for seq, n in step.items:
            if n == 0:  # forked this step (fork): computes nothing, samples its leader's row
                out.sample_indices.append(rows[seq.fork_of])
                out.sample_req_ids.append(seq.req_id)
                continue
            start = seq.num_computed_tokens
            table = self.block_manager.block_table(seq.req_id)
            assert len(table) * bs >= start + n, f"request {seq.req_id}: blocks too few"
            # Decode feeds the last output token at position num_tokens - 1.
            out.input_ids.extend(seq.all_ids[start : start + n])
            out.positions.extend(range(start, start + n))
            out.slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            out.query_start_loc.append(out.query_start_loc[-1] + n)
            out.context_lens.append(start + n)
            out.block_tables.append(table)
            if start + n == seq.num_tokens:
                out.sample_indices.append(out.query_start_loc[-1] - 1)
                out.sample_req_ids.append(seq.req_id)
                rows[seq.req_id] = out.sample_indices[-1]
        width = max((len(t) for t in out.block_tables), default=0)
        out.block_tables = [t + [-1] * (width - len(t)) for t in out.block_tables]
        return out

    # ---- internals -------------------------------------------------------------

    def _check_new(self, seq: Sequence) -> None:
        queued = (s.req_id for q in (self.waiting, self.ready, self.running) for s in q)
        if seq.req_id in set(queued):
            raise ValueError(f"request {seq.req_id} is already in the scheduler")

    def _reserve(self, seq: Sequence) -> bool:
        bm = self.block_manager
        # A prompt whose logprobs are asked is computed in full: a reused prefix would have no logits.
        prompt = (seq.prompt_ids if bm.enable_prefix_reuse and not seq.fake_context and seq.num_prompt_logprobs < 0
                  else None)
        if not bm.can_allocate(seq.max_total_tokens, prompt):
            return False
        bm.allocate(seq.req_id, seq.max_total_tokens, prompt)
        # A benchmark request's prompt counts as in the cache (engine/benchmark.py): it starts decoding.
        seq.num_computed_tokens = seq.num_prompt_tokens if seq.fake_context else bm.num_cached_tokens(seq.req_id)
        return True

    def _start(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

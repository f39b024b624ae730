"""The shared ring's GPU-side handshake (shared_staging.sender_steps / receiver_steps), simulated.

Each side's steps become a queue of stream operations, as the transceiver queues them: the
context stream waits for free[slot], copies a chunk into the slot and writes ready[slot]; the
generation stream waits for ready[slot], reads the slot and writes free[slot]. Several pulls
take turns in one ring, each given the next chunk numbers, and both sides queue them in that
order (all at once, or one after the other). A scheduler runs whichever stream can move, in
random orders, with the words compared the way cuStreamWaitValue32's GEQ does (cyclically, on
32 bits)."""

from __future__ import annotations

import random

import pytest

from disagg_mpi.transfer.shared_staging import receiver_steps, sender_steps

MASK = 0xFFFFFFFF


def _geq(word: int, value: int) -> bool:
    diff = (word - value) & MASK
    return diff < 1 << 31  # (int32)(word - value) >= 0


def _streams(pull: int, seq: int, nchunks: int, slots: int, gen_seq: int | None = None):
    ctx, gen = [], []
    for k, (slot, free_at, ready) in enumerate(sender_steps(seq, nchunks, slots)):
        if free_at is not None:
            ctx.append(("wait", "free", slot, free_at))
        ctx.append(("put", slot, (pull, k)))
        ctx.append(("write", "ready", slot, ready))
    for k, (slot, ready_at, free) in enumerate(receiver_steps(seq if gen_seq is None else gen_seq, nchunks, slots)):
        gen.append(("wait", "ready", slot, ready_at))
        gen.append(("get", slot, (pull, k)))
        gen.append(("write", "free", slot, free))
    return ctx, gen


def _run(pulls: list[tuple[int, int]], slots: int, rng: random.Random, stale_second: bool = False,
         at_once: bool = False) -> list:
    """Run pulls (first chunk number, chunks) on one ring, one after the other or all queued at
    once; returns (expected, read) for every chunk the generation side read."""
    start = pulls[0][0] & MASK  # the words of a ring that has moved pulls[0][0] chunks so far
    words = {"ready": [start] * slots, "free": [start] * slots}
    contents: list = [None] * slots
    got = []
    batches = []
    for pull, (seq, n) in enumerate(pulls):
        batches.append(_streams(pull, seq, n, slots, pulls[0][0] if stale_second and pull else None))
    if at_once:
        batches = [([op for c, _ in batches for op in c], [op for _, g in batches for op in g])]
    for ctx, gen in batches:
        queues = [list(ctx), list(gen)]
        while any(queues):
            movable = [q for q in queues if q and (q[0][0] != "wait" or _geq(words[q[0][1]][q[0][2]], q[0][3]))]
            if not movable:
                raise RuntimeError("deadlock: both streams wait")
            op = rng.choice(movable).pop(0)
            if op[0] == "write":
                words[op[1]][op[2]] = op[3] & MASK
            elif op[0] == "put":
                contents[op[1]] = op[2]
            elif op[0] == "get":
                got.append((op[2], contents[op[1]]))
    return got


@pytest.mark.parametrize("at_once", [False, True], ids=["in_turn", "queued_together"])
@pytest.mark.parametrize("slots", [1, 2, 3, 8])
@pytest.mark.parametrize("seed", range(12))
def test_every_chunk_is_read_after_it_is_written_and_before_it_is_overwritten(slots, seed, at_once):
    rng = random.Random(seed)
    pulls, seq = [], 0
    for _ in range(4):  # one ring, several pulls: each takes the next chunk numbers
        n = rng.randint(1, 3 * slots + 2)
        pulls.append((seq, n))
        seq += n
    got = _run(pulls, slots, rng, at_once=at_once)
    assert len(got) == seq and all(read == want for want, read in got)


def test_values_wrap_around_32_bits():
    rng = random.Random(7)
    seq = (1 << 32) - 5  # the ring's count crosses 2**32 during the first pull
    got = _run([(seq, 12), (seq + 12, 9)], 4, rng, at_once=True)
    assert all(want == read for want, read in got) and len(got) == 21


@pytest.mark.parametrize("seed", range(5))
def test_a_pull_that_reuses_old_flag_values_is_caught(seed):
    # The generation side of a second pull waiting for the first pull's values reads slots before
    # the context side refilled them, or leaves the context side waiting for ever: either shows.
    try:
        got = _run([(0, 6), (6, 6)], 3, random.Random(seed), stale_second=True)
    except RuntimeError as err:
        assert "deadlock" in str(err)
    else:
        assert any(want != read for want, read in got)


def test_chunk_numbers_pick_the_slots_and_only_a_fresh_ring_skips_the_wait():
    assert sender_steps(0, 5, 3) == [(0, None, 1), (1, None, 2), (2, None, 3), (0, 1, 4), (1, 2, 5)]
    steps = sender_steps(10, 4, 3)  # a later pull: chunk 10 goes in slot 1, once chunk 7 has left it
    assert steps == [(1, 8, 11), (2, 9, 12), (0, 10, 13), (1, 11, 14)]
    assert receiver_steps(10, 2, 3) == [(1, 11, 11), (2, 12, 12)]

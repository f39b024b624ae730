"""Block copies of CUDA IPC pulls and the shared staging rings, on CPU (the same code runs on GPU)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from disagg_mpi.transfer import block_copy, chunks, shared_staging
from disagg_mpi.transfer.chunks import zero_copy_bounds


def _pool(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.arange(n * 3 * 2 * 2 * 4 * 8, dtype=torch.float32).reshape(n, 3, 2, 2, 4, 8).to(dtype)


def _ref_bounds(ctx_ids, gen_ids, max_run):
    bounds = [0]
    for i in range(1, len(ctx_ids)):
        if i - bounds[-1] >= max_run or ctx_ids[i] != ctx_ids[i - 1] + 1 or gen_ids[i] != gen_ids[i - 1] + 1:
            bounds.append(i)
    bounds.append(len(ctx_ids))
    return bounds


def test_zero_copy_bounds_match_the_definition():
    rng = random.Random(3)
    for _ in range(2000):
        n = rng.randint(0, 40)
        c = sorted(rng.sample(range(100), n)) if rng.random() < 0.5 else rng.sample(range(100), n)
        g = list(range(5, 5 + n)) if rng.random() < 0.5 else rng.sample(range(100), n)
        m = rng.randint(1, 12)
        assert zero_copy_bounds(c, g, m) == _ref_bounds(c, g, m), (c, g, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["one_run", "few_runs", "shuffled"])
def test_copy_blocks_moves_exactly_the_named_blocks(dtype, pattern):
    rng = random.Random(pattern)
    src, dst = _pool(40, dtype), torch.full((40, 3, 2, 2, 4, 8), -1.0, dtype=dtype)
    before = dst.clone()
    n = 24
    if pattern == "one_run":
        s_ids, d_ids = list(range(3, 3 + n)), list(range(10, 10 + n))
    elif pattern == "few_runs":
        s_ids, d_ids = list(range(12)) + list(range(20, 32)), list(range(16, 40))
    else:  # many runs: one indexed copy (Triton kernel on GPU / under the interpreter)
        s_ids, d_ids = rng.sample(range(40), n), rng.sample(range(40), n)
    moved = block_copy.copy_blocks(dst, d_ids, src, s_ids)
    assert moved == n * src[0].numel() * src.element_size()
    for s, d in zip(s_ids, d_ids):
        assert torch.equal(dst[d], src[s]), (s, d)
    rest = [b for b in range(40) if b not in d_ids]
    assert torch.equal(dst[rest], before[rest])


def test_copy_blocks_many_runs_take_one_indexed_copy(monkeypatch):
    monkeypatch.setattr(block_copy, "MAX_COPIES", 0)
    src, dst = _pool(16), torch.zeros(16, 3, 2, 2, 4, 8)
    s_ids, d_ids = [5, 6, 7, 3, 14], [9, 10, 11, 0, 1]
    block_copy.copy_blocks(dst, d_ids, src, s_ids)
    for s, d in zip(s_ids, d_ids):
        assert torch.equal(dst[d], src[s])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set before import)")
def test_copy_blocks_triton_kernel_under_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(block_copy, "MAX_COPIES", 0)
    src, dst = _pool(16), torch.zeros(16, 3, 2, 2, 4, 8)
    s_ids, d_ids = [5, 1, 9, 3, 14, 0, 7, 11, 2, 12], [0, 2, 4, 6, 8, 10, 12, 14, 1, 3]
    block_copy.copy_blocks(dst, d_ids, src, s_ids)
    for s, d in zip(s_ids, d_ids):
        assert torch.equal(dst[d], src[s])


def test_ring_is_shared_between_its_owner_and_a_mapper():
    owner = shared_staging.Ring(1000, 2)
    assert owner.slot_bytes % (1 << 21) == 0 and os.path.exists(owner.path)
    peer = shared_staging.Ring(owner.slot_bytes, 2, path=owner.path)
    owner.slot(3, 16).copy_(torch.arange(16, dtype=torch.uint8))  # slot 3 % 2 == 1
    assert peer.slot(1, 16).tolist() == list(range(16))
    assert peer.slot(0, 16).sum().item() == 0
    with pytest.raises(ValueError, match="does not fit"):
        owner.slot(0, owner.slot_bytes + 1)
    peer.close()
    owner.close()
    assert not os.path.exists(owner.path), "the owner unlinks the shared file"


def test_ring_pool_keeps_one_ring_per_context_rank_within_a_bound():
    pool = shared_staging.RingPool(max_live=2)
    a, b = pool.get(0, 1 << 20, 2), pool.get(1, 1 << 20, 2)
    assert a is not None and b is not None and a.path != b.path
    assert pool.get(0, 1 << 20, 2) is a, "the pulls from one context rank share its ring"
    assert pool.get(2, 1 << 20, 2) is None, "a third context rank goes over MPI"
    assert pool.get(0, 8 << 20, 2) is None, "a chunk bigger than the ring's slots goes over MPI"
    assert a.users == 2, "lent to two pulls"
    pool.retire(0, a)
    assert pool.get(0, 1 << 20, 2) is None, "a context rank that refused a ring gets none again"
    assert not pool.may_lend(0) and pool.may_lend(2)
    pool.give_back(a)
    assert os.path.exists(a.path), "a retired ring stays while a pull answered before uses it"
    pool.give_back(a)
    assert not os.path.exists(a.path), "and is closed after the last one"
    c = pool.get(2, 1 << 20, 2)
    assert c is not None and pool.made == 3, "its place goes to another context rank"
    pool.close()
    assert not any(os.path.exists(r.path) for r in (b, c))


def test_ring_maps_close_the_oldest_unused_mapping():
    owners = [shared_staging.Ring(1 << 20, 2) for _ in range(3)]
    maps = shared_staging.RingMaps(keep=2)
    m0 = maps.get(owners[0].describe())
    assert maps.get(owners[0].describe()) is m0, "mapped once"
    maps.get(owners[1].describe())
    maps.get(owners[2].describe(), in_use={owners[1].path})
    assert set(maps._maps) == {owners[1].path, owners[2].path}
    maps.close()
    for o in owners:
        o.close()


def test_pool_pair_copies_one_run_with_one_raw_copy(monkeypatch):
    # The raw cudaMemcpyAsync is replaced by a host memmove on these CPU pools: the pointer
    # arithmetic (offsets of the first ids, byte count) is what is checked.
    import ctypes

    calls = []

    def memmove(dst, src, nbytes, kind, stream):
        calls.append(nbytes)
        ctypes.memmove(dst, src, nbytes)

    monkeypatch.setattr(block_copy, "_memcpy_async", memmove)
    src, dst = _pool(16), torch.zeros(16, 3, 2, 2, 4, 8)
    pair = block_copy.PoolPair(dst, src, None)
    assert pair.raw
    assert pair.copy([5, 6, 7, 99], (10, 11, 12), 3) == 3 * src[0].numel() * 4
    assert calls == [3 * src[0].numel() * 4]
    assert torch.equal(dst[5:8], src[10:13])
    assert not dst[:5].any() and not dst[8:].any()
    # Not one run: the general path (block by block here), same result.
    pair.copy([0, 2], [1, 3], 2)
    assert len(calls) == 1 and torch.equal(dst[0], src[1]) and torch.equal(dst[2], src[3])
    # Pools of another block shape are never copied raw.
    assert not block_copy.PoolPair(torch.zeros(16, 3, 2, 2, 4, 4), src, None).raw


@pytest.mark.parametrize("ctx_bs,bs", [(4, 4), (4, 8), (8, 4), (4, 6)])
def test_scatter_chunk_lands_every_token_in_our_blocks(ctx_bs, bs):
    # A 2-block chunk starting at the request's block 1, into our shuffled blocks: each token t
    # of the request must land at (our block t // bs, offset t % bs), whatever the block sizes.
    num_tokens = 13
    ours = [7, 2, 9, 4, 0, 5, 3, 8][: -(-num_tokens // bs)]
    pool = torch.zeros(10, 3, 2, 2, bs, 8)
    tok = torch.arange(num_tokens, dtype=torch.float32).view(-1, 1, 1, 1, 1) + 1  # value = token + 1
    chunk = torch.zeros(2, 3, 2, 2, ctx_bs, 8)
    for t in range(ctx_bs, min(3 * ctx_bs, num_tokens)):
        chunk[t // ctx_bs - 1, :, :, :, t % ctx_bs] = tok[t].view(1, 1, 1, 1)
    chunks.scatter_chunk(pool, ours, chunk, 1, ctx_bs, bs, num_tokens)
    for t in range(num_tokens):
        got = pool[ours[t // bs], :, :, :, t % bs]
        want = float(t + 1) if ctx_bs <= t < 3 * ctx_bs else 0.0
        assert torch.all(got == want), f"token {t}"

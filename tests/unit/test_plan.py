"""Exhaustive tests of the pure re-sharding plan (no MPI, no model)."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import product

import numpy as np
import pytest

from disagg_mpi.transfer import (
    CacheState,
    LayoutMismatchError,
    PlanItem,
    block_size_convertible,
    check_compatible,
    local_slices,
    make_plan,
    map_blocks,
    plan_bytes,
    senders_for,
)
from disagg_mpi.transfer.plan import _plan

TPS = (1, 2, 3, 4, 6, 8)
PPS = (1, 2, 3, 4)
# name: (query heads, kv heads, layers). "odd" adds a duplicated-head case with 3 KV heads.
SHAPES = {"smollm2": (9, 3, 30), "small": (8, 2, 6), "odd": (12, 3, 7)}
TOKENS = (1, 17, 100)


def _layouts(q: int, kv: int, layers: int) -> list[tuple[int, int]]:
    return [(tp, pp) for tp, pp in product(TPS, PPS)
            if q % tp == 0 and (kv % tp == 0 if tp <= kv else tp % kv == 0) and pp <= layers]


PAIRS = [pytest.param(name, c, g, id=f"{name}-c{c[0]}x{c[1]}-g{g[0]}x{g[1]}")
         for name, shape in SHAPES.items()
         for c, g in product(_layouts(*shape), repeat=2)]


def _state(name: str, tp: int, pp: int, split=None, block_size: int = 16,
           dtype: str = "float16") -> CacheState:
    _, kv, layers = SHAPES[name]
    return CacheState.create(layers, kv, 64, block_size, dtype, tp, pp, split)


def check_plan(ctx: CacheState, gen: CacheState) -> dict[int, list[PlanItem]]:
    """Assert every invariant the transfer relies on; return the plan for extra checks."""
    plan = make_plan(ctx, gen)
    assert sorted(plan) == list(range(gen.world_size))
    for g, items in plan.items():
        g_stage, g_tp = gen.coords(g)
        need = {(layer, h) for layer in range(*gen.layer_range(g_stage))
                for h in range(*gen.kv_head_range(g_tp))}
        seen: Counter = Counter()
        holder: dict[tuple[int, int], set[int]] = defaultdict(set)
        for it in items:
            assert it.num_layers > 0 and it.num_heads > 0
            c_stage, c_tp = ctx.coords(it.ctx_rank)
            cl0, cl1 = ctx.layer_range(c_stage)
            ch0, ch1 = ctx.kv_head_range(c_tp)
            assert cl0 <= it.layer_start < it.layer_end <= cl1, "reads layers ctx lacks"
            assert ch0 <= it.head_start < it.head_end <= ch1, "reads heads ctx lacks"
            sl = local_slices(it, ctx, gen, g)
            assert 0 <= sl.ctx_layers.start < sl.ctx_layers.stop <= ctx.layer_split[c_stage]
            assert 0 <= sl.gen_layers.start < sl.gen_layers.stop <= gen.layer_split[g_stage]
            assert 0 <= sl.ctx_heads.start < sl.ctx_heads.stop <= ctx.local_kv_heads
            assert 0 <= sl.gen_heads.start < sl.gen_heads.stop <= gen.local_kv_heads
            for layer, h in product(range(it.layer_start, it.layer_end),
                                    range(it.head_start, it.head_end)):
                seen[(layer, h)] += 1
                holder[(c_stage, h)].add(it.ctx_rank)
        assert set(seen) == need, "missing or extra (layer, head)"
        assert all(n == 1 for n in seen.values()), "read twice"
        assert all(len(r) == 1 for r in holder.values()), "head split over several holders"
        # Merged: no two items from one ctx rank that could be one rectangle.
        by_rank = Counter(it.ctx_rank for it in items)
        assert all(n == 1 for n in by_rank.values())
        for n in TOKENS:
            got = sum(plan_bytes(it, ctx.head_dim, ctx.itemsize, n) for it in items)
            assert got == gen.bytes_per_token_per_rank(g) * n
    return plan


@pytest.mark.parametrize("name,c,g", PAIRS)
def test_plan_covers_exactly_once(name: str, c: tuple[int, int], g: tuple[int, int]) -> None:
    ctx, gen = _state(name, *c), _state(name, *g)
    plan = check_plan(ctx, gen)
    for n in TOKENS:
        total = sum(plan_bytes(it, 64, 2, n) for items in plan.values() for it in items)
        assert total == sum(gen.bytes_per_token_per_rank(r) * n for r in range(gen.world_size))
    # Inverse view holds the same items, each from the rank that serves it.
    inv = senders_for(plan)
    assert sum(map(len, inv.values())) == sum(map(len, plan.values()))
    for c_rank, pairs in inv.items():
        assert all(it.ctx_rank == c_rank and it in plan[gr] for gr, it in pairs)
    # Readers of a duplicated head spread over as many copies as possible.
    dup = max(1, ctx.tp_size // ctx.num_kv_heads)
    readers: dict[tuple[int, int], set[int]] = defaultdict(set)
    used: dict[tuple[int, int], set[int]] = defaultdict(set)
    for gr, items in plan.items():
        for it in items:
            key = (ctx.coords(it.ctx_rank)[0], it.head_start)
            if it.num_heads == 1:
                readers[key].add(gr)
                used[key].add(it.ctx_rank)
    if dup > 1:
        for key, rs in readers.items():
            assert len(used[key]) == min(len(rs), dup)


@pytest.mark.parametrize("name,c_split,g_split,c_tp,g_tp", [
    ("small", (1, 5), (4, 2), 2, 4),
    ("small", (3, 1, 2), (1, 1, 1, 3), 8, 1),
    ("small", (5, 1), (2, 2, 2), 4, 8),
    ("smollm2", (10, 20), (1, 1, 28), 3, 1),
    ("smollm2", (27, 1, 1, 1), (15, 15), 1, 3),
    ("odd", (1, 6), (2, 2, 3), 6, 3),
])
def test_uneven_layer_split(name, c_split, g_split, c_tp, g_tp) -> None:
    ctx = _state(name, c_tp, len(c_split), c_split)
    gen = _state(name, g_tp, len(g_split), g_split)
    assert ctx.layer_split == c_split and gen.layer_split == g_split
    check_plan(ctx, gen)
    check_plan(gen, ctx)


@pytest.mark.parametrize("field,value,words", [
    ("dtype", "bfloat16", ("dtype", "float16", "bfloat16")),
    ("head_dim", 128, ("head_dim", "64", "128")),
    ("num_layers", 7, ("num_layers", "6", "7")),
    ("num_kv_heads", 4, ("num_kv_heads", "2", "4")),
])
def test_refusal_names_difference_without_side_effect(field, value, words) -> None:
    ctx = _state("small", 2, 2)
    kw = ctx.to_dict() | {field: value}
    kw["layer_split"] = None if field == "num_layers" else kw["layer_split"]
    gen = CacheState.create(**kw)
    before = (ctx.to_dict(), gen.to_dict(), _plan.cache_info().currsize)
    for call in (check_compatible, make_plan):
        with pytest.raises(LayoutMismatchError) as err:
            call(ctx, gen)
        assert isinstance(err.value, ValueError)
        assert all(w in str(err.value) for w in words), str(err.value)
    assert (ctx.to_dict(), gen.to_dict(), _plan.cache_info().currsize) == before


def test_refusal_lists_every_difference() -> None:
    ctx = _state("small", 1, 1)
    gen = CacheState.create(6, 2, 128, 16, "float32", 1, 1)
    msg = str(pytest.raises(LayoutMismatchError, check_compatible, ctx, gen).value)
    assert "dtype" in msg and "head_dim" in msg


def test_block_size_may_differ() -> None:
    assert block_size_convertible(16, 32) and block_size_convertible(7, 16)
    assert not block_size_convertible(0, 16)
    check_plan(_state("small", 2, 1, block_size=16), _state("small", 4, 2, block_size=32))


def test_plan_result_is_a_fresh_copy() -> None:
    ctx, gen = _state("small", 2, 1), _state("small", 1, 2)
    make_plan(ctx, gen)[0].clear()
    assert make_plan(ctx, gen)[0]


@pytest.mark.parametrize("cbs,gbs", [(16, 16), (16, 32), (32, 16), (8, 12)])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 100])
def test_map_blocks_covers_every_token_once(cbs: int, gbs: int, n: int) -> None:
    runs = map_blocks(n, cbs, gbs)
    tokens: list[int] = []
    for cb, co, gb, go, length in runs:
        assert length > 0 and co + length <= cbs and go + length <= gbs
        assert cb * cbs + co == gb * gbs + go, "ctx and gen disagree on the token"
        tokens.extend(range(cb * cbs + co, cb * cbs + co + length))
    assert tokens == list(range(n))
    if cbs == gbs:
        assert len(runs) == -(-n // cbs)


def test_map_blocks_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        map_blocks(-1, 16, 16)
    with pytest.raises(LayoutMismatchError, match="block_size"):
        map_blocks(4, 0, 16)


@pytest.mark.parametrize("name,c,g,cbs,gbs", [
    ("small", (2, 2), (8, 3), 16, 8), ("small", (8, 1), (1, 4), 8, 12),
    ("odd", (6, 2), (3, 3), 4, 16), ("smollm2", (3, 4), (1, 3), 16, 16),
])
def test_simulated_transfer_reproduces_cache(name, c, g, cbs, gbs) -> None:
    """Move fake pools through plan + local_slices + map_blocks; gen must equal the truth."""
    ctx, gen = _state(name, *c, block_size=cbs), _state(name, *g, block_size=gbs)
    n, layers, heads = 37, ctx.num_layers, ctx.num_kv_heads
    lay, kv, hd, tok = np.meshgrid(np.arange(layers), np.arange(2), np.arange(heads),
                                   np.arange(n), indexing="ij")
    truth = lay * 100000 + kv * 10000 + hd * 1000 + tok  # [L, 2, H, T]

    def pool(st: CacheState, rank: int, fill: bool) -> np.ndarray:
        s, t = st.coords(rank)
        (l0, l1), (h0, h1) = st.layer_range(s), st.kv_head_range(t)
        nb = -(-n // st.block_size)
        p = np.full((nb, l1 - l0, 2, h1 - h0, st.block_size), -1)
        if fill:
            for b in range(nb):
                seg = truth[l0:l1, :, h0:h1, b * st.block_size:(b + 1) * st.block_size]
                p[b, ..., :seg.shape[-1]] = seg
        return p

    ctx_pools = [pool(ctx, r, True) for r in range(ctx.world_size)]
    for g_rank, items in make_plan(ctx, gen).items():
        dst = pool(gen, g_rank, False)
        for it in items:
            sl = local_slices(it, ctx, gen, g_rank)
            src = ctx_pools[it.ctx_rank]
            for cb, co, gb, go, length in map_blocks(n, cbs, gbs):
                dst[gb, sl.gen_layers, :, sl.gen_heads, go:go + length] = \
                    src[cb, sl.ctx_layers, :, sl.ctx_heads, co:co + length]
        expect = pool(gen, g_rank, True)
        assert np.array_equal(dst, expect)

"""Re-sharding plan between a context and a generation executor's KV layouts.

Everything here is a pure function of two `CacheState`s (plus token counts),
so it is exhaustively unit-tested without MPI, and both sides of a transfer
can compute the same plan independently and agree on it without talking.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .cache_state import CacheState


class LayoutMismatchError(ValueError):
    """The generation side cannot take the context side's KV layout.

    Raised before any byte moves, so a mismatch never silently garbles a cache.
    """


def block_size_convertible(a: int, b: int) -> bool:
    """Whether KV in blocks of `a` tokens can be moved into blocks of `b` tokens.

    The transfer copies token runs (see `map_blocks`), so any positive sizes
    work; the rule lives here alone so that a backend that can only do
    whole-block copies can tighten it in one place.
    """
    return a > 0 and b > 0


def check_compatible(ctx: CacheState, gen: CacheState) -> None:
    """Raise `LayoutMismatchError` naming every field (with both values) that differs.

    TP/PP/layer split may differ (that is what the plan re-shards); the data
    itself (dtype, head size, layer count, head count) must be identical.
    """
    problems = [
        f"{field} differs (context {getattr(ctx, field)}, generation {getattr(gen, field)})"
        for field in ("dtype", "head_dim", "num_layers", "num_kv_heads")
        if getattr(ctx, field) != getattr(gen, field)
    ]
    # Head count and dtype are uniform per layer (CacheState refuses otherwise),
    # so equal scalars above mean "same dtype and head count on every layer".
    if not block_size_convertible(ctx.block_size, gen.block_size):
        problems.append(f"block_size not convertible (context {ctx.block_size}, "
                        f"generation {gen.block_size})")
    if problems:
        raise LayoutMismatchError("incompatible KV cache layouts: " + "; ".join(problems))


@dataclass(frozen=True)
class PlanItem:
    """One piece a generation rank reads from one context rank.

    Layer and head numbers are GLOBAL, so the item means the same thing on
    both sides; use `local_slices` for the offsets inside each rank's pool.
    """

    ctx_rank: int
    layer_start: int
    layer_end: int
    head_start: int
    head_end: int

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start


@dataclass(frozen=True)
class LocalSlices:
    """Pool index ranges (dims 1 = layers and 3 = KV heads) of an item on each side."""

    ctx_layers: slice
    ctx_heads: slice
    gen_layers: slice
    gen_heads: slice


def local_slices(item: PlanItem, ctx: CacheState, gen: CacheState, gen_rank: int) -> LocalSlices:
    """Translate an item's global ranges into offsets in the ctx and gen rank pools.

    A duplicated head (tp > heads) sits at local head 0 on every holder, which
    falls out of subtracting the rank's first global head.
    """
    c_stage, c_tp = ctx.coords(item.ctx_rank)
    g_stage, g_tp = gen.coords(gen_rank)
    cl0, ch0 = ctx.layer_range(c_stage)[0], ctx.kv_head_range(c_tp)[0]
    gl0, gh0 = gen.layer_range(g_stage)[0], gen.kv_head_range(g_tp)[0]
    return LocalSlices(
        ctx_layers=slice(item.layer_start - cl0, item.layer_end - cl0),
        ctx_heads=slice(item.head_start - ch0, item.head_end - ch0),
        gen_layers=slice(item.layer_start - gl0, item.layer_end - gl0),
        gen_heads=slice(item.head_start - gh0, item.head_end - gh0),
    )


def _head_holders(ctx: CacheState, head: int) -> list[int]:
    """Context TP ranks holding `head` (several when tp > heads)."""
    if ctx.tp_size <= ctx.num_kv_heads:
        return [head // (ctx.num_kv_heads // ctx.tp_size)]
    dup = ctx.tp_size // ctx.num_kv_heads
    return list(range(head * dup, (head + 1) * dup))


@functools.lru_cache(maxsize=256)
def _plan(ctx: CacheState, gen: CacheState) -> tuple[tuple[PlanItem, ...], ...]:
    out: list[tuple[PlanItem, ...]] = []
    for gen_rank in range(gen.world_size):
        g_stage, g_tp = gen.coords(gen_rank)
        g_l0, g_l1 = gen.layer_range(g_stage)
        g_h0, g_h1 = gen.kv_head_range(g_tp)
        # Ordinal of this rank among the gen ranks holding its heads: stages
        # first, then the gen-side copies of a duplicated head. Consecutive
        # ordinals pick different ctx copies of a duplicated head, so its
        # readers spread over min(readers, copies) holders.
        gen_dup = max(1, gen.tp_size // gen.num_kv_heads)
        ordinal = g_stage * gen_dup + g_tp % gen_dup
        items: list[PlanItem] = []
        for c_stage in range(ctx.pp_size):
            c_l0, c_l1 = ctx.layer_range(c_stage)
            l0, l1 = max(g_l0, c_l0), min(g_l1, c_l1)
            if l0 >= l1:
                continue
            # One holder per head (chosen by ordinal); runs of heads from the
            # same holder merge into one item (layers are one range per stage).
            run_rank, run_start = -1, g_h0
            for head in range(g_h0, g_h1 + 1):
                if head < g_h1:
                    holders = _head_holders(ctx, head)
                    tp = holders[ordinal % len(holders)]
                    rank = ctx.rank_of(c_stage, tp)
                else:
                    rank = -2  # sentinel flushes the last run
                if rank != run_rank:
                    if run_rank >= 0:
                        items.append(PlanItem(run_rank, l0, l1, run_start, head))
                    run_rank, run_start = rank, head
        out.append(tuple(items))
    return tuple(out)


def make_plan(ctx: CacheState, gen: CacheState) -> dict[int, list[PlanItem]]:
    """For every generation rank, the items that cover each (layer, KV head) it holds once.

    Refuses incompatible layouts first. Cached; each call returns fresh lists,
    so callers may mutate the result without corrupting the cache.
    """
    check_compatible(ctx, gen)
    return {rank: list(items) for rank, items in enumerate(_plan(ctx, gen))}


def plan_bytes(item: PlanItem, head_dim: int, itemsize: int, num_tokens: int) -> int:
    """Bytes of K and V that `item` moves for `num_tokens` tokens."""
    return item.num_layers * 2 * item.num_heads * num_tokens * head_dim * itemsize


def senders_for(plan: dict[int, list[PlanItem]]) -> dict[int, list[tuple[int, PlanItem]]]:
    """Inverse view for the context side: for each ctx rank, (gen_rank, item) it must serve.

    Context ranks that serve nothing (unused copies of a duplicated head) are absent.
    """
    out: dict[int, list[tuple[int, PlanItem]]] = {}
    for gen_rank in sorted(plan):
        for item in plan[gen_rank]:
            out.setdefault(item.ctx_rank, []).append((gen_rank, item))
    return dict(sorted(out.items()))


def map_blocks(num_tokens: int, ctx_block_size: int,
               gen_block_size: int) -> list[tuple[int, int, int, int, int]]:
    """Token runs `(ctx_block_idx, ctx_offset, gen_block_idx, gen_offset, length)` to copy.

    Indices are positions in each side's block table (not physical block
    ids). Each run is the longest stretch that stays inside one block on both
    sides, so equal sizes give one run per block and different sizes split at
    every boundary of either side.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} is not valid; allowed: >= 0")
    if not block_size_convertible(ctx_block_size, gen_block_size):
        raise LayoutMismatchError(f"block_size not convertible (context {ctx_block_size}, "
                                  f"generation {gen_block_size})")
    runs: list[tuple[int, int, int, int, int]] = []
    t = 0
    while t < num_tokens:
        c_blk, c_off = divmod(t, ctx_block_size)
        g_blk, g_off = divmod(t, gen_block_size)
        length = min(ctx_block_size - c_off, gen_block_size - g_off, num_tokens - t)
        runs.append((c_blk, c_off, g_blk, g_off, length))
        t += length
    return runs

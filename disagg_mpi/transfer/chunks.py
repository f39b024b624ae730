"""How a transfer is cut into messages, and the block copies on either side: pure helpers.

A pull moves a request's blocks for one plan item. Zero-copy (both sides hold
exactly the item's slice, same block size): runs of blocks contiguous in both
pools go as one message each, at most `buffer_bytes` long. Otherwise chunks of
whole blocks are packed into bounded buffers, `WINDOW` chunks in flight sharing
`buffer_bytes`. Both sides compute the same cuts, so nothing but the bounds of
zero-copy runs (which only the generation side knows) crosses the wire.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from ..api import CacheTransceiverConfig
from .cache_state import CacheState
from .plan import PlanItem

WINDOW = 2  # chunks in flight per transfer: double buffering


@dataclass
class Chunking:
    zero_copy: bool
    blocks_per_chunk: int
    num_ctx_blocks: int
    bounds: list[int] | None = None  # explicit chunk starts + end (zero-copy runs)
    _chunks: list[tuple[int, int]] | None = field(default=None, repr=False)

    def chunks(self) -> list[tuple[int, int]]:
        """(first, end) ctx-block-table positions of each chunk; computed once (poll calls it often)."""
        if self._chunks is None:
            if self.bounds is not None:
                b = self.bounds
                self._chunks = [(b[i], b[i + 1]) for i in range(len(b) - 1)]
            else:
                k = self.blocks_per_chunk
                self._chunks = [(i, min(i + k, self.num_ctx_blocks)) for i in range(0, self.num_ctx_blocks, k)]
        return self._chunks


def block_runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """Split block ids into runs of consecutive ids: (position, first id, length)."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            out.append((start, ids[start], i - start))
            start = i
    return out


MAX_RUNS = 16  # more runs than this: one index_select / index_copy_ instead of a copy per run


def device_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    """Ids (block ids, row indices) as an int64 tensor on `device`, without waiting for the current
    stream.

    `torch.tensor(ids, device=cuda)` copies from pageable memory and so synchronises the current
    stream; a transfer's side stream may hold GPU-side waits on another process (the shared
    ring), and the rank's loop would stop until that process's copies land; a decode step would
    wait for the step queued behind it (model_runner.py)."""
    t = torch.tensor(ids, dtype=torch.int64)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def gather_blocks(src: torch.Tensor, ids: list[int], out: torch.Tensor) -> None:
    """out[i] = src[ids[i]] along dim 0."""
    runs = block_runs(ids)
    if len(runs) > MAX_RUNS:
        torch.index_select(src, 0, device_ids(ids, src.device), out=out)
        return
    for pos, first, n in runs:
        out.narrow(0, pos, n).copy_(src.narrow(0, first, n))


def scatter_blocks(dst: torch.Tensor, ids: list[int], src: torch.Tensor) -> None:
    """dst[ids[i]] = src[i] along dim 0 (dst may be a strided view of the pool)."""
    runs = block_runs(ids)
    if len(runs) > MAX_RUNS:
        dst.index_copy_(0, device_ids(ids, dst.device), src)
        return
    for pos, first, n in runs:
        dst.narrow(0, first, n).copy_(src.narrow(0, pos, n))


def scatter_chunk(view: torch.Tensor, blocks: list[int], buf: torch.Tensor, first_ctx_block: int,
                  ctx_block_size: int, block_size: int, num_tokens: int) -> None:
    """Land a chunk of context blocks (`buf`, starting at the request's block `first_ctx_block`)
    in our blocks `blocks` of `view` (the pool's slice), whatever the two block sizes."""
    bs, cbs = block_size, ctx_block_size
    if bs == cbs:
        scatter_blocks(view, blocks[first_ctx_block: first_ctx_block + buf.shape[0]], buf)
        return
    # Different block sizes: move every token (tokens sit on dim 4 of a block) in one
    # indexed copy: source (chunk block, offset) -> destination (our block id, offset).
    tok0 = first_ctx_block * cbs
    ntok = min(buf.shape[0] * cbs, num_tokens - tok0)
    dev = view.device
    t = torch.arange(ntok, device=dev)
    g = t + tok0
    dst_blk = device_ids(blocks, dev)[g // bs]
    view[dst_blk, :, :, :, g % bs] = buf[t // cbs, :, :, :, t % cbs]


def is_contiguous_run(ids: list[int], lo: int, hi: int) -> bool:
    """Whether ids[lo:hi] are consecutive block ids (one slice of the pool)."""
    first = ids[lo]
    return all(ids[i] == first + (i - lo) for i in range(lo + 1, hi))


_IDS: list[int] = list(range(4096))  # 0, 1, 2, ...: slices of it are the runs to compare with


def is_run(ids: list[int] | tuple[int, ...], n: int) -> bool:
    """Whether ids[:n] are n consecutive block ids. Compares with a slice of a prebuilt list:
    ~4x faster than building list(range(...)) (new int objects) at a thousand ids."""
    global _IDS
    first = ids[0]
    if first < 0 or ids[n - 1] - first != n - 1:
        return False
    if first + n > len(_IDS):
        _IDS = list(range(max(first + n, 2 * len(_IDS))))
    head = ids[:n] if isinstance(ids, list) else list(ids[:n])
    return head == _IDS[first:first + n]


def zero_copy_bounds(ctx_ids: list[int], gen_ids: list[int], max_run: int) -> list[int]:
    """Chunk starts (+ end) so that each chunk is a run contiguous in both pools, <= max_run blocks.

    Vectorized: a 1 GiB pull has thousands of block ids and this runs on the pull's critical path."""
    n = len(ctx_ids)
    if n <= 1:
        return [0, n]
    if is_run(ctx_ids, n) and is_run(gen_ids, n):
        return [*range(0, n, max_run), n]  # one run in both pools (the usual case): no numpy
    c, g = np.asarray(ctx_ids, dtype=np.int64), np.asarray(gen_ids[:n], dtype=np.int64)
    starts = np.flatnonzero((np.diff(c) != 1) | (np.diff(g) != 1)) + 1
    edges = np.concatenate(([0], starts, [n]))
    if max_run < n and bool((np.diff(edges) > max_run).any()):  # split runs longer than max_run
        edges = np.concatenate([np.arange(a, b, max_run) for a, b in itertools.pairwise(edges)] + [[n]])
    return edges.tolist()


def chunking_for(item: PlanItem, ctx: CacheState, gen: CacheState, gen_rank: int, num_tokens: int,
              cfg: CacheTransceiverConfig, ctx_ids: list[int] | None = None,
              gen_ids: list[int] | None = None, staged: bool = False, window: int = WINDOW) -> Chunking:
    """How the item is cut. `window`: chunks in flight (and buffers/slots they share)."""
    c_stage, _ = ctx.coords(item.ctx_rank)
    g_stage, _ = gen.coords(gen_rank)
    whole_ctx = (item.num_layers == ctx.layer_split[c_stage]
                 and item.num_heads == ctx.local_kv_heads)
    whole_gen = (item.num_layers == gen.layer_split[g_stage]
                 and item.num_heads == gen.local_kv_heads)
    nblocks = -(-num_tokens // ctx.block_size)
    zero_copy = cfg.zero_copy and whole_ctx and whole_gen and ctx.block_size == gen.block_size
    block_bytes = item.num_layers * 2 * item.num_heads * ctx.block_size * ctx.head_dim * ctx.itemsize
    if zero_copy:
        # No buffer: a chunk is a run of blocks contiguous on both sides, capped at buffer_bytes
        # (staged through pinned host memory: each run has its own staging buffer, two in flight).
        max_run = max(1, cfg.buffer_bytes // ((window if staged else 1) * max(1, block_bytes)))
        bounds = (zero_copy_bounds(list(ctx_ids[:nblocks]), list(gen_ids[:nblocks]), max_run)
                  if ctx_ids is not None and gen_ids is not None and nblocks > 0 else None)
        return Chunking(True, 1, nblocks, bounds)
    # Copy path: `window` chunks in flight share buffer_bytes.
    per_chunk = max(1, cfg.buffer_bytes // (window * max(1, block_bytes)))
    return Chunking(False, per_chunk, nblocks)

"""This rank's KV pool as the byte paths see it: where a chunk comes from, where one lands,
and the chunk buffers that packing and scattering go through (see transceiver.py).

Chunk buffers are allocated once per transfer and reused, and contiguous block runs are
packed / scattered with plain copies (no index gathers).
"""

from __future__ import annotations

import torch

from .cache_state import CacheState
from .chunks import gather_blocks, is_contiguous_run, scatter_chunk
from .records import RecvItem, RecvJob, SendJob
from .staging import SideStream

KEEP_BUFFERS = 4  # chunk buffers a transceiver keeps for its next transfers


class PoolIO:
    """Packs chunks out of `pool` and lands chunks in it; `state` is this rank's executor layout.

    `async_buffer` (CUDA pools): each transfer allocates its chunk buffers on `side`, else
    buffers live on across transfers."""

    def __init__(self, pool: torch.Tensor, state: CacheState, side: SideStream | None, async_buffer: bool):
        self.pool = pool
        self.state = state
        self._side = side
        self._async_buffers = pool.is_cuda and async_buffer
        # Chunk buffers kept across transfers (a fresh big buffer costs its page faults every
        # time); at most KEEP_BUFFERS, oldest dropped first.
        self._spare: list[torch.Tensor] = []

    def buffer(self, free: list, shape: tuple[int, ...]) -> torch.Tensor:
        if free:
            return free.pop()
        if self._async_buffers:
            # async_buffer: each transfer allocates its chunk buffers on the side stream
            # (stream-ordered allocator: reused in stream order, returned when the transfer ends).
            with self._side:
                return torch.empty(shape, dtype=self.pool.dtype, device=self.pool.device)
        # Plain allocation: buffers live on across transfers (allocated once, reused).
        for i, b in enumerate(self._spare):
            if tuple(b.shape) == shape:
                return self._spare.pop(i)
        return torch.empty(shape, dtype=self.pool.dtype, device=self.pool.device)

    def keep(self, bufs: list) -> None:
        """A finished transfer hands its chunk buffers back (kept, unless async_buffer)."""
        if not self._async_buffers:
            self._spare.extend(bufs)
        bufs.clear()
        del self._spare[:-KEEP_BUFFERS]

    def clear(self) -> None:
        self._spare.clear()

    # ---- context side -----------------------------------------------------

    def send_source(self, job: SendJob, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chunk as a contiguous tensor on the pool's device: a pool run, or packed into a buffer."""
        if job.chunking.zero_copy:
            if job.chunking.bounds is None:
                return self.pool[job.blocks[lo]], None
            return self.pool.narrow(0, job.blocks[lo], hi - lo), None  # contiguous (the receiver checked)
        if job.direct and is_contiguous_run(job.blocks, lo, hi):  # our blocks are the packed layout
            return self.pool.narrow(0, job.blocks[lo], hi - lo), None
        layers, heads = job.slices
        view = self.pool[:, layers, :, heads]
        full = self.buffer(job.free_bufs, (job.chunking.blocks_per_chunk, *view.shape[1:]))
        buf = full.narrow(0, 0, hi - lo)
        gather_blocks(view, job.blocks[lo:hi], buf)
        return buf, full

    # ---- generation side ----------------------------------------------------

    def chunk_dest(self, job: RecvJob, ri: RecvItem, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where chunk [lo, hi) lands: (our blocks, None) when it is a run of them in their layout,
        else (a view of a chunk buffer, the buffer), scattered afterwards."""
        if ri.chunking.zero_copy:  # straight into our blocks (a contiguous run)
            if ri.chunking.bounds is None:
                return self.pool[job.blocks[lo]], None
            return self.pool.narrow(0, job.blocks[lo], hi - lo), None
        if ri.direct and is_contiguous_run(job.blocks, lo, hi):  # packed layout == our blocks' layout
            return self.pool.narrow(0, job.blocks[lo], hi - lo), None
        it = ri.item
        full = self.buffer(ri.free_bufs, (ri.chunking.blocks_per_chunk, it.num_layers, 2, it.num_heads,
                                          job.opaque.cache_state.block_size, self.state.head_dim))
        return full.narrow(0, 0, hi - lo), full

    def scatter(self, job: RecvJob, ri: RecvItem, buf: torch.Tensor, first_ctx_block: int) -> None:
        layers, heads = ri.slices
        scatter_chunk(self.pool[:, layers, :, heads], job.blocks, buf, first_ctx_block,
                      job.opaque.cache_state.block_size, self.state.block_size, job.opaque.num_tokens)

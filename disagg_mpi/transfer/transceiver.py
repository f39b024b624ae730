"""Moves KV blocks between ranks over MPI (host memory): the pull protocol.

Worker side of the connector (vLLM's split): it only moves bytes. The engine
decides *what* to pull and *when* to free; this file progresses non-blocking
sends and receives each time the rank's loop calls `poll()`, so neither side
ever blocks its step loop on a peer.

Protocol, per (generation rank, plan item):
1. the generation rank sends a `pull` message (tag PULL) to the context rank
   named by the item: context block ids, token count, the item's global
   layer/head ranges, its own block size, a reply tag and the chunking;
2. the context rank packs the blocks for that peer into a bounded buffer
   (at most two chunks in flight, both together at most `buffer_bytes`) and
   `Isend`s chunk after chunk on the reply tag, or, when both sides hold
   exactly the same slice and block size (zero-copy), sends runs of blocks
   that are contiguous on both sides straight from its pool (the pull message
   then lists the chunk bounds, as only the generation side knows its block
   ids; a run is at most `buffer_bytes` long);
3. the generation rank receives chunks (at most two posted ahead) and scatters
   them into its own blocks (zero-copy: receives straight into them); when
   every item is in, `poll()` reports the request as done on this rank.

Chunk buffers are allocated once per transfer and reused, and contiguous
block runs are packed / scattered with plain copies (no index gathers).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from ..api import CacheTransceiverConfig
from .cache_state import CacheState
from .opaque import OpaqueState
from .plan import PlanItem, local_slices, make_plan

TAG_PULL = 1
_FIRST_DATA_TAG = 100
_WINDOW = 2  # chunks in flight per transfer: double buffering
_KEEP_BUFFERS = 4  # chunk buffers a transceiver keeps for its next transfers


def _np(t: torch.Tensor) -> Any:
    """A numpy view MPI can move (bf16 has no MPI datatype: send its bytes)."""
    return t.view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy()


@dataclass
class _Chunking:
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


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """Split block ids into runs of consecutive ids: (position, first id, length)."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            out.append((start, ids[start], i - start))
            start = i
    return out


_MAX_RUNS = 16  # more runs than this: one index_select / index_copy_ instead of a copy per run


def _gather(src: torch.Tensor, ids: list[int], out: torch.Tensor) -> None:
    """out[i] = src[ids[i]] along dim 0."""
    runs = _runs(ids)
    if len(runs) > _MAX_RUNS:
        torch.index_select(src, 0, torch.tensor(ids), out=out)
        return
    for pos, first, n in runs:
        out.narrow(0, pos, n).copy_(src.narrow(0, first, n))


def _scatter_blocks(dst: torch.Tensor, ids: list[int], src: torch.Tensor) -> None:
    """dst[ids[i]] = src[i] along dim 0 (dst may be a strided view of the pool)."""
    runs = _runs(ids)
    if len(runs) > _MAX_RUNS:
        dst.index_copy_(0, torch.tensor(ids), src)
        return
    for pos, first, n in runs:
        dst.narrow(0, first, n).copy_(src.narrow(0, pos, n))


def _contiguous(ids: list[int], lo: int, hi: int) -> bool:
    """Whether ids[lo:hi] are consecutive block ids (one slice of the pool)."""
    first = ids[lo]
    return all(ids[i] == first + (i - lo) for i in range(lo + 1, hi))


def _zero_copy_bounds(ctx_ids: list[int], gen_ids: list[int], max_run: int) -> list[int]:
    """Chunk starts (+ end) so that each chunk is a run contiguous in both pools, <= max_run blocks."""
    bounds = [0]
    for i in range(1, len(ctx_ids)):
        if (i - bounds[-1] >= max_run or ctx_ids[i] != ctx_ids[i - 1] + 1
                or gen_ids[i] != gen_ids[i - 1] + 1):
            bounds.append(i)
    bounds.append(len(ctx_ids))
    return bounds


def _chunking(item: PlanItem, ctx: CacheState, gen: CacheState, gen_rank: int, num_tokens: int,
              cfg: CacheTransceiverConfig, ctx_ids: list[int] | None = None,
              gen_ids: list[int] | None = None) -> _Chunking:
    c_stage, c_tp = ctx.coords(item.ctx_rank)
    g_stage, g_tp = gen.coords(gen_rank)
    whole_ctx = (item.num_layers == ctx.layer_split[c_stage]
                 and item.num_heads == ctx.local_kv_heads)
    whole_gen = (item.num_layers == gen.layer_split[g_stage]
                 and item.num_heads == gen.local_kv_heads)
    nblocks = -(-num_tokens // ctx.block_size)
    zero_copy = cfg.zero_copy and whole_ctx and whole_gen and ctx.block_size == gen.block_size
    block_bytes = item.num_layers * 2 * item.num_heads * ctx.block_size * ctx.head_dim * ctx.itemsize
    if zero_copy:
        # No buffer: a chunk is a run of blocks contiguous on both sides, capped at buffer_bytes.
        max_run = max(1, cfg.buffer_bytes // max(1, block_bytes))
        bounds = (_zero_copy_bounds(list(ctx_ids[:nblocks]), list(gen_ids[:nblocks]), max_run)
                  if ctx_ids is not None and gen_ids is not None and nblocks > 0 else None)
        return _Chunking(True, 1, nblocks, bounds)
    # Copy path: _WINDOW chunks in flight share buffer_bytes.
    per_chunk = max(1, cfg.buffer_bytes // (_WINDOW * max(1, block_bytes)))
    return _Chunking(False, per_chunk, nblocks)


@dataclass
class _SendJob:
    dest: int
    tag: int
    blocks: list[int]
    slices: tuple[slice, slice]  # ctx-local layers, heads
    chunking: _Chunking
    next_chunk: int = 0
    inflight: deque = field(default_factory=deque)  # (mpi request, buffer, buffer to reuse or None)
    free_bufs: list = field(default_factory=list)  # reusable chunk buffers (copy path)
    direct: bool = False  # copy path, but the item is our whole slice: contiguous runs skip the pack
    bytes: int = 0


@dataclass
class _RecvItem:
    item: PlanItem
    source: int
    tag: int
    chunking: _Chunking
    slices: tuple[slice, slice]  # gen-local layers, heads
    next_post: int = 0
    next_done: int = 0
    posted: deque = field(default_factory=deque)  # (mpi request, buffer, chunk index, buffer to reuse)
    free_bufs: list = field(default_factory=list)  # reusable chunk buffers (copy path)
    direct: bool = False  # copy path, but same block size and our whole slice: contiguous runs land in place
    started: bool = False

    @property
    def done(self) -> bool:
        return self.next_done == len(self.chunking.chunks())


@dataclass
class _RecvJob:
    req_id: int
    blocks: list[int]  # this rank's blocks for the request
    ctx_block_size: int
    num_tokens: int
    items: list[_RecvItem]
    t0: float = field(default_factory=time.perf_counter)
    bytes: int = 0


class KvTransceiver:
    """One per rank. `pool` is this rank's KV pool; `state` its executor's layout."""

    def __init__(self, comm: Any, pool: torch.Tensor, state: CacheState, local_rank: int,
                 cfg: CacheTransceiverConfig):
        self.comm = comm
        self.pool = pool
        self.state = state
        self.local_rank = local_rank
        self.cfg = cfg
        self._tag_ub = min(int(comm.Get_attr(_mpi().TAG_UB) or 32767), 1 << 30)
        self._next_tag = _FIRST_DATA_TAG
        self._send_queue: deque[_SendJob] = deque()
        self._sending: list[_SendJob] = []
        self._recv: dict[int, _RecvJob] = {}
        self.sent_bytes = 0
        # Chunk buffers kept across transfers (a fresh big buffer costs its page faults every
        # time); at most _KEEP_BUFFERS, oldest dropped first.
        self._spare: list[torch.Tensor] = []

    def _buffer(self, free: list, shape: tuple[int, ...]) -> torch.Tensor:
        if free:
            return free.pop()
        for i, b in enumerate(self._spare):
            if tuple(b.shape) == shape:
                return self._spare.pop(i)
        return torch.empty(shape, dtype=self.pool.dtype)

    def _keep(self, bufs: list) -> None:
        """A finished transfer hands its chunk buffers back."""
        self._spare.extend(bufs)
        bufs.clear()
        del self._spare[:-_KEEP_BUFFERS]

    # ---- generation side -------------------------------------------------

    def start_pull(self, req_id: int, opaque: OpaqueState, my_blocks: list[int]) -> None:
        """Ask the context ranks for this rank's share of a request's KV."""
        ctx = opaque.cache_state
        plan = make_plan(ctx, self.state)[self.local_rank]
        items = []
        for it in plan:
            sl = local_slices(it, ctx, self.state, self.local_rank)
            ri = _RecvItem(it, opaque.world_ranks[it.ctx_rank], self._alloc_tag(),
                           _chunking(it, ctx, self.state, self.local_rank, opaque.num_tokens,
                                     self.cfg, list(opaque.block_ids), list(my_blocks)),
                           (sl.gen_layers, sl.gen_heads))
            ri.direct = (self.cfg.zero_copy and ctx.block_size == self.state.block_size
                         and it.num_layers == self.pool.shape[1] and it.num_heads == self.pool.shape[3])
            items.append(ri)
        job = _RecvJob(req_id, list(my_blocks), ctx.block_size, opaque.num_tokens, items)
        self._recv[req_id] = job
        for ri in items if self.cfg.parallel_receive else items[:1]:
            self._request(job, ri, opaque)
        job.opaque = opaque  # type: ignore[attr-defined] - kept for sequential receive

    def _request(self, job: _RecvJob, ri: _RecvItem, opaque: OpaqueState) -> None:
        it = ri.item
        msg = {"tag": ri.tag, "blocks": list(opaque.block_ids[: ri.chunking.num_ctx_blocks]),
               "layers": [it.layer_start, it.layer_end], "heads": [it.head_start, it.head_end],
               "zero_copy": ri.chunking.zero_copy, "per_chunk": ri.chunking.blocks_per_chunk,
               "cache_state": opaque.cache_state.to_dict()}
        if ri.chunking.bounds is not None:
            msg["bounds"] = ri.chunking.bounds
        self.comm.send(msgpack.packb(msg), dest=ri.source, tag=TAG_PULL)
        ri.started = True
        self._post_recvs(job, ri)

    def _post_recvs(self, job: _RecvJob, ri: _RecvItem) -> None:
        chunks = ri.chunking.chunks()
        while ri.next_post < len(chunks) and len(ri.posted) < _WINDOW:
            lo, hi = chunks[ri.next_post]
            if ri.chunking.zero_copy:  # receive straight into our blocks (a contiguous run)
                if ri.chunking.bounds is None:
                    buf = self.pool[job.blocks[lo]]
                else:
                    buf = self.pool.narrow(0, job.blocks[lo], hi - lo)
                full = None
            elif ri.direct and _contiguous(job.blocks, lo, hi):  # packed layout == our blocks' layout
                buf, full = self.pool.narrow(0, job.blocks[lo], hi - lo), None
            else:
                it = ri.item
                full = self._buffer(ri.free_bufs, (ri.chunking.blocks_per_chunk, it.num_layers, 2, it.num_heads,
                                                   job.ctx_block_size, self.state.head_dim))
                buf = full.narrow(0, 0, hi - lo)
            req = self.comm.Irecv(_np(buf), source=ri.source, tag=ri.tag)
            ri.posted.append((req, buf, ri.next_post, full))
            ri.next_post += 1

    def _progress_recv(self, job: _RecvJob) -> bool:
        for idx, ri in enumerate(job.items):
            if not ri.started:
                if all(r.done for r in job.items[:idx]):
                    self._request(job, ri, job.opaque)  # type: ignore[attr-defined]
                else:
                    continue
            while ri.posted and ri.posted[0][0].Test():
                _, buf, ci, full = ri.posted.popleft()
                lo, _ = ri.chunking.chunks()[ci]
                if full is not None:  # landed in a chunk buffer: scatter it into our blocks
                    self._scatter(job, ri, buf, lo)
                    ri.free_bufs.append(full)
                job.bytes += buf.numel() * buf.element_size()
                ri.next_done += 1
                self._post_recvs(job, ri)
                if ri.done:
                    self._keep(ri.free_bufs)
        return all(ri.done for ri in job.items)

    def _scatter(self, job: _RecvJob, ri: _RecvItem, buf: torch.Tensor, first_ctx_block: int) -> None:
        layers, heads = ri.slices
        bs, cbs = self.state.block_size, job.ctx_block_size
        view = self.pool[:, layers, :, heads]
        if bs == cbs:
            _scatter_blocks(view, job.blocks[first_ctx_block: first_ctx_block + buf.shape[0]], buf)
            return
        # Different block sizes: move every token (tokens sit on dim 4 of a block) in one
        # indexed copy: source (chunk block, offset) -> destination (our block id, offset).
        tok0 = first_ctx_block * cbs
        ntok = min(buf.shape[0] * cbs, job.num_tokens - tok0)
        t = torch.arange(ntok)
        g = t + tok0
        dst_blk = torch.tensor(job.blocks, dtype=torch.int64)[g // bs]
        view[dst_blk, :, :, :, g % bs] = buf[t // cbs, :, :, :, t % cbs]

    # ---- context side ----------------------------------------------------

    def _accept_pulls(self) -> None:
        mpi = _mpi()
        status = mpi.Status()
        while self.comm.Iprobe(source=mpi.ANY_SOURCE, tag=TAG_PULL, status=status):
            src = status.Get_source()
            msg = msgpack.unpackb(self.comm.recv(source=src, tag=TAG_PULL))
            ctx = self.state
            c_stage, c_tp = ctx.coords(self.local_rank)
            l0 = ctx.layer_range(c_stage)[0]
            h0 = ctx.kv_head_range(c_tp)[0]
            layers = slice(msg["layers"][0] - l0, msg["layers"][1] - l0)
            heads = slice(msg["heads"][0] - h0, msg["heads"][1] - h0)
            chunking = _Chunking(msg["zero_copy"], msg["per_chunk"], len(msg["blocks"]), msg.get("bounds"))
            job = _SendJob(src, msg["tag"], msg["blocks"], (layers, heads), chunking)
            job.direct = (self.cfg.zero_copy and layers.stop - layers.start == self.pool.shape[1]
                          and heads.stop - heads.start == self.pool.shape[3])
            self._send_queue.append(job)

    def _progress_send(self, job: _SendJob) -> bool:
        while job.inflight and job.inflight[0][0].Test():
            _, _, full = job.inflight.popleft()
            if full is not None:
                job.free_bufs.append(full)
        chunks = job.chunking.chunks()
        while job.next_chunk < len(chunks) and len(job.inflight) < _WINDOW:
            lo, hi = chunks[job.next_chunk]
            if job.chunking.zero_copy:
                if job.chunking.bounds is None:
                    buf = self.pool[job.blocks[lo]]
                else:  # a run contiguous in our pool (the receiver checked)
                    buf = self.pool.narrow(0, job.blocks[lo], hi - lo)
                full = None
            elif job.direct and _contiguous(job.blocks, lo, hi):  # our blocks are the packed layout
                buf, full = self.pool.narrow(0, job.blocks[lo], hi - lo), None
            else:
                layers, heads = job.slices
                view = self.pool[:, layers, :, heads]
                full = self._buffer(job.free_bufs, (job.chunking.blocks_per_chunk, *view.shape[1:]))
                buf = full.narrow(0, 0, hi - lo)
                _gather(view, job.blocks[lo:hi], buf)
            job.inflight.append((self.comm.Isend(_np(buf), dest=job.dest, tag=job.tag), buf, full))
            job.bytes += buf.numel() * buf.element_size()
            job.next_chunk += 1
        done = job.next_chunk == len(chunks) and not job.inflight
        if done:
            self.sent_bytes += job.bytes
            self._keep(job.free_bufs)
        return done

    # ---- both ------------------------------------------------------------

    def poll(self) -> list[tuple[int, int, float]]:
        """Progress everything; returns (req_id, bytes, seconds) of receives finished here."""
        self._accept_pulls()
        limit = self.cfg.send_concurrency if self.cfg.parallel_send else 1
        while self._send_queue and len(self._sending) < limit:
            self._sending.append(self._send_queue.popleft())
        self._sending = [j for j in self._sending if not self._progress_send(j)]
        finished = []
        for req_id, job in list(self._recv.items()):
            if self._progress_recv(job):
                del self._recv[req_id]
                finished.append((req_id, job.bytes, time.perf_counter() - job.t0))
        return finished

    @property
    def busy(self) -> bool:
        return bool(self._recv or self._sending or self._send_queue)

    @property
    def receiving(self) -> bool:
        return bool(self._recv)

    def cancel_receive(self, req_id: int) -> None:
        """Forget a receive (its request was cancelled); posted receives are cancelled."""
        job = self._recv.pop(req_id, None)
        if job is None:
            return
        for ri in job.items:
            for req, *_ in ri.posted:
                req.Cancel()
                req.Wait()

    def _alloc_tag(self) -> int:
        tag = self._next_tag
        self._next_tag = tag + 1 if tag + 1 < self._tag_ub else _FIRST_DATA_TAG
        return tag


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI

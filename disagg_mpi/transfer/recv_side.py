"""The generation side of the pull protocol: pull, receive, land (see transceiver.py).

A mixin of `KvTransceiver`: it reads the transceiver's pool, layout, side
stream, buffers and MPI communicator. `start_pull` makes one `_RecvItem` per
plan item and, per item, either copies from the context rank's mapped pool at
once (one-sided CUDA IPC: the pool was mapped by an earlier pull), or sends a
pull message and then
- maps the pool and copies (the context rank answered with its IPC handle),
- copies chunks out of the shared ring it lent (answer "ring": every chunk's
  H2D queued at once, behind a GPU-side wait for its slot), or
- receives chunks over MPI (host memory, pinned staging, CUDA-aware MPI)
and lands each in its blocks (H2D / scatter on the side stream for GPU pools).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..protocol import KV_PULL, PullAnswer, PullAsk, PullDone, PullPath, decode, encode
from . import shared_staging, stream_ops
from .block_copy import PoolPair
from .cache_state import CacheState
from .chunks import WINDOW, Chunking, chunking_for, gather_blocks, is_contiguous_run, scatter_chunk
from .opaque import OpaqueState
from .plan import PlanItem, local_slices, make_plan
from .staging import mpi_device_buffer, mpi_host_buffer, typed_view

log = logging.getLogger(__name__)
_np = mpi_host_buffer  # a numpy view MPI can move (bf16 has no MPI datatype: send its bytes)


@dataclass
class _In:
    """One chunk on its way in: `req` lands in `dst` (host path / CUDA-aware) or in `host` (staged),
    then (GPU) an H2D copy and/or a scatter run on the side stream until `event`."""

    req: Any
    dst: torch.Tensor  # our blocks (a contiguous run) or a chunk buffer, on the pool's device
    chunk: int
    full: torch.Tensor | None = None
    pinned: torch.Tensor | None = None
    host: torch.Tensor | None = None
    event: Any = None
    landed: bool = False


@dataclass
class _RecvItem:
    item: PlanItem
    source: int
    tag: int
    chunking: Chunking
    slices: tuple[slice, slice]  # gen-local layers, heads
    next_post: int = 0
    next_done: int = 0
    posted: deque = field(default_factory=deque)  # _In, in chunk order
    free_bufs: list = field(default_factory=list)  # reusable chunk buffers (copy path)
    direct: bool = False  # copy path, but same block size and our whole slice: contiguous runs land in place
    started: bool = False
    hdr_req: Any = None  # asked for CUDA IPC or a shared ring: receive of the context rank's answer
    ipc_event: Any = None  # IPC copies queued on the side stream; "done" goes back once complete
    queued_bytes: int = 0  # IPC or ring: bytes of the copies queued on the side stream
    ipc_t0: float = 0.0
    ipc_done: bool = False
    one_sided: bool = False  # IPC from an already mapped pool: no messages at all
    ring: Any = None  # shared_staging.Ring (ours for that context rank) this item goes through
    ring_seq: int = 0  # the item's first chunk number in the ring
    ring_answered: bool = False  # the context rank answered "ring"; H2Ds not queued yet
    landing: Any = None  # ring: event after the last chunk's H2D (all queued at once)

    @property
    def done(self) -> bool:
        if self.ipc_done or self.ipc_event is not None:  # an IPC item (no chunks)
            return self.ipc_done
        return self.next_done == len(self.chunking.chunks())


@dataclass
class _RecvJob:
    req_id: int
    blocks: list[int]  # this rank's blocks for the request
    opaque: OpaqueState  # where the KV is (items are asked for one after another)
    items: list[_RecvItem]
    t0: float = field(default_factory=time.perf_counter)
    bytes: int = 0


class RecvSide:
    """Generation-side methods of KvTransceiver."""

    def start_pull(self, req_id: int, opaque: OpaqueState, my_blocks: list[int]) -> None:
        """Ask the context ranks for this rank's share of a request's KV (or copy it at once: IPC).

        Ordered for latency: a one-sided IPC item's copy is queued first, and the bookkeeping
        (the job, the item, the completion event) runs while the GPU copies."""
        t0 = time.perf_counter()
        ctx = opaque.cache_state
        if self._side is not None:  # our new blocks may still be read by queued steps of their last owner
            self._side.after_compute()
        items = self._plan_items(ctx)
        job = None
        for it, slices, direct, whole in items:
            source = opaque.world_ranks[it.ctx_rank]
            one_sided = self.want_ipc and source in self._ipc_peers
            if one_sided and whole and (self.cfg.parallel_receive or job is None):
                # The common case, on the critical path: whole blocks from a mapped pool. Queue the
                # copy before making any bookkeeping, the job's included (measured: ~15 us earlier).
                nblk = -(-opaque.num_tokens // ctx.block_size)
                nbytes = self._ipc_copy_whole(my_blocks, opaque.block_ids, source, self._ipc_peers[source], nblk)
                job = job or self._new_job(req_id, opaque, my_blocks, t0)
                ri = _RecvItem(it, source, 0, Chunking(True, 1, nblk), slices, one_sided=True, direct=direct,
                               started=True, queued_bytes=nbytes, ipc_event=self._side.record(),
                               ipc_t0=time.perf_counter())
                self.ipc_one_sided += 1
                job.items.append(ri)
                continue
            job = job or self._new_job(req_id, opaque, my_blocks, t0)
            ring = (self.mode == "staged" and not self.want_ipc and self._rings is not None
                    and self._rings.may_lend(source))  # else cut for MPI: WINDOW chunks of buffer_bytes
            # One-sided IPC needs no chunk bounds (nothing crosses the wire): skip computing them.
            ids = (None, None) if one_sided else (opaque.block_ids, my_blocks)
            ri = _RecvItem(it, source, self._alloc_tag(),
                           chunking_for(it, ctx, self.state, self.local_rank, opaque.num_tokens,
                                        self.cfg, *ids, staged=self.mode == "staged",
                                        window=shared_staging.SLOTS if ring else WINDOW),
                           slices, one_sided=one_sided, direct=direct)
            job.items.append(ri)
            if self.cfg.parallel_receive or len(job.items) == 1:
                self._start_item(job, ri)
        self._recv[req_id] = job or self._new_job(req_id, opaque, my_blocks, t0)

    def one_sided_ready(self, opaque: OpaqueState) -> bool:
        """Whether a pull of `opaque` is all one-sided: whole blocks over CUDA IPC from context
        pools this rank has mapped, so no context rank takes part (or even answers)."""
        if not self.want_ipc:
            return False
        return all(whole and opaque.world_ranks[it.ctx_rank] in self._ipc_peers
                   for it, _, _, whole in self._plan_items(opaque.cache_state))

    @staticmethod
    def _new_job(req_id: int, opaque: OpaqueState, my_blocks: list[int], t0: float) -> _RecvJob:
        return _RecvJob(req_id, list(my_blocks), opaque, [], t0)

    def _plan_items(self, ctx: CacheState) -> list[tuple[PlanItem, tuple[slice, slice], bool, bool]]:
        """This rank's plan items from a context layout (cached per layout): each with our slices,
        `direct` (the item is our whole slice, same block size) and `whole` (and the context
        rank's whole slice too: blocks move pool to pool, the zero-copy case of chunking_for)."""
        got = self._plans.get(ctx)
        if got is None:
            got = []
            for it in make_plan(ctx, self.state)[self.local_rank]:
                sl = local_slices(it, ctx, self.state, self.local_rank)
                direct = (self.cfg.zero_copy and ctx.block_size == self.state.block_size
                          and it.num_layers == self.pool.shape[1] and it.num_heads == self.pool.shape[3])
                c_stage, _ = ctx.coords(it.ctx_rank)
                whole = (direct and it.num_layers == ctx.layer_split[c_stage]
                         and it.num_heads == ctx.local_kv_heads)
                got.append((it, (sl.gen_layers, sl.gen_heads), direct, whole))
            self._plans[ctx] = got
        return got

    def _start_item(self, job: _RecvJob, ri: _RecvItem) -> None:
        ri.started = True
        if ri.one_sided:
            self.ipc_one_sided += 1
            self._ipc_pull(job, ri, self._ipc_peers[ri.source])
        else:
            self._request(job, ri, job.opaque)

    def _request(self, job: _RecvJob, ri: _RecvItem, opaque: OpaqueState) -> None:
        it = ri.item
        ring = None
        if not self.want_ipc and self.mode == "staged" and self._rings is not None:
            # Slots for the usual chunk (buffer_bytes / SLOTS), or this one if bigger: the ring lasts
            # (a first short pull must not leave it too small for the next ones).
            slot_bytes = max(self._max_chunk_bytes(ri, opaque.cache_state),
                             self.cfg.buffer_bytes // shared_staging.SLOTS)
            ri.ring = self._rings.get(ri.source, slot_bytes, shared_staging.SLOTS)
            if ri.ring is not None:  # the item's chunk numbers in the ring: the next ones
                ri.ring_seq = ri.ring.seq
                ri.ring.seq += len(ri.chunking.chunks())
                ring = {"node": self.node, **ri.ring.describe(), "seq": ri.ring_seq}
        ask = PullAsk(ri.tag, list(opaque.block_ids[: ri.chunking.num_ctx_blocks]), [it.layer_start, it.layer_end],
                      [it.head_start, it.head_end], ri.chunking.zero_copy, ri.chunking.blocks_per_chunk,
                      opaque.cache_state.to_dict(), ri.chunking.bounds, self.node if self.want_ipc else None, ring)
        self._outbox.append(self.comm.isend(encode(ask), dest=ri.source, tag=KV_PULL))
        if self.want_ipc or ring is not None:  # first the context rank's answer: IPC handle, ring, or copy
            ri.hdr_req = self.comm.irecv(bytearray(1 << 16), source=ri.source, tag=ri.tag)
        else:
            self._post_recvs(job, ri)

    @staticmethod
    def _max_chunk_bytes(ri: _RecvItem, ctx: CacheState) -> int:
        it = ri.item
        block = it.num_layers * 2 * it.num_heads * ctx.block_size * ctx.head_dim * ctx.itemsize
        return block * max(hi - lo for lo, hi in ri.chunking.chunks())

    def _chunk_dest(self, job: _RecvJob, ri: _RecvItem, lo: int, hi: int) -> tuple[torch.Tensor, Any]:
        """Where chunk [lo, hi) lands: (our blocks, None) when it is a run of them in their layout,
        else (a view of a chunk buffer, the buffer), scattered afterwards."""
        if ri.chunking.zero_copy:  # straight into our blocks (a contiguous run)
            if ri.chunking.bounds is None:
                return self.pool[job.blocks[lo]], None
            return self.pool.narrow(0, job.blocks[lo], hi - lo), None
        if ri.direct and is_contiguous_run(job.blocks, lo, hi):  # packed layout == our blocks' layout
            return self.pool.narrow(0, job.blocks[lo], hi - lo), None
        it = ri.item
        full = self._buffer(ri.free_bufs, (ri.chunking.blocks_per_chunk, it.num_layers, 2, it.num_heads,
                                           job.opaque.cache_state.block_size, self.state.head_dim))
        return full.narrow(0, 0, hi - lo), full

    def _post_recvs(self, job: _RecvJob, ri: _RecvItem) -> None:
        chunks = ri.chunking.chunks()
        while ri.next_post < len(chunks) and len(ri.posted) < WINDOW:
            lo, hi = chunks[ri.next_post]
            buf, full = self._chunk_dest(job, ri, lo, hi)
            if self.mode == "host":
                entry = _In(self.comm.Irecv(_np(buf), source=ri.source, tag=ri.tag), buf, ri.next_post, full)
            elif self.mode == "cuda_aware":
                entry = _In(self.comm.Irecv(mpi_device_buffer(buf), source=ri.source, tag=ri.tag), buf,
                            ri.next_post, full)
            else:  # staged: MPI lands in pinned host memory, H2D on the side stream afterwards
                pinned = self._pinned.get(buf.numel() * buf.element_size())
                host = typed_view(pinned, buf.dtype, tuple(buf.shape))
                entry = _In(self.comm.Irecv(_np(host), source=ri.source, tag=ri.tag), buf, ri.next_post, full,
                            pinned, host)
            ri.posted.append(entry)
            ri.next_post += 1

    def _land(self, job: _RecvJob, ri: _RecvItem, e: _In) -> None:
        """The chunk's message is in: move it into our blocks (GPU: queued on the side stream)."""
        lo, _ = ri.chunking.chunks()[e.chunk]
        e.landed = True
        if self.mode == "host":
            if e.full is not None:  # landed in a chunk buffer: scatter it into our blocks
                self._scatter(job, ri, e.dst, lo)
            return
        with self._side:
            if e.host is not None:
                e.dst.copy_(e.host, non_blocking=True)
            if e.full is not None:
                self._scatter(job, ri, e.dst, lo)
            e.event = self._side.record()

    def _queue_ring_landing(self, job: _RecvJob, ri: _RecvItem) -> None:
        """The context rank has queued every chunk into our ring, and so have we for the ring's
        earlier items: queue every H2D, each behind a GPU-side wait for its slot's "ready" word,
        each followed by the slot's "free" word."""
        ops, _ = stream_ops.load()
        ring, chunks = ri.ring, ri.chunking.chunks()
        with self._side as stream:
            h = stream.cuda_stream
            for k, (slot, ready_at, free) in enumerate(shared_staging.receiver_steps(ri.ring_seq, len(chunks),
                                                                                  ring.slots)):
                lo, hi = chunks[k]
                buf, full = self._chunk_dest(job, ri, lo, hi)
                ops.wait_geq(h, ring.ready_flag(slot), ready_at)
                ri.queued_bytes += ring.take(slot, buf, stream)
                ops.write(h, ring.free_flag(slot), free)
                if full is not None:
                    self._scatter(job, ri, buf, lo)
                    ri.free_bufs.append(full)  # the next chunk lands in it after this scatter (stream order)
            ri.landing = self._side.record()
        ring.landed = ri.ring_seq + len(chunks)
        ri.ring_answered = False
        self.ring_chunks += len(chunks)

    def _on_header(self, job: _RecvJob, ri: _RecvItem, payload: bytes) -> None:
        hdr = decode(payload)
        if not isinstance(hdr, PullAnswer):
            raise TypeError(f"rank {ri.source} answered a pull with {hdr!r:.120}")
        if hdr.path == PullPath.IPC:
            self._ipc_peers[ri.source] = hdr.ipc
            self._ipc_pull(job, ri, hdr.ipc)
            return
        if hdr.path == PullPath.RING:
            ri.ring_answered = True  # queued in the ring's order (_progress_recv)
            return
        if ri.ring is not None:  # the context rank cannot use our ring (and refuses it from now on)
            self._rings.retire(ri.source, ri.ring)
            self._rings.give_back(ri.ring)
            ri.ring = None
        if hdr.path == PullPath.COPY:
            log.debug("rank %d: no CUDA IPC / shared ring with rank %d (%s); copying over MPI",
                      self.comm.Get_rank(), ri.source, hdr.why)
        self._post_recvs(job, ri)

    def _progress_recv(self, job: _RecvJob) -> bool:
        for idx, ri in enumerate(job.items):
            if not ri.started:
                if all(r.done for r in job.items[:idx]):
                    self._start_item(job, ri)
                else:
                    continue
            if ri.hdr_req is not None:
                got, hdr = ri.hdr_req.test()
                if not got:
                    continue
                ri.hdr_req = None
                self._on_header(job, ri, hdr)
            if ri.ring_answered:
                if ri.ring.landed != ri.ring_seq:  # the ring's earlier items first (shared_staging.py)
                    continue
                self._queue_ring_landing(job, ri)
            if ri.landing is not None:
                if ri.landing.query():
                    self._side.recycle(ri.landing)
                    ri.landing = None
                    self._rings.give_back(ri.ring)
                    ri.ring = None
                    ri.next_done = len(ri.chunking.chunks())
                    job.bytes += ri.queued_bytes
                    self._keep(ri.free_bufs)
                continue
            if ri.ipc_event is not None:
                if ri.ipc_event.query():
                    self._side.recycle(ri.ipc_event)
                    ri.ipc_event = None
                    self.ipc_copy_seconds.append(time.perf_counter() - ri.ipc_t0)
                    del self.ipc_copy_seconds[:-64]
                    if not ri.one_sided:
                        self.comm.send(encode(PullDone()), dest=ri.source, tag=ri.tag)  # the context may free
                    ri.ipc_done = True
                    job.bytes += ri.queued_bytes
                    self._keep(ri.free_bufs)
                continue
            for e in ri.posted:  # land every arrived chunk, in order
                if e.landed:
                    continue
                if not e.req.Test():
                    break
                self._land(job, ri, e)
            while ri.posted and ri.posted[0].landed and (ri.posted[0].event is None or ri.posted[0].event.query()):
                e = ri.posted.popleft()
                if e.full is not None:
                    ri.free_bufs.append(e.full)
                if e.pinned is not None:
                    self._pinned.put(e.pinned)
                job.bytes += e.dst.numel() * e.dst.element_size()
                ri.next_done += 1
                self._post_recvs(job, ri)
                if ri.done:
                    self._keep(ri.free_bufs)
        return all(ri.done for ri in job.items)

    def _ipc_pull(self, job: _RecvJob, ri: _RecvItem, hdr: dict) -> None:
        """Copy the item device to device from the mapped context pool (side stream)."""
        src = self._mapper.tensor(ri.source, hdr)
        ctx = job.opaque.cache_state
        ctx_ids = job.opaque.block_ids
        it = ri.item
        if ri.chunking.zero_copy:  # whole blocks, pool to pool, in one pass, queued on the side stream
            ri.queued_bytes += self._ipc_copy_whole(job.blocks, ctx_ids, ri.source, hdr, ri.chunking.num_ctx_blocks)
            ri.ipc_event = self._side.record()
            ri.ipc_t0 = time.perf_counter()
            return
        with self._side:
            # re-shard / re-block: gather the item's slice, scatter into ours, chunk by chunk
            c_stage, c_tp = ctx.coords(it.ctx_rank)
            l0, h0 = ctx.layer_range(c_stage)[0], ctx.kv_head_range(c_tp)[0]
            view = src[:, it.layer_start - l0: it.layer_end - l0, :, it.head_start - h0: it.head_end - h0]
            full = self._buffer(ri.free_bufs, (ri.chunking.blocks_per_chunk, *view.shape[1:]))
            for lo, hi in ri.chunking.chunks():
                buf = full.narrow(0, 0, hi - lo)
                gather_blocks(view, list(ctx_ids[lo:hi]), buf)
                self._scatter(job, ri, buf, lo)
                ri.queued_bytes += buf.numel() * buf.element_size()
            ri.free_bufs.append(full)  # reused only after ipc_event (then handed to _keep)
            ri.ipc_event = self._side.record()
        ri.ipc_t0 = time.perf_counter()

    def _ipc_copy_whole(self, my_blocks, ctx_ids, source: int, info: dict, nblk: int) -> int:
        """Queue the copy of a request's first `nblk` blocks from `source`'s mapped pool into ours."""
        got = self._ipc_pairs.get(source)
        if got is None or got[0] is not info:  # first pull from it, or it re-exported its pool
            got = (info, PoolPair(self.pool, self._mapper.tensor(source, info), self._side.stream))
            self._ipc_pairs[source] = got
        return got[1].copy(my_blocks, ctx_ids, nblk)

    def _scatter(self, job: _RecvJob, ri: _RecvItem, buf: torch.Tensor, first_ctx_block: int) -> None:
        layers, heads = ri.slices
        scatter_chunk(self.pool[:, layers, :, heads], job.blocks, buf, first_ctx_block,
                      job.opaque.cache_state.block_size, self.state.block_size, job.opaque.num_tokens)

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

CUDA pools (`backend`, see `CacheTransceiverConfig.backend`):
- staged: MPI moves pinned host buffers; D2H before an Isend and H2D + GPU
  scatter after an Irecv run on the transceiver's side stream, chunk by chunk,
  two chunks in flight (`staging.py`);
- cuda_aware_mpi: MPI moves device buffers directly (only where the MPI
  library reports CUDA support; refused otherwise);
- staged, both ranks on one node: the generation rank lends the context rank
  a ring of shared, page-locked staging slots; MPI carries only one-integer
  notices, the bytes cross host memory once (`shared_staging.py`; off with
  `shared_staging: false`);
- ipc: same-node peers: the first pull to a context rank asks for its pool's
  CUDA IPC handle (the answer, a header, comes before any data), the
  generation rank maps the pool once and copies the blocks device to device
  (one pass: `block_copy.py`), then tells the context rank it is done
  (`cuda_ipc.py`). Later pulls from that rank are one-sided: no message at
  all, the generation rank copies from the mapped pool at once; the context
  rank keeps the blocks until the engine's "release" anyway, and the KV is in
  the pool before the context phase answers (its first token was read back
  from the same stream). `auto` uses IPC when both pools are on CUDA on one
  node, else staged.
The wire format of the copy path does not depend on the backend, so a CPU
rank and a GPU rank (or a staged and a CUDA-aware one) talk to each other.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch

from ..api import CacheTransceiverConfig
from . import cuda_ipc, shared_staging
from .block_copy import copy_blocks
from .cache_state import CacheState
from .chunks import WINDOW, Chunking, chunking_for, gather_blocks, is_contiguous_run, scatter_blocks
from .opaque import OpaqueState
from .plan import PlanItem, local_slices, make_plan
from .send_side import TAG_PULL, SendSide, _SendJob
from .staging import PinnedBuffers, SideStream, mpi_device_buffer, mpi_host_buffer, typed_view

log = logging.getLogger(__name__)
BACKENDS = ("auto", "ipc", "staged", "cuda_aware_mpi")

_FIRST_DATA_TAG = 100
_KEEP_BUFFERS = 4  # chunk buffers a transceiver keeps for its next transfers


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
    note: Any = None  # shared ring: the one-integer notice that the chunk is in its slot


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
    ipc_bytes: int = 0
    ipc_t0: float = 0.0
    ipc_done: bool = False
    one_sided: bool = False  # IPC from an already mapped pool: no messages at all
    ring: Any = None  # shared_staging.Ring lent to the context rank for this item

    @property
    def done(self) -> bool:
        if self.ipc_done or self.ipc_event is not None:  # an IPC item (no chunks)
            return self.ipc_done
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


class KvTransceiver(SendSide):
    """One per rank. `pool` is this rank's KV pool; `state` its executor's layout.

    `mode` is how this rank's chunks meet MPI: "host" (CPU pool), "staged" (CUDA pool,
    pinned host buffers) or "cuda_aware" (CUDA pool, MPI reads/writes device memory);
    `want_ipc` whether its pulls ask same-node context ranks for CUDA IPC.
    """

    def __init__(self, comm: Any, pool: torch.Tensor, state: CacheState, local_rank: int,
                 cfg: CacheTransceiverConfig):
        self.comm = comm
        self.pool = pool
        self.state = state
        self.local_rank = local_rank
        if cfg.max_num_tokens:  # the seed's form of the buffer size: tokens of this rank's KV
            cfg = dataclasses.replace(cfg, buffer_bytes=max(4096, cfg.max_num_tokens
                                                            * state.bytes_per_token_per_rank(local_rank)))
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
        self.backend = str(getattr(cfg, "backend", None) or "auto")
        if self.backend not in BACKENDS:
            raise ValueError(f"cache transceiver backend {self.backend!r} is not known; allowed: "
                             f"{', '.join(BACKENDS)}")
        self.mode, self.want_ipc, self.ipc_reason = "host", False, "the KV pool is not on CUDA"
        self._side: SideStream | None = None
        self._pinned: PinnedBuffers | None = None
        self._exporter: cuda_ipc.PoolExporter | None = None
        self._mapper: cuda_ipc.PoolMapper | None = None
        self.node = ""
        self.ipc_copy_seconds: list[float] = []  # per IPC item: copies queued .. seen complete (stats)
        self.ipc_one_sided = 0  # IPC items pulled without any message (the pool was mapped already)
        self._ipc_peers: dict[int, dict] = {}  # context rank -> its pool's IPC description (mapped)
        self._plans: dict[CacheState, list] = {}  # context layout -> our plan items (see _plan_items)
        self._rings: shared_staging.RingPool | None = None  # generation side: rings we lend
        self._ring_maps: shared_staging.RingMaps | None = None  # context side: rings lent to us
        self.ring_chunks = 0  # chunks that went through a shared ring (either side; stats / tests)
        if pool.is_cuda:
            self._setup_cuda()

    def _setup_cuda(self) -> None:
        from ..runtime.devices import mpi_cuda_support, node_name

        self.node = node_name()
        self._side = SideStream(self.pool.device)
        self._pinned = PinnedBuffers()
        if self.backend == "cuda_aware_mpi":
            ok, why = mpi_cuda_support()
            if not ok:
                raise RuntimeError(f"cache transceiver backend cuda_aware_mpi needs a CUDA-aware MPI, but {why}; "
                                   "use backend auto, ipc or staged (DISAGG_KV_BACKEND)")
            self.mode = "cuda_aware"
        else:
            self.mode = "staged"
        self.ipc_reason = cuda_ipc.available()
        if self.backend == "ipc" and self.ipc_reason:
            raise RuntimeError(f"cache transceiver backend ipc: CUDA IPC is not usable here: {self.ipc_reason}")
        if self.ipc_reason is None:
            self._exporter = cuda_ipc.PoolExporter(self.pool)
            self._mapper = cuda_ipc.PoolMapper(self.pool.device)
            # Mappings are closed when the transceiver goes away or at exit, whichever comes first.
            weakref.finalize(self, self._mapper.close)
        self.want_ipc = self.backend in ("auto", "ipc") and self.ipc_reason is None
        self.ring_reason = shared_staging.available() if self.cfg.shared_staging else "shared_staging is off"
        if self.ring_reason is None:
            self._rings, self._ring_maps = shared_staging.RingPool(), shared_staging.RingMaps()
            weakref.finalize(self, self._rings.close)
            weakref.finalize(self, self._ring_maps.close)

    def close(self) -> None:
        """Close the CUDA IPC mappings and drop staging buffers (at executor shutdown)."""
        if self._mapper is not None:
            self._mapper.close()
        if self._pinned is not None:
            self._pinned.clear()
        for rings in (self._rings, self._ring_maps):
            if rings is not None:
                rings.close()
        self._spare.clear()

    @property
    def _async_buffers(self) -> bool:
        return self.pool.is_cuda and self.cfg.async_buffer

    def _buffer(self, free: list, shape: tuple[int, ...]) -> torch.Tensor:
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

    def _keep(self, bufs: list) -> None:
        """A finished transfer hands its chunk buffers back (kept, unless async_buffer)."""
        if not self._async_buffers:
            self._spare.extend(bufs)
        bufs.clear()
        del self._spare[:-_KEEP_BUFFERS]

    # ---- generation side -------------------------------------------------

    def start_pull(self, req_id: int, opaque: OpaqueState, my_blocks: list[int]) -> None:
        """Ask the context ranks for this rank's share of a request's KV (or copy it at once: IPC).

        Ordered for latency: a one-sided IPC item's copy is queued as soon as its item exists,
        and the rest of the bookkeeping runs while the GPU copies."""
        ctx = opaque.cache_state
        job = _RecvJob(req_id, list(my_blocks), ctx.block_size, opaque.num_tokens, [])
        job.opaque = opaque  # type: ignore[attr-defined] - kept for sequential receive
        if self._side is not None:  # our new blocks may still be read by queued steps of their last owner
            self._side.after_compute()
        for it, slices, direct in self._plan_items(ctx):
            source = opaque.world_ranks[it.ctx_rank]
            one_sided = self.want_ipc and source in self._ipc_peers
            ring = self.mode == "staged" and not self.want_ipc and self._rings is not None
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
        self._recv[req_id] = job

    def _plan_items(self, ctx: CacheState) -> list[tuple[PlanItem, tuple[slice, slice], bool]]:
        """This rank's plan items from a context layout, with our slices of each (cached per layout)."""
        got = self._plans.get(ctx)
        if got is None:
            got = []
            for it in make_plan(ctx, self.state)[self.local_rank]:
                sl = local_slices(it, ctx, self.state, self.local_rank)
                direct = (self.cfg.zero_copy and ctx.block_size == self.state.block_size
                          and it.num_layers == self.pool.shape[1] and it.num_heads == self.pool.shape[3])
                got.append((it, (sl.gen_layers, sl.gen_heads), direct))
            self._plans[ctx] = got
        return got

    def _start_item(self, job: _RecvJob, ri: _RecvItem) -> None:
        ri.started = True
        if ri.one_sided:
            self.ipc_one_sided += 1
            self._ipc_pull(job, ri, self._ipc_peers[ri.source])
        else:
            self._request(job, ri, job.opaque)  # type: ignore[attr-defined]

    def _request(self, job: _RecvJob, ri: _RecvItem, opaque: OpaqueState) -> None:
        it = ri.item
        msg = {"tag": ri.tag, "blocks": list(opaque.block_ids[: ri.chunking.num_ctx_blocks]),
               "layers": [it.layer_start, it.layer_end], "heads": [it.head_start, it.head_end],
               "zero_copy": ri.chunking.zero_copy, "per_chunk": ri.chunking.blocks_per_chunk,
               "cache_state": opaque.cache_state.to_dict()}
        if ri.chunking.bounds is not None:
            msg["bounds"] = ri.chunking.bounds
        if self.want_ipc:
            msg["ipc"] = {"node": self.node}
        elif self.mode == "staged" and self._rings is not None:
            ri.ring = self._rings.get(self._max_chunk_bytes(ri, opaque.cache_state), shared_staging.SLOTS)
            if ri.ring is not None:
                msg["ring"] = {"node": self.node, **ri.ring.describe()}
        self.comm.send(msgpack.packb(msg), dest=ri.source, tag=TAG_PULL)
        if "ipc" in msg or "ring" in msg:  # first the context rank's answer: IPC handle, ring, or "copy"
            ri.hdr_req = self.comm.irecv(bytearray(1 << 16), source=ri.source, tag=ri.tag)
        else:
            self._post_recvs(job, ri)

    @staticmethod
    def _max_chunk_bytes(ri: _RecvItem, ctx: CacheState) -> int:
        it = ri.item
        block = it.num_layers * 2 * it.num_heads * ctx.block_size * ctx.head_dim * ctx.itemsize
        return block * max(hi - lo for lo, hi in ri.chunking.chunks())

    def _post_recvs(self, job: _RecvJob, ri: _RecvItem) -> None:
        chunks = ri.chunking.chunks()
        window = ri.ring.slots if ri.ring is not None else WINDOW
        while ri.next_post < len(chunks) and len(ri.posted) < window:
            lo, hi = chunks[ri.next_post]
            if ri.chunking.zero_copy:  # receive straight into our blocks (a contiguous run)
                if ri.chunking.bounds is None:
                    buf = self.pool[job.blocks[lo]]
                else:
                    buf = self.pool.narrow(0, job.blocks[lo], hi - lo)
                full = None
            elif ri.direct and is_contiguous_run(job.blocks, lo, hi):  # packed layout == our blocks' layout
                buf, full = self.pool.narrow(0, job.blocks[lo], hi - lo), None
            else:
                it = ri.item
                full = self._buffer(ri.free_bufs, (ri.chunking.blocks_per_chunk, it.num_layers, 2, it.num_heads,
                                                   job.ctx_block_size, self.state.head_dim))
                buf = full.narrow(0, 0, hi - lo)
            if self.mode == "host":
                entry = _In(self.comm.Irecv(_np(buf), source=ri.source, tag=ri.tag), buf, ri.next_post, full)
            elif self.mode == "cuda_aware":
                entry = _In(self.comm.Irecv(mpi_device_buffer(buf), source=ri.source, tag=ri.tag), buf,
                            ri.next_post, full)
            elif ri.ring is not None:  # the context rank copies into our ring's slot; MPI brings a notice
                slot = ri.ring.slot(ri.next_post, buf.numel() * buf.element_size())
                note = np.empty(1, dtype=np.int64)
                entry = _In(self.comm.Irecv(note, source=ri.source, tag=ri.tag), buf, ri.next_post, full,
                            host=typed_view(slot, buf.dtype, tuple(buf.shape)), note=note)
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

    def _on_header(self, job: _RecvJob, ri: _RecvItem, hdr: dict) -> None:
        if hdr["mode"] == "ipc":
            self._ipc_peers[ri.source] = hdr
            self._ipc_pull(job, ri, hdr)
            return
        if hdr["mode"] != "ring" and ri.ring is not None:  # the context rank cannot use our ring
            self._rings.put(ri.ring)
            ri.ring = None
        if hdr["mode"] == "copy":
            log.debug("rank %d: no CUDA IPC / shared ring with rank %d (%s); copying over MPI",
                      self.comm.Get_rank(), ri.source, hdr.get("why"))
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
            if ri.ipc_event is not None:
                if ri.ipc_event.query():
                    ri.ipc_event = None
                    self.ipc_copy_seconds.append(time.perf_counter() - ri.ipc_t0)
                    del self.ipc_copy_seconds[:-64]
                    if not ri.one_sided:
                        self.comm.send(True, dest=ri.source, tag=ri.tag)  # "done": the context may free
                    ri.ipc_done = True
                    job.bytes += ri.ipc_bytes
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
                if e.note is not None:  # the slot is free again: hand it back to the context rank
                    self.comm.Send(np.array([e.chunk], dtype=np.int64), dest=ri.source, tag=ri.tag)
                    self.ring_chunks += 1
                job.bytes += e.dst.numel() * e.dst.element_size()
                ri.next_done += 1
                self._post_recvs(job, ri)
                if ri.done:
                    self._keep(ri.free_bufs)
                    if ri.ring is not None:
                        self._rings.put(ri.ring)
                        ri.ring = None
        return all(ri.done for ri in job.items)

    def _ipc_pull(self, job: _RecvJob, ri: _RecvItem, hdr: dict) -> None:
        """Copy the item device to device from the mapped context pool (side stream)."""
        src = self._mapper.tensor(ri.source, hdr)
        ctx = job.opaque.cache_state  # type: ignore[attr-defined]
        ctx_ids = job.opaque.block_ids  # type: ignore[attr-defined]
        it = ri.item
        if ri.chunking.zero_copy:  # whole blocks, pool to pool, in one pass, queued on the side stream
            nblk = ri.chunking.num_ctx_blocks
            ri.ipc_bytes += copy_blocks(self.pool, job.blocks[:nblk], src, list(ctx_ids[:nblk]), self._side.stream)
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
                ri.ipc_bytes += buf.numel() * buf.element_size()
            ri.free_bufs.append(full)  # reused only after ipc_event (then handed to _keep)
            ri.ipc_event = self._side.record()
        ri.ipc_t0 = time.perf_counter()

    def _scatter(self, job: _RecvJob, ri: _RecvItem, buf: torch.Tensor, first_ctx_block: int) -> None:
        layers, heads = ri.slices
        bs, cbs = self.state.block_size, job.ctx_block_size
        view = self.pool[:, layers, :, heads]
        if bs == cbs:
            scatter_blocks(view, job.blocks[first_ctx_block: first_ctx_block + buf.shape[0]], buf)
            return
        # Different block sizes: move every token (tokens sit on dim 4 of a block) in one
        # indexed copy: source (chunk block, offset) -> destination (our block id, offset).
        tok0 = first_ctx_block * cbs
        ntok = min(buf.shape[0] * cbs, job.num_tokens - tok0)
        dev = self.pool.device
        t = torch.arange(ntok, device=dev)
        g = t + tok0
        dst_blk = torch.tensor(job.blocks, dtype=torch.int64, device=dev)[g // bs]
        view[dst_blk, :, :, :, g % bs] = buf[t // cbs, :, :, :, t % cbs]

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

    def _alloc_tag(self) -> int:
        tag = self._next_tag
        self._next_tag = tag + 1 if tag + 1 < self._tag_ub else _FIRST_DATA_TAG
        return tag


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI

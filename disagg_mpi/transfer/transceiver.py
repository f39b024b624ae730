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
- ipc: same-node peers: the pull asks for the context pool's CUDA IPC handle,
  the generation rank maps it once and copies the blocks device to device,
  then tells the context rank it is done (`cuda_ipc.py`). `auto` uses IPC
  when both pools are on CUDA on one node, else staged.
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
import torch

from ..api import CacheTransceiverConfig
from . import cuda_ipc
from .cache_state import CacheState
from .chunks import (
    WINDOW,
    Chunking,
    chunking_for,
    gather_blocks,
    is_contiguous_run,
    scatter_blocks,
    zero_copy_bounds,
)
from .opaque import OpaqueState
from .plan import PlanItem, local_slices, make_plan
from .staging import PinnedBuffers, SideStream, mpi_device_buffer, mpi_host_buffer, typed_view

log = logging.getLogger(__name__)
BACKENDS = ("auto", "ipc", "staged", "cuda_aware_mpi")

TAG_PULL = 1
_FIRST_DATA_TAG = 100
_KEEP_BUFFERS = 4  # chunk buffers a transceiver keeps for its next transfers


_np = mpi_host_buffer  # a numpy view MPI can move (bf16 has no MPI datatype: send its bytes)


@dataclass
class _Out:
    """One chunk on its way out: posted to MPI once `event` (its D2H / GPU gather) is done."""

    msg: Any  # what MPI sends (numpy view of host / pinned memory, or a CUDA tensor)
    event: Any = None  # torch.cuda.Event, None on the host path
    full: torch.Tensor | None = None  # chunk buffer to reuse
    pinned: torch.Tensor | None = None  # pinned staging buffer to give back
    req: Any = None


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
class _SendJob:
    dest: int
    tag: int
    blocks: list[int]
    slices: tuple[slice, slice]  # ctx-local layers, heads
    chunking: Chunking
    next_chunk: int = 0
    inflight: deque = field(default_factory=deque)  # _Out, in chunk order
    free_bufs: list = field(default_factory=list)  # reusable chunk buffers (copy path)
    direct: bool = False  # copy path, but the item is our whole slice: contiguous runs skip the pack
    bytes: int = 0
    header: Any = None  # "copy" answer owed to a generation rank that asked for CUDA IPC
    ipc: bool = False  # the generation rank copies from our pool itself (CUDA IPC)
    ready: Any = None  # IPC: event on our compute stream; the pool holds the KV once it is done
    done_req: Any = None  # IPC: receive of the generation rank's "done"


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
    hdr_req: Any = None  # asked for CUDA IPC: receive of the context rank's answer
    ipc_event: Any = None  # IPC copies queued on the side stream; "done" goes back once complete
    ipc_bytes: int = 0
    ipc_t0: float = 0.0

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

    def close(self) -> None:
        """Close the CUDA IPC mappings and drop staging buffers (at executor shutdown)."""
        if self._mapper is not None:
            self._mapper.close()
        if self._pinned is not None:
            self._pinned.clear()
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
        """Ask the context ranks for this rank's share of a request's KV."""
        ctx = opaque.cache_state
        plan = make_plan(ctx, self.state)[self.local_rank]
        items = []
        for it in plan:
            sl = local_slices(it, ctx, self.state, self.local_rank)
            ri = _RecvItem(it, opaque.world_ranks[it.ctx_rank], self._alloc_tag(),
                           chunking_for(it, ctx, self.state, self.local_rank, opaque.num_tokens,
                                     self.cfg, list(opaque.block_ids), list(my_blocks),
                                     staged=self.mode == "staged"),
                           (sl.gen_layers, sl.gen_heads))
            ri.direct = (self.cfg.zero_copy and ctx.block_size == self.state.block_size
                         and it.num_layers == self.pool.shape[1] and it.num_heads == self.pool.shape[3])
            items.append(ri)
        job = _RecvJob(req_id, list(my_blocks), ctx.block_size, opaque.num_tokens, items)
        job.opaque = opaque  # type: ignore[attr-defined] - kept for sequential receive
        self._recv[req_id] = job
        if self._side is not None:  # our new blocks may still be read by queued steps of their last owner
            self._side.after_compute()
        for ri in items if self.cfg.parallel_receive else items[:1]:
            self._request(job, ri, opaque)

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
        self.comm.send(msgpack.packb(msg), dest=ri.source, tag=TAG_PULL)
        ri.started = True
        if self.want_ipc:  # first the context rank's answer: its pool's IPC handle, or "copy"
            ri.hdr_req = self.comm.irecv(bytearray(1 << 16), source=ri.source, tag=ri.tag)
        else:
            self._post_recvs(job, ri)

    def _post_recvs(self, job: _RecvJob, ri: _RecvItem) -> None:
        chunks = ri.chunking.chunks()
        while ri.next_post < len(chunks) and len(ri.posted) < WINDOW:
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

    def _progress_recv(self, job: _RecvJob) -> bool:
        for idx, ri in enumerate(job.items):
            if not ri.started:
                if all(r.done for r in job.items[:idx]):
                    self._request(job, ri, job.opaque)  # type: ignore[attr-defined]
                else:
                    continue
            if ri.hdr_req is not None:
                got, hdr = ri.hdr_req.test()
                if not got:
                    continue
                ri.hdr_req = None
                if hdr["mode"] == "ipc":
                    self._ipc_pull(job, ri, hdr)
                else:  # the context rank cannot share its pool with us: the copy path
                    log.debug("rank %d: no CUDA IPC from rank %d (%s); copying", self.comm.Get_rank(),
                              ri.source, hdr.get("why"))
                    self._post_recvs(job, ri)
            if ri.ipc_event is not None:
                if ri.ipc_event.query():
                    ri.ipc_event = None
                    self.ipc_copy_seconds.append(time.perf_counter() - ri.ipc_t0)
                    del self.ipc_copy_seconds[:-64]
                    self.comm.send(True, dest=ri.source, tag=ri.tag)  # "done": the context may free
                    ri.next_done = len(ri.chunking.chunks())
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
                job.bytes += e.dst.numel() * e.dst.element_size()
                ri.next_done += 1
                self._post_recvs(job, ri)
                if ri.done:
                    self._keep(ri.free_bufs)
        return all(ri.done for ri in job.items)

    def _ipc_pull(self, job: _RecvJob, ri: _RecvItem, hdr: dict) -> None:
        """Copy the item device to device from the mapped context pool (side stream)."""
        src = self._mapper.tensor(ri.source, hdr)
        ctx = job.opaque.cache_state  # type: ignore[attr-defined]
        ctx_ids = job.opaque.block_ids  # type: ignore[attr-defined]
        it = ri.item
        c_stage, c_tp = ctx.coords(it.ctx_rank)
        l0, h0 = ctx.layer_range(c_stage)[0], ctx.kv_head_range(c_tp)[0]
        view = src[:, it.layer_start - l0: it.layer_end - l0, :, it.head_start - h0: it.head_end - h0]
        chunks = ri.chunking.chunks()
        with self._side:
            if ri.chunking.zero_copy:  # one copy per run contiguous in both pools (no buffer: no cap)
                nblk = ri.chunking.num_ctx_blocks
                b = zero_copy_bounds(list(ctx_ids[:nblk]), job.blocks[:nblk], nblk) if nblk else [0]
                for lo, hi in zip(b[:-1], b[1:]):
                    dst = self.pool.narrow(0, job.blocks[lo], hi - lo)
                    dst.copy_(src.narrow(0, ctx_ids[lo], hi - lo))
                    ri.ipc_bytes += dst.numel() * dst.element_size()
            else:  # re-shard / re-block: gather the item's slice, scatter into ours, chunk by chunk
                full = self._buffer(ri.free_bufs, (ri.chunking.blocks_per_chunk, *view.shape[1:]))
                for lo, hi in chunks:
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

    # ---- context side ----------------------------------------------------

    def _ipc_refusal(self, ask: dict) -> str | None:
        """None if we can let this generation rank map our pool, else why not."""
        if not self.pool.is_cuda:
            return "the context pool is not on CUDA"
        if self.backend in ("staged", "cuda_aware_mpi"):
            return f"the context rank's backend is {self.backend}"
        if self._exporter is None:
            return f"CUDA IPC is not usable on the context rank: {self.ipc_reason}"
        if ask.get("node") != self.node:
            return f"different nodes ({ask.get('node')} vs {self.node})"
        return None

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
            chunking = Chunking(msg["zero_copy"], msg["per_chunk"], len(msg["blocks"]), msg.get("bounds"))
            job = _SendJob(src, msg["tag"], msg["blocks"], (layers, heads), chunking)
            job.direct = (self.cfg.zero_copy and layers.stop - layers.start == self.pool.shape[1]
                          and heads.stop - heads.start == self.pool.shape[3])
            if "ipc" in msg:
                why = self._ipc_refusal(msg["ipc"])
                if why is None:
                    job.ipc = True
                    # The pool holds the KV once our compute stream has drained. Usually it has (the
                    # prefill's tokens went to the host): ask the stream, which queues no GPU work (an
                    # event would, and with two processes on one GPU that costs a context switch).
                    stream = torch.cuda.current_stream(self.pool.device)
                    if not stream.query():
                        job.ready = torch.cuda.Event()
                        job.ready.record(stream)
                    one = self.pool[0, layers, :, heads]
                    job.bytes = len(msg["blocks"]) * one.numel() * one.element_size()
                else:
                    job.header = {"mode": "copy", "why": why}
            self._send_queue.append(job)

    def _progress_send_ipc(self, job: _SendJob) -> bool:
        if job.done_req is None:
            if job.ready is not None and not job.ready.query():  # the prefill's writes are not all in yet
                return False
            self.comm.send({"mode": "ipc", **self._exporter.info()}, dest=job.dest, tag=job.tag)
            job.done_req = self.comm.irecv(bytearray(256), source=job.dest, tag=job.tag)
            return False
        got, _ = job.done_req.test()
        if got:
            self.sent_bytes += job.bytes
        return got

    def _send_source(self, job: _SendJob, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chunk as a contiguous tensor on the pool's device: a pool run, or packed into a buffer."""
        if job.chunking.zero_copy:
            if job.chunking.bounds is None:
                return self.pool[job.blocks[lo]], None
            return self.pool.narrow(0, job.blocks[lo], hi - lo), None  # contiguous (the receiver checked)
        if job.direct and is_contiguous_run(job.blocks, lo, hi):  # our blocks are the packed layout
            return self.pool.narrow(0, job.blocks[lo], hi - lo), None
        layers, heads = job.slices
        view = self.pool[:, layers, :, heads]
        full = self._buffer(job.free_bufs, (job.chunking.blocks_per_chunk, *view.shape[1:]))
        buf = full.narrow(0, 0, hi - lo)
        gather_blocks(view, job.blocks[lo:hi], buf)
        return buf, full

    def _progress_send(self, job: _SendJob) -> bool:
        if job.ipc:
            return self._progress_send_ipc(job)
        if job.header is not None:
            self.comm.send(job.header, dest=job.dest, tag=job.tag)
            job.header = None
        while job.inflight and job.inflight[0].req is not None and job.inflight[0].req.Test():
            e = job.inflight.popleft()
            if e.full is not None:
                job.free_bufs.append(e.full)
            if e.pinned is not None:
                self._pinned.put(e.pinned)
        chunks = job.chunking.chunks()
        while job.next_chunk < len(chunks) and len(job.inflight) < WINDOW:
            lo, hi = chunks[job.next_chunk]
            if self.mode == "host":
                buf, full = self._send_source(job, lo, hi)
                entry = _Out(_np(buf), None, full)
            else:
                with self._side:
                    self._side.after_compute()  # the prefill's KV writes come first
                    buf, full = self._send_source(job, lo, hi)
                    if self.mode == "cuda_aware":
                        entry = _Out(mpi_device_buffer(buf), None, full)
                    else:  # staged: D2H into pinned memory, Isend once the copy is done
                        pinned = self._pinned.get(buf.numel() * buf.element_size())
                        host = typed_view(pinned, buf.dtype, tuple(buf.shape))
                        host.copy_(buf, non_blocking=True)
                        entry = _Out(_np(host), None, full, pinned)
                    entry.event = self._side.record()
            job.inflight.append(entry)
            job.bytes += buf.numel() * buf.element_size()
            job.next_chunk += 1
        for e in job.inflight:  # post in chunk order, each once its copy is done
            if e.req is not None:
                continue
            if e.event is not None and not e.event.query():
                break
            e.req = self.comm.Isend(e.msg, dest=job.dest, tag=job.tag)
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
        """Forget a receive (its request was cancelled); posted receives are cancelled.

        CUDA IPC items whose copies were queued still tell the context rank they are done."""
        job = self._recv.pop(req_id, None)
        if job is None:
            return
        for ri in job.items:
            if ri.ipc_event is not None:
                ri.ipc_event.synchronize()
                self.comm.send(True, dest=ri.source, tag=ri.tag)
            for e in ri.posted:
                if not e.landed:
                    e.req.Cancel()
                    e.req.Wait()
            if ri.hdr_req is not None:
                ri.hdr_req.Cancel()
                ri.hdr_req.Wait()

    def _alloc_tag(self) -> int:
        tag = self._next_tag
        self._next_tag = tag + 1 if tag + 1 < self._tag_ub else _FIRST_DATA_TAG
        return tag


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI

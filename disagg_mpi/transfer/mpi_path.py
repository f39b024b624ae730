"""Chunks over MPI: the byte path every pair of ranks can use (see transceiver.py).

The context rank packs the item's blocks for its peer chunk by chunk (`WINDOW` chunks in
flight) and `Isend`s them in order on the pull's tag; the generation rank posts `WINDOW`
receives ahead and lands each chunk in its blocks. How a chunk meets MPI is the one thing
that differs, one class each:
- `HostMpi` (CPU pools): MPI reads and writes the pool / chunk buffers in host memory;
- `StagedMpi` (CUDA pools): D2H into pinned host memory before an Isend, H2D + scatter
  after an Irecv, on the side stream, chunk by chunk (`staging.py`);
- `CudaAwareMpi` (CUDA pools, CUDA-aware MPI): MPI moves device buffers directly.
The wire format does not depend on the class, so a CPU rank and a GPU rank (or a staged and
a CUDA-aware one) talk to each other.
"""

from __future__ import annotations

from typing import Any

import torch

from ..protocol import encode
from .chunks import WINDOW
from .pool_io import PoolIO
from .records import InChunk, OutChunk, RecvItem, RecvJob, SendJob, TransferStats
from .staging import PinnedBuffers, SideStream, mpi_device_buffer, mpi_host_buffer, typed_view

_np = mpi_host_buffer  # a numpy view MPI can move (bf16 has no MPI datatype: send its bytes)


class MpiPath:
    """The chunk pipeline over MPI, both sides; subclasses say how one chunk meets MPI."""

    def __init__(self, comm: Any, io: PoolIO, stats: TransferStats):
        self.comm = comm
        self.io = io
        self.stats = stats

    # ---- how a chunk meets MPI (one subclass each) ---------------------------------

    def _out(self, job: SendJob, lo: int, hi: int) -> tuple[OutChunk, torch.Tensor]:
        """Chunk [lo, hi) ready for an Isend once its event is done; and the chunk's bytes."""
        raise NotImplementedError

    def _post(self, ri: RecvItem, buf: torch.Tensor, full: torch.Tensor | None) -> InChunk:
        """The Irecv of chunk `ri.next_post`, which lands in `buf` (a view of `full`, if not None)."""
        raise NotImplementedError

    def _land(self, job: RecvJob, ri: RecvItem, e: InChunk) -> None:
        """The chunk's message is in: move it into our blocks."""
        raise NotImplementedError

    def _release(self, e: OutChunk | InChunk) -> None:
        """The chunk is done with its staging memory (if any)."""

    def close(self) -> None:
        """Drop staging buffers (at executor shutdown)."""

    # ---- context side ------------------------------------------------------------

    def send(self, job: SendJob) -> bool:
        if job.header is not None:
            self.comm.send(encode(job.header), dest=job.dest, tag=job.tag)
            job.header = None
        while job.inflight and job.inflight[0].req is not None and job.inflight[0].req.Test():
            e = job.inflight.popleft()
            if e.full is not None:
                job.free_bufs.append(e.full)
            self._release(e)
        chunks = job.chunking.chunks()
        while job.next_chunk < len(chunks) and len(job.inflight) < WINDOW:
            lo, hi = chunks[job.next_chunk]
            entry, buf = self._out(job, lo, hi)
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
            self.stats.sent_bytes += job.bytes
            self.io.keep(job.free_bufs)
        return done

    # ---- generation side -----------------------------------------------------------

    def post(self, job: RecvJob, ri: RecvItem) -> None:
        """Post receives for the item's next chunks, up to WINDOW in flight."""
        chunks = ri.chunking.chunks()
        while ri.next_post < len(chunks) and len(ri.posted) < WINDOW:
            lo, hi = chunks[ri.next_post]
            buf, full = self.io.chunk_dest(job, ri, lo, hi)
            ri.posted.append(self._post(ri, buf, full))
            ri.next_post += 1

    def receive(self, job: RecvJob, ri: RecvItem) -> None:
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
            self._release(e)
            job.bytes += e.dst.numel() * e.dst.element_size()
            ri.next_done += 1
            self.post(job, ri)
            if ri.done:
                self.io.keep(ri.free_bufs)


class HostMpi(MpiPath):
    """CPU pools: MPI reads the pool (or a packed chunk buffer) and writes our blocks in place."""

    def _out(self, job: SendJob, lo: int, hi: int) -> tuple[OutChunk, torch.Tensor]:
        buf, full = self.io.send_source(job, lo, hi)
        return OutChunk(_np(buf), None, full), buf

    def _post(self, ri: RecvItem, buf: torch.Tensor, full: torch.Tensor | None) -> InChunk:
        return InChunk(self.comm.Irecv(_np(buf), source=ri.source, tag=ri.tag), buf, ri.next_post, full)

    def _land(self, job: RecvJob, ri: RecvItem, e: InChunk) -> None:
        lo, _ = ri.chunking.chunks()[e.chunk]
        e.landed = True
        if e.full is not None:  # landed in a chunk buffer: scatter it into our blocks
            self.io.scatter(job, ri, e.dst, lo)


class _DeviceMpi(MpiPath):
    """CUDA pools: packing, copies and scatters run on the transceiver's side stream."""

    def __init__(self, comm: Any, io: PoolIO, stats: TransferStats, side: SideStream):
        super().__init__(comm, io, stats)
        self.side = side

    def _land(self, job: RecvJob, ri: RecvItem, e: InChunk) -> None:
        lo, _ = ri.chunking.chunks()[e.chunk]
        e.landed = True
        with self.side:
            if e.host is not None:
                e.dst.copy_(e.host, non_blocking=True)
            if e.full is not None:
                self.io.scatter(job, ri, e.dst, lo)
            e.event = self.side.record()


class StagedMpi(_DeviceMpi):
    """MPI moves pinned host buffers: D2H before an Isend, H2D after an Irecv (side stream)."""

    def __init__(self, comm: Any, io: PoolIO, stats: TransferStats, side: SideStream):
        super().__init__(comm, io, stats, side)
        self.pinned = PinnedBuffers()

    def _out(self, job: SendJob, lo: int, hi: int) -> tuple[OutChunk, torch.Tensor]:
        with self.side:
            self.side.after_compute()  # the prefill's KV writes come first
            buf, full = self.io.send_source(job, lo, hi)
            # D2H into pinned memory, Isend once the copy is done
            pinned = self.pinned.get(buf.numel() * buf.element_size())
            host = typed_view(pinned, buf.dtype, tuple(buf.shape))
            host.copy_(buf, non_blocking=True)
            entry = OutChunk(_np(host), None, full, pinned)
            entry.event = self.side.record()
        return entry, buf

    def _post(self, ri: RecvItem, buf: torch.Tensor, full: torch.Tensor | None) -> InChunk:
        # MPI lands in pinned host memory, H2D on the side stream afterwards
        pinned = self.pinned.get(buf.numel() * buf.element_size())
        host = typed_view(pinned, buf.dtype, tuple(buf.shape))
        return InChunk(self.comm.Irecv(_np(host), source=ri.source, tag=ri.tag), buf, ri.next_post, full,
                       pinned, host)

    def _release(self, e: OutChunk | InChunk) -> None:
        if e.pinned is not None:
            self.pinned.put(e.pinned)

    def close(self) -> None:
        self.pinned.clear()


class CudaAwareMpi(_DeviceMpi):
    """MPI reads and writes device memory (only where the MPI library reports CUDA support)."""

    def _out(self, job: SendJob, lo: int, hi: int) -> tuple[OutChunk, torch.Tensor]:
        with self.side:
            self.side.after_compute()  # the prefill's KV writes come first
            buf, full = self.io.send_source(job, lo, hi)
            entry = OutChunk(mpi_device_buffer(buf), None, full)
            entry.event = self.side.record()
        return entry, buf

    def _post(self, ri: RecvItem, buf: torch.Tensor, full: torch.Tensor | None) -> InChunk:
        return InChunk(self.comm.Irecv(mpi_device_buffer(buf), source=ri.source, tag=ri.tag), buf,
                       ri.next_post, full)

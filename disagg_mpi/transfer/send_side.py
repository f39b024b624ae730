"""The context side of the pull protocol: answer pulls, send chunks (see transceiver.py).

A mixin of `KvTransceiver`: it reads the transceiver's pool, side stream,
buffers and MPI communicator. Per pull message it makes a `_SendJob` and then
either
- lets the generation rank map the pool (CUDA IPC: answer with the handle,
  wait for "done"),
- copies chunks into the generation rank's shared staging ring (same node,
  staged: every chunk's D2H into slot k % slots queued at once, the two ranks'
  streams waiting for each other on the GPU; `shared_staging.py`), or
- sends chunks over MPI (host memory, pinned staging, or CUDA-aware MPI).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from ..protocol import KV_PULL, PullAnswer, PullAsk, PullPath, decode, encode
from . import shared_staging, stream_ops
from .chunks import WINDOW, Chunking, gather_blocks, is_contiguous_run
from .staging import mpi_device_buffer, mpi_host_buffer, typed_view

_np = mpi_host_buffer  # a numpy view MPI can move (bf16 has no MPI datatype: send its bytes)


@dataclass
class _Out:
    """One chunk on its way out: posted to MPI once `event` (its D2H / GPU gather) is done."""

    msg: Any  # what MPI sends (numpy view of host / pinned memory, or a CUDA tensor)
    event: Any = None  # torch.cuda.Event, None on the host path
    full: torch.Tensor | None = None  # chunk buffer to reuse
    pinned: torch.Tensor | None = None  # pinned staging buffer to give back
    req: Any = None  # the Isend


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
    header: PullAnswer | None = None  # owed to a generation rank that asked for CUDA IPC or a ring
    ipc: bool = False  # the generation rank copies from our pool itself (CUDA IPC)
    ready: Any = None  # IPC: event on our compute stream; the pool holds the KV once it is done
    done_req: Any = None  # IPC: receive of the generation rank's "done"
    ring: Any = None  # shared_staging.Ring the generation rank lent us for this pull
    ring_seq: int = 0  # the pull's first chunk number in the ring
    copied: Any = None  # ring: event after the last chunk's D2H (all queued at once)


class SendSide:
    """Context-side methods of KvTransceiver."""

    def _ipc_refusal(self, ask: PullAsk) -> str | None:
        """None if we can let this generation rank map our pool, else why not."""
        if not self.pool.is_cuda:
            return "the context pool is not on CUDA"
        if self.backend in ("staged", "cuda_aware_mpi"):
            return f"the context rank's backend is {self.backend}"
        if self._exporter is None:
            return f"CUDA IPC is not usable on the context rank: {self.ipc_reason}"
        if ask.ipc_node != self.node:
            return f"different nodes ({ask.ipc_node} vs {self.node})"
        return None

    def _ring_refusal(self, ring: dict) -> str | None:
        """None if we can copy into this generation rank's shared ring, else why not."""
        if ring.get("path") in self._rings_refused:
            return f"the shared ring {ring.get('path')} was refused before"
        if self.mode != "staged":
            return f"the context rank moves chunks as {self.mode}, not staged"
        if self._ring_maps is None:
            return f"shared staging is not usable on the context rank: {self.ring_reason}"
        if ring.get("node") != self.node:
            return f"different nodes ({ring.get('node')} vs {self.node})"
        return None

    def _accept_pulls(self) -> None:
        if self._probe is None:  # made once: this runs on every poll(), on the path of every pull
            self._probe = (_mpi().Status(), _mpi().ANY_SOURCE)
        status, anyone = self._probe
        while self.comm.Iprobe(source=anyone, tag=KV_PULL, status=status):
            src = status.Get_source()
            msg = decode(self.comm.recv(source=src, tag=KV_PULL), KV_PULL)
            if not isinstance(msg, PullAsk):
                raise TypeError(f"rank {src} sent {msg!r:.120} on the KV pull tag")
            ctx = self.state
            c_stage, c_tp = ctx.coords(self.local_rank)
            l0 = ctx.layer_range(c_stage)[0]
            h0 = ctx.kv_head_range(c_tp)[0]
            layers = slice(msg.layers[0] - l0, msg.layers[1] - l0)
            heads = slice(msg.heads[0] - h0, msg.heads[1] - h0)
            chunking = Chunking(msg.zero_copy, msg.per_chunk, len(msg.blocks), msg.bounds)
            job = _SendJob(src, msg.tag, msg.blocks, (layers, heads), chunking)
            job.direct = (self.cfg.zero_copy and layers.stop - layers.start == self.pool.shape[1]
                          and heads.stop - heads.start == self.pool.shape[3])
            if msg.ipc_node is not None:
                why = self._ipc_refusal(msg)
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
                    job.bytes = len(msg.blocks) * one.numel() * one.element_size()
                else:
                    job.header = PullAnswer(PullPath.COPY, why)
            elif msg.ring is not None:
                why = self._ring_refusal(msg.ring)
                if why is None:
                    try:
                        busy = {j.ring.path for j in (*self._sending, *self._send_queue) if j.ring is not None}
                        job.ring = self._ring_maps.get(msg.ring, busy)
                        job.ring_seq = int(msg.ring["seq"])
                        self._ring_order.append(job)
                    except (OSError, ValueError, RuntimeError) as err:
                        why = f"cannot map the shared ring {msg.ring.get('path')}: {err}"
                if why is not None:  # its later pulls would wait for chunk numbers this one skips
                    self._rings_refused.add(msg.ring.get("path"))
                job.header = PullAnswer(PullPath.RING) if why is None else PullAnswer(PullPath.COPY, why)
            self._send_queue.append(job)

    def _progress_send_ipc(self, job: _SendJob) -> bool:
        if job.done_req is None:
            if job.ready is not None and not job.ready.query():  # the prefill's writes are not all in yet
                return False
            self.comm.send(encode(PullAnswer(PullPath.IPC, ipc=self._exporter.info())), dest=job.dest, tag=job.tag)
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

    def _progress_send_ring(self, job: _SendJob) -> bool:
        if job.copied is None:
            # Ring pulls start in the order they were asked, and those on our GPU at once all go
            # to one generation rank (shared_staging.py: no cycle of waits across ranks).
            if self._ring_order[0] is not job or self._ring_peer not in (None, job.dest):
                return False
            self._ring_order.popleft()
            self._ring_peer = job.dest
            self._ring_live += 1
            self.comm.send(encode(job.header), dest=job.dest, tag=job.tag)  # RING: the generation side queues its waits
            job.header = None
            self._queue_ring_copies(job)  # every write it will wait for: queued whatever happens next
            return False
        if not job.copied.query():
            return False
        self._side.recycle(job.copied)
        self._ring_live -= 1
        if not self._ring_live:
            self._ring_peer = None
        self.sent_bytes += job.bytes
        self._keep(job.free_bufs)
        return True

    def _queue_ring_copies(self, job: _SendJob) -> None:
        """Queue every chunk of the pull: wait for its slot on the GPU, D2H into it, mark it ready."""
        ops, _ = stream_ops.load()
        ring, chunks = job.ring, job.chunking.chunks()
        with self._side as stream:
            self._side.after_compute()  # the prefill's KV writes come first
            h = stream.cuda_stream
            for k, (slot, free_at, ready) in enumerate(shared_staging.sender_steps(job.ring_seq, len(chunks),
                                                                                ring.slots)):
                if free_at is not None:
                    ops.wait_geq(h, ring.free_flag(slot), free_at)
                buf, full = self._send_source(job, *chunks[k])
                job.bytes += ring.put(slot, buf, stream)
                ops.write(h, ring.ready_flag(slot), ready)
                if full is not None:  # the next chunk packs into it after this D2H (stream order)
                    job.free_bufs.append(full)
            job.copied = self._side.record()
        job.next_chunk = len(chunks)
        self.ring_chunks += len(chunks)

    def _progress_send(self, job: _SendJob) -> bool:
        if job.ipc:
            return self._progress_send_ipc(job)
        if job.ring is not None:
            return self._progress_send_ring(job)
        if job.header is not None:
            self.comm.send(encode(job.header), dest=job.dest, tag=job.tag)
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


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI

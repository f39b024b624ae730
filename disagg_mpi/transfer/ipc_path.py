"""CUDA IPC as a byte path: same-node peers copy device to device (see cuda_ipc.py, block_copy.py).

The first pull to a context rank asks for its pool's CUDA IPC handle (the answer comes
before any data); the generation rank maps the pool once, copies the blocks on its side
stream (one pass: `block_copy.py`), then tells the context rank it is done. Later pulls
from that rank are one-sided: no message at all, the generation rank copies from the
mapped pool at once. `IpcPath` holds both sides: the pool we export (context side) and
the pools we mapped (generation side).

GPU-ordered joins (`ordered`, an executor leader's own pulls): a one-sided copy is done for
the engine as soon as it is queued; the model's stream waits for the copy's event, so the
request joins the very next step, and the host never waits for the copy (it used to see it
complete only between two decode steps, one step late). The copy still `settle`s: until its
event has completed, `unsettled` says so, and the engine keeps the context's blocks claimed.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..protocol import PullAnswer, PullDone, PullPath, encode
from . import cuda_ipc
from .block_copy import PoolPair
from .chunks import gather_blocks
from .pool_io import PoolIO
from .records import RecvItem, RecvJob, SendJob, TransferStats
from .staging import SideStream


class IpcPath:
    """Device-to-device copies out of a mapped context pool, both sides (CUDA pools, one node)."""

    def __init__(self, comm: Any, io: PoolIO, stats: TransferStats, side: SideStream):
        self.comm = comm
        self.io = io
        self.stats = stats
        self.side = side
        self.exporter = cuda_ipc.PoolExporter(io.pool)  # context side: our pool's IPC description
        self.mapper = cuda_ipc.PoolMapper(io.pool.device)  # generation side: pools we opened
        self.peers: dict[int, dict] = {}  # context rank -> its pool's IPC description (mapped)
        self._pairs: dict[int, tuple] = {}  # context rank -> (that description, block_copy.PoolPair)
        self.ordered = False  # GPU-ordered joins of one-sided pulls (see the module's docstring)
        self.settling: list[tuple[int, Any, float]] = []  # (req_id, event, t0): joined, copy queued

    def close(self) -> None:
        """Close the CUDA IPC mappings (at executor shutdown)."""
        self._pairs.clear()
        self.mapper.close()

    # ---- context side --------------------------------------------------------------

    def accept(self, job: SendJob, layers: slice, heads: slice) -> None:
        """Serve the pull by letting the generation rank map our pool (answered once the KV is in)."""
        pool = self.io.pool
        # The pool holds the KV once our compute stream has drained. Usually it has (the
        # prefill's tokens went to the host): ask the stream, which queues no GPU work (an
        # event would, and with two processes on one GPU that costs a context switch).
        stream = torch.cuda.current_stream(pool.device)
        if not stream.query():
            job.ready = torch.cuda.Event()
            job.ready.record(stream)
        one = pool[0, layers, :, heads]
        job.bytes = len(job.blocks) * one.numel() * one.element_size()

    def send(self, job: SendJob) -> bool:
        if job.done_req is None:
            if job.ready is not None and not job.ready.query():  # the prefill's writes are not all in yet
                return False
            self.comm.send(encode(PullAnswer(PullPath.IPC, ipc=self.exporter.info())), dest=job.dest, tag=job.tag)
            job.done_req = self.comm.irecv(bytearray(256), source=job.dest, tag=job.tag)
            return False
        got, _ = job.done_req.test()
        if got:
            self.stats.sent_bytes += job.bytes
        return got

    # ---- generation side -----------------------------------------------------------

    def answered(self, job: RecvJob, ri: RecvItem, info: dict) -> None:
        """The context rank answered with its pool's IPC description: map it, copy."""
        self.peers[ri.source] = info
        self.pull(job, ri, info)

    def pull(self, job: RecvJob, ri: RecvItem, hdr: dict) -> None:
        """Copy the item device to device from the mapped context pool (side stream)."""
        src = self.mapper.tensor(ri.source, hdr)
        ctx = job.opaque.cache_state
        ctx_ids = job.opaque.block_ids
        it = ri.item
        if ri.chunking.zero_copy:  # whole blocks, pool to pool, in one pass, queued on the side stream
            ri.queued_bytes += self.copy_whole(job.blocks, ctx_ids, ri.source, hdr, ri.chunking.num_ctx_blocks)
            ri.ipc_event = self.side.record()
            ri.ipc_t0 = time.perf_counter()
            return
        with self.side:
            # re-shard / re-block: gather the item's slice, scatter into ours, chunk by chunk
            c_stage, c_tp = ctx.coords(it.ctx_rank)
            l0, h0 = ctx.layer_range(c_stage)[0], ctx.kv_head_range(c_tp)[0]
            view = src[:, it.layer_start - l0: it.layer_end - l0, :, it.head_start - h0: it.head_end - h0]
            full = self.io.buffer(ri.free_bufs, (ri.chunking.blocks_per_chunk, *view.shape[1:]))
            for lo, hi in ri.chunking.chunks():
                buf = full.narrow(0, 0, hi - lo)
                gather_blocks(view, list(ctx_ids[lo:hi]), buf)
                self.io.scatter(job, ri, buf, lo)
                ri.queued_bytes += buf.numel() * buf.element_size()
            ri.free_bufs.append(full)  # reused only after ipc_event (then handed to keep)
            ri.ipc_event = self.side.record()
        ri.ipc_t0 = time.perf_counter()

    def copy_whole(self, my_blocks, ctx_ids, source: int, info: dict, nblk: int) -> int:
        """Queue the copy of a request's first `nblk` blocks from `source`'s mapped pool into ours."""
        got = self._pairs.get(source)
        if got is None or got[0] is not info:  # first pull from it, or it re-exported its pool
            got = (info, PoolPair(self.io.pool, self.mapper.tensor(source, info), self.side.stream))
            self._pairs[source] = got
        return got[1].copy(my_blocks, ctx_ids, nblk)

    def pair(self, source: int) -> PoolPair:
        """The copier from `source`'s mapped pool into ours (diagnostics: scripts/probe_ring.py)."""
        return self._pairs[source][1]

    def receive(self, job: RecvJob, ri: RecvItem) -> None:
        if ri.ipc_event is not None and self.ordered and ri.one_sided:  # done for the engine, now
            self.side.compute_waits(ri.ipc_event)
            self.settling.append((job.req_id, ri.ipc_event, ri.ipc_t0))
            ri.ipc_event = None
            ri.ipc_done = True
            job.bytes += ri.queued_bytes
            return
        if ri.ipc_event is not None and ri.ipc_event.query():
            self.side.recycle(ri.ipc_event)
            ri.ipc_event = None
            self._copied(ri.ipc_t0)
            if not ri.one_sided:
                self.comm.send(encode(PullDone()), dest=ri.source, tag=ri.tag)  # the context may free
            ri.ipc_done = True
            job.bytes += ri.queued_bytes
            self.io.keep(ri.free_bufs)

    def settle(self) -> None:
        """Note the GPU-ordered copies that have completed (queued in order on one stream)."""
        while self.settling and self.settling[0][1].query():
            _, ev, t0 = self.settling.pop(0)
            self.side.recycle(ev)
            self._copied(t0)

    def _copied(self, t0: float) -> None:
        self.stats.ipc_copy_seconds.append(time.perf_counter() - t0)
        del self.stats.ipc_copy_seconds[:-64]

    def unsettled(self, req_id: int) -> bool:
        """Whether a GPU-ordered copy of this request may still be reading the context's pool."""
        return any(r == req_id for r, _, _ in self.settling)

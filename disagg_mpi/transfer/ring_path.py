"""The shared staging ring as a byte path: staged pulls between two ranks of one node
(see shared_staging.py for the ring, its flags and why no cycle of GPU waits can form).

The generation rank lends the context rank a ring of page-locked slots in shared memory;
the context rank queues every chunk's D2H into slot k % slots at once, the generation rank
every H2D out of it, and the two streams wait for each other on the GPU, so MPI carries
one answer per pull. `RingPath` holds both sides: the rings this rank lends (generation
side) and those lent to it, with the order its ring pulls start in (context side).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ..protocol import encode
from . import shared_staging, stream_ops
from .cache_state import CacheState
from .pool_io import PoolIO
from .records import RecvItem, RecvJob, SendJob, TransferStats
from .staging import SideStream


class RingPath:
    """Chunks through a shared ring, both sides (CUDA pools on one node, staged backend)."""

    def __init__(self, comm: Any, io: PoolIO, stats: TransferStats, side: SideStream, node: str):
        self.comm = comm
        self.io = io
        self.stats = stats
        self.side = side
        self.node = node
        self.lent = shared_staging.RingPool()  # generation side: rings we lend
        self.maps = shared_staging.RingMaps()  # context side: rings lent to us
        # Context side: ring pulls not started yet, in the order asked; the generation rank that
        # those on our GPU go to, and how many they are.
        self._order: deque[SendJob] = deque()
        self._peer: int | None = None
        self._live = 0

    def close(self) -> None:
        for rings in (self.lent, self.maps):
            rings.close()

    # ---- context side --------------------------------------------------------------

    def accept(self, job: SendJob, desc: dict, busy: set[str]) -> None:
        """Map the ring a pull came with (`busy`: paths of rings our other jobs use) and queue the
        pull in the order asked. Raises OSError, ValueError or RuntimeError if it cannot be mapped."""
        seq = int(desc["seq"])  # before mapping: a job with a ring but out of the order would wait forever
        job.ring = self.maps.get(desc, busy)
        job.ring_seq = seq
        self._order.append(job)

    def send(self, job: SendJob) -> bool:
        if job.copied is None:
            # Ring pulls start in the order they were asked, and those on our GPU at once all go
            # to one generation rank (shared_staging.py: no cycle of waits across ranks).
            if self._order[0] is not job or self._peer not in (None, job.dest):
                return False
            self._order.popleft()
            self._peer = job.dest
            self._live += 1
            self.comm.send(encode(job.header), dest=job.dest, tag=job.tag)  # RING: the generation side queues its waits
            job.header = None
            self._queue_copies(job)  # every write it will wait for: queued whatever happens next
            return False
        if not job.copied.query():
            return False
        self.side.recycle(job.copied)
        self._live -= 1
        if not self._live:
            self._peer = None
        self.stats.sent_bytes += job.bytes
        self.io.keep(job.free_bufs)
        return True

    def _queue_copies(self, job: SendJob) -> None:
        """Queue every chunk of the pull: wait for its slot on the GPU, D2H into it, mark it ready."""
        ops, _ = stream_ops.load()
        ring, chunks = job.ring, job.chunking.chunks()
        with self.side as stream:
            self.side.after_compute()  # the prefill's KV writes come first
            h = stream.cuda_stream
            for k, (slot, free_at, ready) in enumerate(shared_staging.sender_steps(job.ring_seq, len(chunks),
                                                                                ring.slots)):
                if free_at is not None:
                    ops.wait_geq(h, ring.free_flag(slot), free_at)
                buf, full = self.io.send_source(job, *chunks[k])
                job.bytes += ring.put(slot, buf, stream)
                ops.write(h, ring.ready_flag(slot), ready)
                if full is not None:  # the next chunk packs into it after this D2H (stream order)
                    job.free_bufs.append(full)
            job.copied = self.side.record()
        job.next_chunk = len(chunks)
        self.stats.ring_chunks += len(chunks)

    # ---- generation side ---------------------------------------------------------------

    def may_lend(self, peer: int) -> bool:
        """Whether a pull from `peer` may get a ring (its chunks are cut for one if so)."""
        return self.lent.may_lend(peer)

    def lend(self, ri: RecvItem, ctx: CacheState, buffer_bytes: int) -> dict | None:
        """Lend the item the ring we keep for its context rank: the ring's description for the
        pull message, or None (no ring: the item goes over MPI)."""
        # Slots for the usual chunk (buffer_bytes / SLOTS), or this one if bigger: the ring lasts
        # (a first short pull must not leave it too small for the next ones).
        slot_bytes = max(_max_chunk_bytes(ri, ctx), buffer_bytes // shared_staging.SLOTS)
        ri.ring = self.lent.get(ri.source, slot_bytes, shared_staging.SLOTS)
        if ri.ring is None:
            return None
        # the item's chunk numbers in the ring: the next ones
        ri.ring_seq = ri.ring.seq
        ri.ring.seq += len(ri.chunking.chunks())
        return {"node": self.node, **ri.ring.describe(), "seq": ri.ring_seq}

    def refused(self, ri: RecvItem) -> None:
        """The context rank cannot use our ring (and refuses it from now on): the item goes over MPI."""
        self.lent.retire(ri.source, ri.ring)
        self.lent.give_back(ri.ring)
        ri.ring = None

    def receive(self, job: RecvJob, ri: RecvItem) -> None:
        if ri.ring_answered:
            if ri.ring.landed != ri.ring_seq:  # the ring's earlier items first (shared_staging.py)
                return
            self._queue_landing(job, ri)
        if ri.landing is not None and ri.landing.query():
            self.side.recycle(ri.landing)
            ri.landing = None
            self.lent.give_back(ri.ring)
            ri.ring = None
            ri.next_done = len(ri.chunking.chunks())
            job.bytes += ri.queued_bytes
            self.io.keep(ri.free_bufs)

    def _queue_landing(self, job: RecvJob, ri: RecvItem) -> None:
        """The context rank has queued every chunk into our ring, and so have we for the ring's
        earlier items: queue every H2D, each behind a GPU-side wait for its slot's "ready" word,
        each followed by the slot's "free" word."""
        ops, _ = stream_ops.load()
        ring, chunks = ri.ring, ri.chunking.chunks()
        with self.side as stream:
            h = stream.cuda_stream
            for k, (slot, ready_at, free) in enumerate(shared_staging.receiver_steps(ri.ring_seq, len(chunks),
                                                                                  ring.slots)):
                lo, hi = chunks[k]
                buf, full = self.io.chunk_dest(job, ri, lo, hi)
                ops.wait_geq(h, ring.ready_flag(slot), ready_at)
                ri.queued_bytes += ring.take(slot, buf, stream)
                ops.write(h, ring.free_flag(slot), free)
                if full is not None:
                    self.io.scatter(job, ri, buf, lo)
                    ri.free_bufs.append(full)  # the next chunk lands in it after this scatter (stream order)
            ri.landing = self.side.record()
        ring.landed = ri.ring_seq + len(chunks)
        ri.ring_answered = False
        self.stats.ring_chunks += len(chunks)


def _max_chunk_bytes(ri: RecvItem, ctx: CacheState) -> int:
    it = ri.item
    block = it.num_layers * 2 * it.num_heads * ctx.block_size * ctx.head_dim * ctx.itemsize
    return block * max(hi - lo for lo, hi in ri.chunking.chunks())

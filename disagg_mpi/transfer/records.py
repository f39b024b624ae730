"""The transceiver's records: a pull being served, a pull being received, their chunks, the
counters, and `BytePath`, the one interface every byte path implements (see transceiver.py).

Plain records, no behaviour beyond `RecvItem.done`: the sides (send_side.py, recv_side.py)
make them, the byte paths (mpi_path.py, ring_path.py, ipc_path.py) fill them in.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..protocol import PullAnswer
from .chunks import Chunking
from .opaque import OpaqueState
from .plan import PlanItem


@dataclass
class TransferStats:
    """What a transceiver counts, declared once; the byte paths add to it."""

    sent_bytes: int = 0  # bytes served as a context rank (one-sided IPC pulls never reach us)
    ring_chunks: int = 0  # chunks that went through a shared ring (either side; stats / tests)
    ipc_one_sided: int = 0  # IPC items pulled without any message (the pool was mapped already)
    ipc_copy_seconds: list[float] = field(default_factory=list)  # per IPC item: copies queued .. seen complete


@dataclass
class OutChunk:
    """One chunk on its way out: posted to MPI once `event` (its D2H / GPU gather) is done."""

    msg: Any  # what MPI sends (numpy view of host / pinned memory, or a CUDA tensor)
    event: Any = None  # torch.cuda.Event, None on the host path
    full: torch.Tensor | None = None  # chunk buffer to reuse
    pinned: torch.Tensor | None = None  # pinned staging buffer to give back
    req: Any = None  # the Isend


@dataclass
class InChunk:
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
class SendJob:
    """Context side: one pull message being served (its path is chosen when it is accepted)."""

    dest: int
    tag: int
    blocks: list[int]
    slices: tuple[slice, slice]  # ctx-local layers, heads
    chunking: Chunking
    path: BytePath | None = None  # how its bytes move (send_side.py picks it)
    next_chunk: int = 0
    inflight: deque = field(default_factory=deque)  # OutChunk, in chunk order
    free_bufs: list = field(default_factory=list)  # reusable chunk buffers (copy path)
    direct: bool = False  # copy path, but the item is our whole slice: contiguous runs skip the pack
    bytes: int = 0
    header: PullAnswer | None = None  # owed to a generation rank that asked for CUDA IPC or a ring
    ready: Any = None  # IPC: event on our compute stream; the pool holds the KV once it is done
    done_req: Any = None  # IPC: receive of the generation rank's "done"
    ring: Any = None  # shared_staging.Ring the generation rank lent us for this pull
    ring_seq: int = 0  # the pull's first chunk number in the ring
    copied: Any = None  # ring: event after the last chunk's D2H (all queued at once)


@dataclass
class RecvItem:
    """Generation side: one plan item of a pull (its path is known once it is started or answered)."""

    item: PlanItem
    source: int
    tag: int
    chunking: Chunking
    slices: tuple[slice, slice]  # gen-local layers, heads
    path: BytePath | None = None  # how its bytes move (recv_side.py sets it; None: waiting for the answer)
    next_post: int = 0
    next_done: int = 0
    posted: deque = field(default_factory=deque)  # InChunk, in chunk order
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
class RecvJob:
    """Generation side: one request's pull on this rank, item after item (or all at once)."""

    req_id: int
    blocks: list[int]  # this rank's blocks for the request
    opaque: OpaqueState  # where the KV is (items are asked for one after another)
    items: list[RecvItem]
    t0: float = field(default_factory=time.perf_counter)
    bytes: int = 0


class BytePath(Protocol):
    """One way a plan item's bytes go from a context rank's pool to a generation rank's: chunks
    over MPI (host, staged or CUDA-aware: mpi_path.py), the shared staging ring (ring_path.py)
    or CUDA IPC (ipc_path.py). Each is called again on every poll() until its work is done."""

    def send(self, job: SendJob) -> bool:
        """Context side: progress the job; True once it is done (its blocks may be freed)."""
        ...

    def receive(self, job: RecvJob, ri: RecvItem) -> None:
        """Generation side: progress the item (`ri.done` says when its bytes are in our blocks)."""
        ...

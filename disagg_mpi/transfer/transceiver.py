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
  a ring of shared, page-locked staging slots; the bytes cross host memory
  once, and the two ranks' streams wait for each other on the GPU through
  flags next to the slots, so MPI carries one answer per pull
  (`shared_staging.py`; off with `shared_staging: false`);
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
from typing import Any

import torch

from ..api import CacheTransceiverConfig
from ..protocol import KV_FIRST_DATA_TAG
from . import cuda_ipc, shared_staging
from .cache_state import CacheState
from .recv_side import RecvSide, _RecvJob
from .send_side import SendSide, _SendJob
from .staging import PinnedBuffers, SideStream

log = logging.getLogger(__name__)
BACKENDS = ("auto", "ipc", "staged", "cuda_aware_mpi")

_KEEP_BUFFERS = 4  # chunk buffers a transceiver keeps for its next transfers


class KvTransceiver(SendSide, RecvSide):
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
        self._next_tag = KV_FIRST_DATA_TAG
        self._send_queue: deque[_SendJob] = deque()
        self._probe: tuple | None = None  # (MPI.Status, MPI.ANY_SOURCE) for _accept_pulls
        self._sending: list[_SendJob] = []
        self._recv: dict[int, _RecvJob] = {}
        # Pull messages on their way (MPI_Isend): one for a long prompt (its block ids) is past the
        # eager limit, and a blocking send would hold this rank until the context rank's loop,
        # which polls between model steps, posts the receive.
        self._outbox: list[Any] = []
        self.sent_bytes = 0  # bytes served as a context rank (one-sided IPC pulls never reach us)
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
        self._ipc_pairs: dict[int, tuple] = {}  # context rank -> (that description, block_copy.PoolPair)
        self._plans: dict[CacheState, list] = {}  # context layout -> our plan items (see _plan_items)
        self._rings: shared_staging.RingPool | None = None  # generation side: rings we lend
        self._ring_maps: shared_staging.RingMaps | None = None  # context side: rings lent to us
        # Context side (send_side): ring pulls not started yet, in the order asked; the generation
        # rank that those on our GPU go to, and how many they are; rings we refused.
        self._ring_order: deque = deque()
        self._ring_peer: int | None = None
        self._ring_live = 0
        self._rings_refused: set[str] = set()
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
        self._ipc_pairs.clear()
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

    # ---- both ------------------------------------------------------------

    def poll(self) -> list[tuple[int, int, float]]:
        """Progress everything; returns (req_id, bytes, seconds) of receives finished here.

        Receives first: a one-sided IPC pull is done as soon as its copy is, and the MPI probe
        for new pulls would only delay noticing it."""
        finished = []
        if self._outbox:
            self._outbox = [r for r in self._outbox if not r.Test()]
        for req_id, job in list(self._recv.items()):
            if self._progress_recv(job):
                del self._recv[req_id]
                finished.append((req_id, job.bytes, time.perf_counter() - job.t0))
        self._accept_pulls()
        limit = self.cfg.send_concurrency if self.cfg.parallel_send else 1
        while self._send_queue and len(self._sending) < limit:
            self._sending.append(self._send_queue.popleft())
        self._sending = [j for j in self._sending if not self._progress_send(j)]
        return finished

    @property
    def busy(self) -> bool:
        return bool(self._recv or self._sending or self._send_queue or self._outbox)

    @property
    def exports_ipc(self) -> bool:
        """Whether a same-node generation rank may map our pool (CUDA IPC) and copy from it unasked."""
        return self._exporter is not None and self.backend in ("auto", "ipc")

    @property
    def receiving(self) -> bool:
        return bool(self._recv)

    def _alloc_tag(self) -> int:
        tag = self._next_tag
        self._next_tag = tag + 1 if tag + 1 < self._tag_ub else KV_FIRST_DATA_TAG
        return tag


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI

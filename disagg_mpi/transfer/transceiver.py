"""Moves KV blocks between ranks over MPI (host memory): the pull protocol.

Worker side of the connector (vLLM's split): it only moves bytes. The engine
decides *what* to pull and *when* to free; this file progresses non-blocking
sends and receives each time the rank's loop calls `poll()`, so neither side
ever blocks its step loop on a peer.

Protocol, per (generation rank, plan item):
1. the generation rank sends a `PullAsk` (tag KV_PULL) to the context rank
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

The code, a small core and one class per byte path (each declares its state):
- `KvTransceiver` (here): set-up (which mode, which paths are usable on this
  rank), `poll()`, the public surface; it owns the parts below and hands each
  what it uses in its constructor;
- `SendSide` (send_side.py): the context side of the protocol: takes `PullAsk`s,
  picks each pull's path (answering why not IPC / the ring when one was asked
  for), progresses at most `send_concurrency` pulls;
- `RecvSide` (recv_side.py): the generation side: plan items, tags, `PullAsk`s,
  the answer that names the path, one-sided IPC pulls;
- the byte paths, behind one interface (`records.BytePath`: `send(job)` on the
  context side, `receive(job, item)` on the generation side):
  `HostMpi`, `StagedMpi`, `CudaAwareMpi` (mpi_path.py: chunks over MPI, one
  class per way a chunk meets MPI), `RingPath` (ring_path.py: the shared
  staging ring, both sides and the ring order), `IpcPath` (ipc_path.py: the
  exported pool, the mapped pools, one-sided pulls);
- `PoolIO` (pool_io.py): this rank's pool as the paths see it: chunk
  buffers, packing a chunk, landing one;
- records.py: the records (`SendJob`, `RecvJob`, `RecvItem`, their chunks) and
  the counters (`TransferStats`: sent_bytes, ring_chunks, ipc_one_sided,
  ipc_copy_seconds).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

import torch

from ..api import CacheTransceiverConfig
from . import cuda_ipc, shared_staging
from .cache_state import CacheState
from .ipc_path import IpcPath
from .mpi_path import CudaAwareMpi, HostMpi, MpiPath, StagedMpi
from .opaque import OpaqueState
from .pool_io import PoolIO
from .records import TransferStats
from .recv_side import RecvSide
from .ring_path import RingPath
from .send_side import SendSide
from .staging import SideStream

log = logging.getLogger(__name__)
BACKENDS = ("auto", "ipc", "staged", "cuda_aware_mpi")


class KvTransceiver:
    """One per rank. `pool` is this rank's KV pool; `state` its executor's layout.

    `mode` is how this rank's chunks meet MPI: "host" (CPU pool), "staged" (CUDA pool,
    pinned host buffers) or "cuda_aware" (CUDA pool, MPI reads/writes device memory);
    `want_ipc` whether its pulls ask same-node context ranks for CUDA IPC. The byte paths
    are `mpi` (always), `ipc` and `ring` (None where not usable); `sender` and `receiver`
    are the two sides of the protocol, which pick a path per pull.
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
        self.backend = str(getattr(cfg, "backend", None) or "auto")
        if self.backend not in BACKENDS:
            raise ValueError(f"cache transceiver backend {self.backend!r} is not known; allowed: "
                             f"{', '.join(BACKENDS)}")
        self.stats = TransferStats()
        self.mode, self.want_ipc, self.ipc_reason = "host", False, "the KV pool is not on CUDA"
        self.ring_reason: str | None = "the KV pool is not on CUDA"
        self.node = ""
        self.side: SideStream | None = None
        if pool.is_cuda:
            self._setup_cuda()
        self.io = PoolIO(pool, state, self.side, cfg.async_buffer)
        self.mpi: MpiPath = self._mpi_path()
        self.ipc: IpcPath | None = None
        self.ring: RingPath | None = None
        if self.ipc_reason is None:
            self.ipc = IpcPath(comm, self.io, self.stats, self.side)
            # Mappings are closed when the transceiver goes away or at exit, whichever comes first.
            weakref.finalize(self, self.ipc.mapper.close)
        if self.ring_reason is None:
            self.ring = RingPath(comm, self.io, self.stats, self.side, self.node)
            weakref.finalize(self, self.ring.lent.close)
            weakref.finalize(self, self.ring.maps.close)
        self.sender = SendSide(comm, self.io, local_rank, cfg, mode=self.mode, backend=self.backend,
                               node=self.node, mpi=self.mpi, ipc=self.ipc, ipc_reason=self.ipc_reason,
                               ring=self.ring, ring_reason=self.ring_reason)
        lender = self.ring if self.mode == "staged" and not self.want_ipc else None
        self.receiver = RecvSide(comm, self.io, local_rank, cfg, mode=self.mode, want_ipc=self.want_ipc,
                                 node=self.node, side=self.side, stats=self.stats, mpi=self.mpi, ipc=self.ipc,
                                 lender=lender)

    def _setup_cuda(self) -> None:
        """Pick the mode and see which same-node paths (CUDA IPC, shared ring) are usable here."""
        from ..runtime.devices import mpi_cuda_support, node_name

        self.node = node_name()
        self.side = SideStream(self.pool.device)
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
        self.want_ipc = self.backend in ("auto", "ipc") and self.ipc_reason is None
        self.ring_reason = shared_staging.available() if self.cfg.shared_staging else "shared_staging is off"

    def _mpi_path(self) -> MpiPath:
        if self.mode == "host":
            return HostMpi(self.comm, self.io, self.stats)
        if self.mode == "cuda_aware":
            return CudaAwareMpi(self.comm, self.io, self.stats, self.side)
        return StagedMpi(self.comm, self.io, self.stats, self.side)

    def close(self) -> None:
        """Close the CUDA IPC mappings and drop staging buffers (at executor shutdown)."""
        if self.ipc is not None:
            self.ipc.close()
        self.mpi.close()
        if self.ring is not None:
            self.ring.close()
        self.io.clear()

    # ---- both ------------------------------------------------------------

    def poll(self) -> list[tuple[int, int, float]]:
        """Progress everything; returns (req_id, bytes, seconds) of receives finished here.

        Receives first: a one-sided IPC pull is done as soon as its copy is, and the MPI probe
        for new pulls would only delay noticing it."""
        finished = self.receiver.poll()
        self.sender.poll()
        return finished

    def start_pull(self, req_id: int, opaque: OpaqueState, my_blocks: list[int]) -> None:
        """Ask the context ranks for this rank's share of a request's KV (see RecvSide.start_pull)."""
        self.receiver.start_pull(req_id, opaque, my_blocks)

    def order_joins(self, on: bool) -> None:
        """GPU-ordered joins for this rank's one-sided IPC pulls (an executor leader's; ipc_path.py)."""
        if self.ipc is not None:
            self.ipc.ordered = on

    def unsettled(self, req_id: int) -> bool:
        """Whether a finished pull's copy may still be reading the context's pool (ipc_path.py)."""
        return self.receiver.unsettled(req_id)

    def one_sided_ready(self, opaque: OpaqueState) -> bool:
        """Whether a pull of `opaque` needs no context rank at all (see RecvSide.one_sided_ready)."""
        return self.receiver.one_sided_ready(opaque)

    @property
    def busy(self) -> bool:
        return self.receiver.busy or self.sender.busy

    @property
    def exports_ipc(self) -> bool:
        """Whether a same-node generation rank may map our pool (CUDA IPC) and copy from it unasked."""
        return self.ipc is not None and self.backend in ("auto", "ipc")

    @property
    def receiving(self) -> bool:
        return self.receiver.receiving

    # ---- counters (TransferStats) ----------------------------------------------

    @property
    def sent_bytes(self) -> int:
        """Bytes served as a context rank (one-sided IPC pulls never reach us)."""
        return self.stats.sent_bytes

    @property
    def ring_chunks(self) -> int:
        """Chunks that went through a shared ring (either side)."""
        return self.stats.ring_chunks

    @property
    def ipc_one_sided(self) -> int:
        """IPC items pulled without any message (the pool was mapped already)."""
        return self.stats.ipc_one_sided

    @property
    def ipc_copy_seconds(self) -> list[float]:
        """Per IPC item (the last 64): copies queued .. seen complete."""
        return self.stats.ipc_copy_seconds

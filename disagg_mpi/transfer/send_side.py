"""The context side of the pull protocol: take pull messages, pick a byte path, serve (see
transceiver.py).

Per pull message `SendSide` makes a `SendJob` and picks its path:
- CUDA IPC (`IpcPath`: answer with the pool's handle, wait for "done"), if the generation
  rank asked for it and may have it;
- the generation rank's shared staging ring (`RingPath`: every chunk's D2H into slot
  k % slots queued at once), if it lent one and we can use it;
- else chunks over MPI (this rank's `MpiPath`: host memory, pinned staging or CUDA-aware
  MPI), after an answer saying why not IPC / the ring when one was asked for.
At most `send_concurrency` jobs progress at once (1 without `parallel_send`).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ..api import CacheTransceiverConfig
from ..protocol import KV_PULL, PullAnswer, PullAsk, PullPath, decode
from .chunks import Chunking
from .ipc_path import IpcPath
from .mpi_path import MpiPath
from .pool_io import PoolIO
from .records import SendJob
from .ring_path import RingPath


class SendSide:
    """Serves pulls as a context rank. `mode`, `backend`, `node` and the two reasons are the
    transceiver's (see KvTransceiver); `ipc` and `ring` are None where that path is not usable."""

    def __init__(self, comm: Any, io: PoolIO, local_rank: int, cfg: CacheTransceiverConfig, *, mode: str,
                 backend: str, node: str, mpi: MpiPath, ipc: IpcPath | None, ipc_reason: str | None,
                 ring: RingPath | None, ring_reason: str | None):
        self.comm = comm
        self.io = io
        self.local_rank = local_rank
        self.cfg = cfg
        self.mode = mode
        self.backend = backend
        self.node = node
        self.mpi = mpi
        self.ipc = ipc
        self.ipc_reason = ipc_reason
        self.ring = ring
        self.ring_reason = ring_reason
        self._probe: tuple | None = None  # (MPI.Status, MPI.ANY_SOURCE) for accept_pulls
        self._queue: deque[SendJob] = deque()  # accepted, not progressing yet
        self._sending: list[SendJob] = []
        self._rings_refused: set[str] = set()  # rings we refused: their later pulls would wait for gaps

    @property
    def busy(self) -> bool:
        return bool(self._sending or self._queue)

    def poll(self) -> None:
        """Take new pulls, then progress up to send_concurrency jobs."""
        self.accept_pulls()
        limit = self.cfg.send_concurrency if self.cfg.parallel_send else 1
        while self._queue and len(self._sending) < limit:
            self._sending.append(self._queue.popleft())
        self._sending = [j for j in self._sending if not j.path.send(j)]

    def accept_pulls(self) -> None:
        if self._probe is None:  # made once: this runs on every poll(), on the path of every pull
            self._probe = (_mpi().Status(), _mpi().ANY_SOURCE)
        status, anyone = self._probe
        while self.comm.Iprobe(source=anyone, tag=KV_PULL, status=status):
            src = status.Get_source()
            msg = decode(self.comm.recv(source=src, tag=KV_PULL), KV_PULL)
            if not isinstance(msg, PullAsk):
                raise TypeError(f"rank {src} sent {msg!r:.120} on the KV pull tag")
            self._queue.append(self._job(src, msg))

    def _job(self, src: int, msg: PullAsk) -> SendJob:
        """The job serving pull `msg` from rank `src`, with its byte path picked."""
        ctx = self.io.state
        c_stage, c_tp = ctx.coords(self.local_rank)
        l0 = ctx.layer_range(c_stage)[0]
        h0 = ctx.kv_head_range(c_tp)[0]
        layers = slice(msg.layers[0] - l0, msg.layers[1] - l0)
        heads = slice(msg.heads[0] - h0, msg.heads[1] - h0)
        chunking = Chunking(msg.zero_copy, msg.per_chunk, len(msg.blocks), msg.bounds)
        job = SendJob(src, msg.tag, msg.blocks, (layers, heads), chunking, path=self.mpi)
        pool = self.io.pool
        job.direct = (self.cfg.zero_copy and layers.stop - layers.start == pool.shape[1]
                      and heads.stop - heads.start == pool.shape[3])
        if msg.ipc_node is not None:
            why = self._ipc_refusal(msg)
            if why is None:
                job.path = self.ipc
                self.ipc.accept(job, layers, heads)
            else:
                job.header = PullAnswer(PullPath.COPY, why)
        elif msg.ring is not None:
            why = self._ring_refusal(msg.ring)
            if why is None:
                try:
                    busy = {j.ring.path for j in (*self._sending, *self._queue) if j.ring is not None}
                    self.ring.accept(job, msg.ring, busy)
                    job.path = self.ring
                except (OSError, ValueError, RuntimeError) as err:
                    why = f"cannot map the shared ring {msg.ring.get('path')}: {err}"
            if why is not None:  # its later pulls would wait for chunk numbers this one skips
                self._rings_refused.add(msg.ring.get("path"))
            job.header = PullAnswer(PullPath.RING) if why is None else PullAnswer(PullPath.COPY, why)
        return job

    def _ipc_refusal(self, ask: PullAsk) -> str | None:
        """None if we can let this generation rank map our pool, else why not."""
        if not self.io.pool.is_cuda:
            return "the context pool is not on CUDA"
        if self.backend in ("staged", "cuda_aware_mpi"):
            return f"the context rank's backend is {self.backend}"
        if self.ipc is None:
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
        if self.ring is None:
            return f"shared staging is not usable on the context rank: {self.ring_reason}"
        if ring.get("node") != self.node:
            return f"different nodes ({ring.get('node')} vs {self.node})"
        return None


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI

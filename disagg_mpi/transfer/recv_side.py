"""The generation side of the pull protocol: ask, learn the byte path, receive (see transceiver.py).

`RecvSide.start_pull` makes one `RecvItem` per plan item and, per item, either copies from
the context rank's mapped pool at once (one-sided CUDA IPC: the pool was mapped by an
earlier pull), or sends a pull message (`PullAsk`) and then, by the answer (`PullAnswer`),
- maps the pool and copies (`IpcPath`: the context rank answered with its IPC handle),
- copies chunks out of the shared ring it lent (`RingPath`: answer "ring"), or
- receives chunks over MPI (this rank's `MpiPath`: host memory, pinned staging, CUDA-aware
  MPI); no answer comes first when neither IPC nor a ring was asked for.
Items start one after another (all at once with `parallel_receive`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..api import CacheTransceiverConfig
from ..protocol import KV_FIRST_DATA_TAG, KV_PULL, PullAnswer, PullAsk, PullPath, decode, encode
from . import shared_staging
from .cache_state import CacheState
from .chunks import WINDOW, Chunking, chunking_for
from .ipc_path import IpcPath
from .mpi_path import MpiPath
from .opaque import OpaqueState
from .plan import PlanItem, local_slices, make_plan
from .pool_io import PoolIO
from .records import RecvItem, RecvJob, TransferStats
from .ring_path import RingPath
from .staging import SideStream

log = logging.getLogger(__name__)


class RecvSide:
    """Pulls as a generation rank. `mode`, `want_ipc` and `node` are the transceiver's (see
    KvTransceiver); `ipc` is None where CUDA IPC is not usable, `lender` (the ring path) where
    this rank lends no rings (not staged, or it asks for IPC)."""

    def __init__(self, comm: Any, io: PoolIO, local_rank: int, cfg: CacheTransceiverConfig, *, mode: str,
                 want_ipc: bool, node: str, side: SideStream | None, stats: TransferStats, mpi: MpiPath,
                 ipc: IpcPath | None, lender: RingPath | None):
        self.comm = comm
        self.io = io
        self.local_rank = local_rank
        self.cfg = cfg
        self.mode = mode
        self.want_ipc = want_ipc
        self.node = node
        self.side = side
        self.stats = stats
        self.mpi = mpi
        self.ipc = ipc
        self.lender = lender
        self._tag_ub = min(int(comm.Get_attr(_mpi().TAG_UB) or 32767), 1 << 30)
        self._next_tag = KV_FIRST_DATA_TAG
        self._recv: dict[int, RecvJob] = {}
        # Pull messages on their way (MPI_Isend): one for a long prompt (its block ids) is past the
        # eager limit, and a blocking send would hold this rank until the context rank's loop,
        # which polls between model steps, posts the receive.
        self._outbox: list[Any] = []
        self._plans: dict[CacheState, list] = {}  # context layout -> our plan items (see _plan_items)

    @property
    def busy(self) -> bool:
        return bool(self._recv or self._outbox or (self.ipc is not None and self.ipc.settling))

    def unsettled(self, req_id: int) -> bool:
        """Whether a finished pull's copy may still be reading the context's pool (ipc_path.py)."""
        return self.ipc is not None and self.ipc.unsettled(req_id)

    @property
    def receiving(self) -> bool:
        return bool(self._recv)

    def poll(self) -> list[tuple[int, int, float]]:
        """Progress every pull; returns (req_id, bytes, seconds) of those finished here."""
        finished = []
        if self.ipc is not None and self.ipc.settling:
            self.ipc.settle()
        if self._outbox:
            self._outbox = [r for r in self._outbox if not r.Test()]
        for req_id, job in list(self._recv.items()):
            if self._progress(job):
                del self._recv[req_id]
                finished.append((req_id, job.bytes, time.perf_counter() - job.t0))
        return finished

    def start_pull(self, req_id: int, opaque: OpaqueState, my_blocks: list[int]) -> None:
        """Ask the context ranks for this rank's share of a request's KV (or copy it at once: IPC).

        Ordered for latency: a one-sided IPC item's copy is queued first, and the bookkeeping
        (the job, the item, the completion event) runs while the GPU copies."""
        t0 = time.perf_counter()
        ctx = opaque.cache_state
        if self.side is not None:  # our new blocks may still be read by queued steps of their last owner
            self.side.after_compute()
        items = self._plan_items(ctx)
        job = None
        for it, slices, direct, whole in items:
            source = opaque.world_ranks[it.ctx_rank]
            one_sided = self.want_ipc and source in self.ipc.peers
            if one_sided and whole and (self.cfg.parallel_receive or job is None):
                # The common case, on the critical path: whole blocks from a mapped pool. Queue the
                # copy before making any bookkeeping, the job's included (measured: ~15 us earlier).
                nblk = -(-opaque.num_tokens // ctx.block_size)
                nbytes = self.ipc.copy_whole(my_blocks, opaque.block_ids, source, self.ipc.peers[source], nblk)
                job = job or _new_job(req_id, opaque, my_blocks, t0)
                ri = RecvItem(it, source, 0, Chunking(True, 1, nblk), slices, path=self.ipc, one_sided=True,
                              direct=direct, started=True, queued_bytes=nbytes, ipc_event=self.side.record(),
                              ipc_t0=time.perf_counter())
                self.stats.ipc_one_sided += 1
                job.items.append(ri)
                continue
            job = job or _new_job(req_id, opaque, my_blocks, t0)
            ring = self.lender is not None and self.lender.may_lend(source)  # else cut for MPI: WINDOW chunks
            # One-sided IPC needs no chunk bounds (nothing crosses the wire): skip computing them.
            ids = (None, None) if one_sided else (opaque.block_ids, my_blocks)
            ri = RecvItem(it, source, self._alloc_tag(),
                          chunking_for(it, ctx, self.io.state, self.local_rank, opaque.num_tokens,
                                       self.cfg, *ids, staged=self.mode == "staged",
                                       window=shared_staging.SLOTS if ring else WINDOW),
                          slices, one_sided=one_sided, direct=direct)
            job.items.append(ri)
            if self.cfg.parallel_receive or len(job.items) == 1:
                self._start_item(job, ri)
        self._recv[req_id] = job or _new_job(req_id, opaque, my_blocks, t0)

    def one_sided_ready(self, opaque: OpaqueState) -> bool:
        """Whether a pull of `opaque` is all one-sided: whole blocks over CUDA IPC from context
        pools this rank has mapped, so no context rank takes part (or even answers)."""
        if not self.want_ipc:
            return False
        return all(whole and opaque.world_ranks[it.ctx_rank] in self.ipc.peers
                   for it, _, _, whole in self._plan_items(opaque.cache_state))

    def _plan_items(self, ctx: CacheState) -> list[tuple[PlanItem, tuple[slice, slice], bool, bool]]:
        """This rank's plan items from a context layout (cached per layout): each with our slices,
        `direct` (the item is our whole slice, same block size) and `whole` (and the context
        rank's whole slice too: blocks move pool to pool, the zero-copy case of chunking_for)."""
        got = self._plans.get(ctx)
        if got is None:
            got = []
            state, pool = self.io.state, self.io.pool
            for it in make_plan(ctx, state)[self.local_rank]:
                sl = local_slices(it, ctx, state, self.local_rank)
                direct = (self.cfg.zero_copy and ctx.block_size == state.block_size
                          and it.num_layers == pool.shape[1] and it.num_heads == pool.shape[3])
                c_stage, _ = ctx.coords(it.ctx_rank)
                whole = (direct and it.num_layers == ctx.layer_split[c_stage]
                         and it.num_heads == ctx.local_kv_heads)
                got.append((it, (sl.gen_layers, sl.gen_heads), direct, whole))
            self._plans[ctx] = got
        return got

    def _start_item(self, job: RecvJob, ri: RecvItem) -> None:
        ri.started = True
        if ri.one_sided:
            self.stats.ipc_one_sided += 1
            ri.path = self.ipc
            self.ipc.pull(job, ri, self.ipc.peers[ri.source])
        else:
            self._request(job, ri, job.opaque)

    def _request(self, job: RecvJob, ri: RecvItem, opaque: OpaqueState) -> None:
        it = ri.item
        ring = None
        if self.lender is not None:
            ring = self.lender.lend(ri, opaque.cache_state, self.cfg.buffer_bytes)
        ask = PullAsk(ri.tag, list(opaque.block_ids[: ri.chunking.num_ctx_blocks]), [it.layer_start, it.layer_end],
                      [it.head_start, it.head_end], ri.chunking.zero_copy, ri.chunking.blocks_per_chunk,
                      opaque.cache_state.to_dict(), ri.chunking.bounds, self.node if self.want_ipc else None, ring)
        self._outbox.append(self.comm.isend(encode(ask), dest=ri.source, tag=KV_PULL))
        if self.want_ipc or ring is not None:  # first the context rank's answer: IPC handle, ring, or copy
            ri.hdr_req = self.comm.irecv(bytearray(1 << 16), source=ri.source, tag=ri.tag)
        else:
            ri.path = self.mpi
            self.mpi.post(job, ri)

    def _on_answer(self, job: RecvJob, ri: RecvItem, payload: bytes) -> None:
        hdr = decode(payload)
        if not isinstance(hdr, PullAnswer):
            raise TypeError(f"rank {ri.source} answered a pull with {hdr!r:.120}")
        if hdr.path == PullPath.IPC:
            ri.path = self.ipc
            self.ipc.answered(job, ri, hdr.ipc)
            return
        if hdr.path == PullPath.RING:
            ri.path = self.lender
            ri.ring_answered = True  # queued in the ring's order (RingPath.receive)
            return
        if ri.ring is not None:  # the context rank cannot use our ring (and refuses it from now on)
            self.lender.refused(ri)
        if hdr.path == PullPath.COPY:
            log.debug("rank %d: no CUDA IPC / shared ring with rank %d (%s); copying over MPI",
                      self.comm.Get_rank(), ri.source, hdr.why)
        ri.path = self.mpi
        self.mpi.post(job, ri)

    def _progress(self, job: RecvJob) -> bool:
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
                self._on_answer(job, ri, hdr)
            ri.path.receive(job, ri)
        return all(ri.done for ri in job.items)

    def _alloc_tag(self) -> int:
        tag = self._next_tag
        self._next_tag = tag + 1 if tag + 1 < self._tag_ub else KV_FIRST_DATA_TAG
        return tag


def _new_job(req_id: int, opaque: OpaqueState, my_blocks: list[int], t0: float) -> RecvJob:
    return RecvJob(req_id, list(my_blocks), opaque, [], t0)


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI

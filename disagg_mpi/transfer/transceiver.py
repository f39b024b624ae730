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
   (at most two chunks in flight) and `Isend`s chunk after chunk on the reply
   tag, or, when both sides hold exactly the same slice and block size
   (zero-copy), sends each block straight from its pool;
3. the generation rank receives chunks (at most two posted ahead) and scatters
   them into its own blocks; when every item is in, `poll()` reports the
   request as done on this rank.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from ..api import CacheTransceiverConfig
from .cache_state import CacheState
from .opaque import OpaqueState
from .plan import PlanItem, local_slices, make_plan

TAG_PULL = 1
_FIRST_DATA_TAG = 100
_WINDOW = 2  # chunks in flight per transfer: double buffering


def _np(t: torch.Tensor) -> Any:
    """A numpy view MPI can move (bf16 has no MPI datatype: send its bytes)."""
    return t.view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy()


@dataclass
class _Chunking:
    zero_copy: bool
    blocks_per_chunk: int
    num_ctx_blocks: int

    def chunks(self) -> list[tuple[int, int]]:
        k = self.blocks_per_chunk
        return [(i, min(i + k, self.num_ctx_blocks)) for i in range(0, self.num_ctx_blocks, k)]


def _chunking(item: PlanItem, ctx: CacheState, gen: CacheState, gen_rank: int, num_tokens: int,
              cfg: CacheTransceiverConfig) -> _Chunking:
    c_stage, c_tp = ctx.coords(item.ctx_rank)
    g_stage, g_tp = gen.coords(gen_rank)
    whole_ctx = (item.num_layers == ctx.layer_split[c_stage]
                 and item.num_heads == ctx.local_kv_heads)
    whole_gen = (item.num_layers == gen.layer_split[g_stage]
                 and item.num_heads == gen.local_kv_heads)
    nblocks = -(-num_tokens // ctx.block_size)
    zero_copy = cfg.zero_copy and whole_ctx and whole_gen and ctx.block_size == gen.block_size
    block_bytes = item.num_layers * 2 * item.num_heads * ctx.block_size * ctx.head_dim * ctx.itemsize
    per_chunk = 1 if zero_copy else max(1, cfg.buffer_bytes // max(1, block_bytes))
    return _Chunking(zero_copy, per_chunk, nblocks)


@dataclass
class _SendJob:
    dest: int
    tag: int
    blocks: list[int]
    slices: tuple[slice, slice]  # ctx-local layers, heads
    chunking: _Chunking
    next_chunk: int = 0
    inflight: deque = field(default_factory=deque)  # (mpi request, buffer)
    bytes: int = 0


@dataclass
class _RecvItem:
    item: PlanItem
    source: int
    tag: int
    chunking: _Chunking
    slices: tuple[slice, slice]  # gen-local layers, heads
    next_post: int = 0
    next_done: int = 0
    posted: deque = field(default_factory=deque)  # (mpi request, buffer, chunk index)
    started: bool = False


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
    """One per rank. `pool` is this rank's KV pool; `state` its executor's layout."""

    def __init__(self, comm: Any, pool: torch.Tensor, state: CacheState, local_rank: int,
                 cfg: CacheTransceiverConfig):
        self.comm = comm
        self.pool = pool
        self.state = state
        self.local_rank = local_rank
        self.cfg = cfg
        self._tag_ub = min(int(comm.Get_attr(_mpi().TAG_UB) or 32767), 1 << 30)
        self._next_tag = _FIRST_DATA_TAG
        self._send_queue: deque[_SendJob] = deque()
        self._sending: list[_SendJob] = []
        self._recv: dict[int, _RecvJob] = {}
        self.sent_bytes = 0

    # ---- generation side -------------------------------------------------

    def start_pull(self, req_id: int, opaque: OpaqueState, my_blocks: list[int]) -> None:
        """Ask the context ranks for this rank's share of a request's KV."""
        ctx = opaque.cache_state
        plan = make_plan(ctx, self.state)[self.local_rank]
        items = []
        for it in plan:
            sl = local_slices(it, ctx, self.state, self.local_rank)
            items.append(_RecvItem(it, opaque.world_ranks[it.ctx_rank], self._alloc_tag(),
                                   _chunking(it, ctx, self.state, self.local_rank, opaque.num_tokens,
                                             self.cfg), (sl.gen_layers, sl.gen_heads)))
        job = _RecvJob(req_id, list(my_blocks), ctx.block_size, opaque.num_tokens, items)
        self._recv[req_id] = job
        for ri in items if self.cfg.parallel_receive else items[:1]:
            self._request(job, ri, opaque)
        job.opaque = opaque  # type: ignore[attr-defined] - kept for sequential receive

    def _request(self, job: _RecvJob, ri: _RecvItem, opaque: OpaqueState) -> None:
        it = ri.item
        msg = {"tag": ri.tag, "blocks": list(opaque.block_ids[: ri.chunking.num_ctx_blocks]),
               "layers": [it.layer_start, it.layer_end], "heads": [it.head_start, it.head_end],
               "zero_copy": ri.chunking.zero_copy, "per_chunk": ri.chunking.blocks_per_chunk,
               "cache_state": opaque.cache_state.to_dict()}
        self.comm.send(msgpack.packb(msg), dest=ri.source, tag=TAG_PULL)
        ri.started = True
        self._post_recvs(job, ri)

    def _post_recvs(self, job: _RecvJob, ri: _RecvItem) -> None:
        chunks = ri.chunking.chunks()
        while ri.next_post < len(chunks) and len(ri.posted) < _WINDOW:
            lo, hi = chunks[ri.next_post]
            if ri.chunking.zero_copy:  # receive straight into our block
                buf = self.pool[job.blocks[lo]]
            else:
                it = ri.item
                buf = torch.empty((hi - lo, it.num_layers, 2, it.num_heads, job.ctx_block_size,
                                   self.state.head_dim), dtype=self.pool.dtype)
            req = self.comm.Irecv(_np(buf), source=ri.source, tag=ri.tag)
            ri.posted.append((req, buf, ri.next_post))
            ri.next_post += 1

    def _progress_recv(self, job: _RecvJob) -> bool:
        for idx, ri in enumerate(job.items):
            if not ri.started:
                if all(r.next_done == len(r.chunking.chunks()) for r in job.items[:idx]):
                    self._request(job, ri, job.opaque)  # type: ignore[attr-defined]
                else:
                    continue
            while ri.posted and ri.posted[0][0].Test():
                _, buf, ci = ri.posted.popleft()
                lo, hi = ri.chunking.chunks()[ci]
                if not ri.chunking.zero_copy:
                    self._scatter(job, ri, buf, lo)
                job.bytes += buf.numel() * buf.element_size()
                ri.next_done += 1
                self._post_recvs(job, ri)
        return all(ri.next_done == len(ri.chunking.chunks()) for ri in job.items)

    def _scatter(self, job: _RecvJob, ri: _RecvItem, buf: torch.Tensor, first_ctx_block: int) -> None:
        layers, heads = ri.slices
        bs, cbs = self.state.block_size, job.ctx_block_size
        if bs == cbs:
            idx = torch.tensor(job.blocks[first_ctx_block: first_ctx_block + buf.shape[0]])
            view = self.pool[:, layers, :, heads]
            view[idx] = buf
            return
        # Different block sizes: copy token runs (tokens sit on dim 4 of a block).
        tok0 = first_ctx_block * cbs
        ntok = min(buf.shape[0] * cbs, job.num_tokens - tok0)
        for t in range(0, ntok):
            src_b, src_o = divmod(t, cbs)
            g = tok0 + t
            dst_b, dst_o = divmod(g, bs)
            self.pool[job.blocks[dst_b], layers, :, heads, dst_o] = buf[src_b, :, :, :, src_o]

    # ---- context side ----------------------------------------------------

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
            chunking = _Chunking(msg["zero_copy"], msg["per_chunk"], len(msg["blocks"]))
            self._send_queue.append(_SendJob(src, msg["tag"], msg["blocks"], (layers, heads), chunking))

    def _progress_send(self, job: _SendJob) -> bool:
        while job.inflight and job.inflight[0][0].Test():
            job.inflight.popleft()
        chunks = job.chunking.chunks()
        while job.next_chunk < len(chunks) and len(job.inflight) < _WINDOW:
            lo, hi = chunks[job.next_chunk]
            if job.chunking.zero_copy:
                buf = self.pool[job.blocks[lo]]
            else:
                layers, heads = job.slices
                idx = torch.tensor(job.blocks[lo:hi])
                buf = torch.index_select(self.pool[:, layers, :, heads], 0, idx)
            job.inflight.append((self.comm.Isend(_np(buf), dest=job.dest, tag=job.tag), buf))
            job.bytes += buf.numel() * buf.element_size()
            job.next_chunk += 1
        done = job.next_chunk == len(chunks) and not job.inflight
        if done:
            self.sent_bytes += job.bytes
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
        """Forget a receive (its request was cancelled); posted receives are cancelled."""
        job = self._recv.pop(req_id, None)
        if job is None:
            return
        for ri in job.items:
            for req, _, _ in ri.posted:
                req.Cancel()
                req.Wait()

    def _alloc_tag(self) -> int:
        tag = self._next_tag
        self._next_tag = tag + 1 if tag + 1 < self._tag_ub else _FIRST_DATA_TAG
        return tag


def _mpi() -> Any:
    from mpi4py import MPI

    return MPI

"""Where a staged pull through the shared ring spends its time (2 ranks, one node, CUDA).

    mpirun -n 2 python -m mpi4py scripts/probe_ring.py [--sizes 16M 64M] [--slots 8 16]
        [--buffer-bytes 32M] [--json out.json]

Rank 0 is the context rank, rank 1 the generation rank, with the Llama-3.1-8B-shaped
pools of scripts/bench_transfer.py (1 MiB blocks). For each ring (slot count x buffer
size) and payload, rank 1 pulls with `backend: staged` and both ranks stamp the
protocol's steps with `time.perf_counter()` (CLOCK_MONOTONIC: one clock for both
processes of a node), by wrapping the transceiver's methods:

    pull      rank 1 calls start_pull
    accepted  rank 0 has taken the pull message (SendSide._job made its job)
    answer    rank 0 has sent "ring" and starts queueing its D2H copies
    queued    rank 0 has queued every D2H
    header    rank 1 sees the answer
    landing   rank 1 starts queueing its H2D copies ... landed: queued
    done      rank 1's poll() reports the pull done

and CUDA events around each side's queued copies give the GPU spans (`ctx_gpu`: the
context stream from reaching its first wait to its last D2H; `gen_gpu`: likewise for
the H2Ds). Medians in microseconds, next to a plain pinned D2H of the same bytes. A
diagnostic for tuning the ring, not a benchmark of record (bench_transfer.py is).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import Any

import torch
from bench_transfer import MiB, parse_size
from mpi4py import MPI

from disagg_mpi.api import CacheTransceiverConfig
from disagg_mpi.transfer import chunks, shared_staging
from disagg_mpi.transfer.cache_state import CacheState
from disagg_mpi.transfer.opaque import OpaqueState
from disagg_mpi.transfer.transceiver import KvTransceiver

STEPS = ("pull", "request", "isend", "sent", "loop", "recv", "accepted", "send", "answer", "queued", "header", "landing", "landed",
         "done")


class _StampedComm:
    """The transceiver's communicator, stamping the first `recv` (the context rank found the pull)
    and the first `send` (its answer) of each pull."""

    def __init__(self, comm, stamps: dict):
        self._comm, self._stamps = comm, stamps

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def recv(self, *a, **k):
        self._stamps.setdefault("recv", time.perf_counter())
        return self._comm.recv(*a, **k)

    def send(self, *a, **k):
        self._stamps.setdefault("send", time.perf_counter())
        return self._comm.send(*a, **k)

    def isend(self, *a, **k):
        self._stamps.setdefault("isend", time.perf_counter())
        return self._comm.isend(*a, **k)


_uniform = chunks.zero_copy_bounds


def ramp_bounds(ctx_ids: list[int], gen_ids: list[int], max_run: int) -> list[int]:
    """Runs of 1, 2, 4 .. max_run blocks, then max_run, then shrinking again: the first D2H and
    the last H2D, which overlap nothing, are short. Only for one run in both pools."""
    n = len(ctx_ids)
    if not (chunks.is_run(ctx_ids, n) and chunks.is_run(gen_ids, n)) or n < 4:
        return _uniform(ctx_ids, gen_ids, max_run)
    head, size = [], 1
    while size < max_run and sum(head) + 2 * size <= n // 2:
        head.append(size)
        size *= 2
    middle = n - 2 * sum(head)
    runs = head + [min(max_run, middle - i) for i in range(0, middle, max_run)] + head[::-1]
    return [0, *itertools.accumulate(runs)]


def _instrument(tc: KvTransceiver, stamps: dict, gpu: list) -> None:
    """Wrap the methods of the transceiver's parts (its comm is a _StampedComm already)."""
    request = tc.receiver._request

    def stamped_request(*a):
        stamps["request"] = time.perf_counter()
        request(*a)
    tc.receiver._request = stamped_request
    job_for = tc.sender._job

    def job_and_stamp(*a):
        job = job_for(*a)
        stamps["accepted"] = time.perf_counter()
        return job
    tc.sender._job = job_and_stamp
    copies = tc.ring._queue_copies

    def copies_in_side_stream(job):  # the events must go on the side stream, inside the method's `with`
        side = tc.side
        with side:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        stamps["answer"] = time.perf_counter()
        copies(job)
        stamps["queued"] = time.perf_counter()
        with side:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        gpu.append((start, end))
    tc.ring._queue_copies = copies_in_side_stream
    on_header = tc.receiver._on_answer

    def header(job, ri, hdr):
        stamps["header"] = time.perf_counter()
        on_header(job, ri, hdr)
    tc.receiver._on_answer = header
    landing = tc.ring._queue_landing

    def landing_in_side_stream(job, ri):
        side = tc.side
        with side:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        stamps["landing"] = time.perf_counter()
        landing(job, ri)
        stamps["landed"] = time.perf_counter()
        with side:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        gpu.append((start, end))
    tc.ring._queue_landing = landing_in_side_stream


def _setup(sizes: list[int]):
    """(world, rank, device, layout, pool): rank r on GPU r % GPUs, a Llama-3.1-8B-shaped KV pool
    (1 MiB blocks) large enough for the largest payload."""
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    dev = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    state = CacheState.create(32, 8, 128, 8, "bfloat16")
    max_blocks = max(sizes) // (state.bytes_per_token_per_rank(0) * state.block_size)
    pool = torch.zeros((max_blocks, 32, 2, 8, state.block_size, 128), dtype=torch.bfloat16, device=dev)
    return world, rank, dev, state, pool


def probe(args: argparse.Namespace) -> dict[str, Any]:
    world, rank, dev, state, pool = _setup(args.sizes)
    bs = state.block_size
    block_bytes = state.bytes_per_token_per_rank(0) * bs
    if rank == 0:
        pool.fill_(1.0)
    host = torch.empty(max(args.sizes), dtype=torch.uint8, pin_memory=True)
    src = torch.ones(max(args.sizes), dtype=torch.uint8, device=dev)
    rows = []
    req_ids = iter(range(1, 1 << 30))
    for slots, ramp in [(s, r) for s in args.slots for r in ((False, True) if args.ramp else (False,))]:
        chunks.zero_copy_bounds = ramp_bounds if ramp else _uniform
        shared_staging.SLOTS = slots  # read at each pull; a fresh transceiver makes a ring of this many
        cfg = CacheTransceiverConfig(enable_cache_transceiver=True, zero_copy=True, buffer_bytes=args.buffer_bytes,
                                     backend="staged", shared_staging=True)
        stamps: dict[str, float] = {}
        gpu: list = []
        tc = KvTransceiver(_StampedComm(world.Dup(), stamps), pool, state, 0, cfg)
        _instrument(tc, stamps, gpu)
        for n in args.sizes:
            nblk = n // block_bytes
            opaque = OpaqueState(0, (0,), 0, tuple(range(nblk)), nblk * bs, state)
            runs = []
            for _ in range(args.warmup + args.repeats):
                stamps.clear()
                gpu.clear()
                world.Barrier()
                if rank == 1:
                    stamps["pull"] = time.perf_counter()
                    tc.start_pull(next(req_ids), opaque, list(range(nblk)))
                    stamps["sent"] = time.perf_counter()
                    while not tc.poll():
                        pass
                    stamps["done"] = time.perf_counter()
                    world.send(True, dest=0, tag=7)
                else:
                    next(req_ids)
                    stamps["loop"] = time.perf_counter()
                    while not world.Iprobe(source=1, tag=7):
                        tc.poll()
                    world.recv(source=1, tag=7)
                    while tc.busy:
                        tc.poll()
                torch.cuda.synchronize()
                mine = {"gpu_us": sum(s.elapsed_time(e) for s, e in gpu) * 1e3, **stamps}
                theirs = world.sendrecv(mine, dest=1 - rank, source=1 - rank)
                if rank == 1:
                    ctx, gen = theirs, mine
                    t0 = gen["pull"]
                    run = {k: (v[k] - t0) * 1e6 for v in (ctx, gen) for k in STEPS if k in v}
                    run["ctx_gpu"], run["gen_gpu"] = ctx["gpu_us"], gen["gpu_us"]
                    runs.append(run)
            if rank == 1:
                runs = runs[args.warmup:]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                torch.cuda.synchronize()
                t = []
                for _ in range(args.repeats):
                    torch.cuda.synchronize()
                    t1 = time.perf_counter()
                    host[:n].copy_(src[:n], non_blocking=True)
                    torch.cuda.synchronize()
                    t.append(time.perf_counter() - t1)
                med["d2h"] = statistics.median(t) * 1e6
                med["vs_d2h"] = med["d2h"] / med["done"]
                row = {"slots": slots, "ramp": ramp, "chunk_bytes": args.buffer_bytes // slots, "payload": n, **med}
                rows.append(row)
                print(f"{'ramp' if ramp else 'even'} slots {slots:2d} chunk {args.buffer_bytes // slots // MiB:3d} MiB payload {n // MiB:5d} MiB | "
                      + " ".join(f"{k} {med[k]:.0f}" for k in (*STEPS[1:], "ctx_gpu", "gen_gpu", "d2h"))
                      + f" | d2h/pull {med['vs_d2h']:.2f}", flush=True)
        tc.close()
    return {"gpu": torch.cuda.get_device_name(dev), "buffer_bytes": args.buffer_bytes, "rows": rows}


def probe_ipc(args: argparse.Namespace) -> dict[str, Any]:
    """One-sided IPC pulls: when the copy is queued (`queued`), when start_pull returns
    (`started`), when poll() first sees the copy done (`seen`) and returns (`done`); an idle
    poll()'s cost; and the floor: the same raw copy from the mapped pool, waited for with an
    event query loop, and a plain device copy with a synchronize (the bench's reference)."""
    from disagg_mpi.transfer import block_copy

    world, rank, dev, state, pool = _setup(args.sizes)
    bs = state.block_size
    block_bytes = state.bytes_per_token_per_rank(0) * bs
    cfg = CacheTransceiverConfig(enable_cache_transceiver=True, zero_copy=True, backend="ipc")
    tc = KvTransceiver(world.Dup(), pool, state, 0, cfg)
    stamps: dict[str, float] = {}
    copy = block_copy.PoolPair.copy

    def stamped_copy(self, *a):
        out = copy(self, *a)
        stamps.setdefault("queued", time.perf_counter())
        return out
    block_copy.PoolPair.copy = stamped_copy
    recycle = tc.side.recycle

    def stamped_recycle(ev):
        stamps.setdefault("seen", time.perf_counter())
        recycle(ev)
    tc.side.recycle = stamped_recycle
    rows, req_ids = [], iter(range(1, 1 << 30))
    for n in args.sizes:
        nblk = n // block_bytes
        opaque = OpaqueState(0, (0,), 0, tuple(range(nblk)), nblk * bs, state)
        runs = []
        for i in range(args.warmup + 4 * args.repeats):
            world.Barrier()
            stamps.clear()
            if rank == 1:
                t0 = time.perf_counter()
                tc.start_pull(next(req_ids), opaque, list(range(nblk)))
                stamps["started"] = time.perf_counter()
                while not tc.poll():
                    pass
                stamps["done"] = time.perf_counter()
                runs.append({k: (v - t0) * 1e6 for k, v in stamps.items()})
                world.send(True, dest=0, tag=7)
            else:
                next(req_ids)
                while not world.Iprobe(source=1, tag=7):
                    tc.poll()
                world.recv(source=1, tag=7)
                while tc.busy:
                    tc.poll()
        if rank == 1:
            runs = runs[args.warmup:]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            src = tc.ipc.pair(0)
            ev = tc.side.record()
            floor = []
            for _ in range(4 * args.repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                block_copy._memcpy_async(src._d, src._s, n, 3, src._h)
                ev.record(src._h)
                while not ev.query():
                    pass
                floor.append(time.perf_counter() - t0)
            med["raw_copy"] = statistics.median(floor) * 1e6
            a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
            ref = []
            for _ in range(4 * args.repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                b.copy_(a)
                torch.cuda.synchronize()
                ref.append(time.perf_counter() - t0)
            med["d2d"] = statistics.median(ref) * 1e6
            rows.append({"payload": n, **med})
            print(f"ipc payload {n // MiB:5d} MiB | " + " ".join(f"{k} {v:.1f}" for k, v in med.items())
                  + f" | d2d/pull {med['d2d'] / med['done']:.2f}", flush=True)
    if rank == 1:
        t0 = time.perf_counter()
        for _ in range(2000):
            tc.poll()
        idle = (time.perf_counter() - t0) / 2000 * 1e6
        t0 = time.perf_counter()
        for _ in range(2000):
            tc.comm.Iprobe(source=MPI.ANY_SOURCE, tag=1)
        iprobe = (time.perf_counter() - t0) / 2000 * 1e6
        print(f"idle poll() {idle:.2f} us, Iprobe {iprobe:.2f} us", flush=True)
        rows.append({"idle_poll_us": idle, "iprobe_us": iprobe})
    world.Barrier()
    tc.close()
    return {"gpu": torch.cuda.get_device_name(dev), "rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB])
    p.add_argument("--slots", nargs="+", type=int, default=[8])
    p.add_argument("--buffer-bytes", type=parse_size, default=32 * MiB)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ramp", action="store_true",
                   help="also try chunks that grow from one block at the start and shrink at the end")
    p.add_argument("--ipc", action="store_true", help="probe one-sided CUDA IPC pulls instead")
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available() or MPI.COMM_WORLD.Get_size() != 2:
        if MPI.COMM_WORLD.Get_rank() == 0:
            print("probe_ring.py needs CUDA and exactly 2 ranks")
        return 2
    res = probe_ipc(args) if args.ipc else probe(args)
    if MPI.COMM_WORLD.Get_rank() == 1 and args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

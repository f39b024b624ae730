"""The CUDA half of scripts/bench_transfer.py (`--device cuda`): each backend's pull vs plain copies.

Two ranks with Llama-3.1-8B-shaped KV pools on their GPUs: rank r uses GPU r % GPUs, so
the same GPU on a one-GPU machine and GPUs 0 and 1 on a larger one. Per payload, every
variant's runs go back to back: the pull with each backend (ipc, staged through the
shared ring, staged through MPI), a plain MPI Send/Recv of pinned host buffers, and on
the receiving rank plain device-to-device, D2H and H2D copies of the same bytes. When the
two ranks have different GPUs, two more references: a plain peer-to-peer copy (rank 1
copies from a buffer on rank 0's GPU into its own, one process) and an NCCL send/receive
between the two ranks; then `ipc_vs_best` is ipc over the faster of the two. Run it
through bench_transfer.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from bench_transfer import START_SECONDS, MiB, _plain_once, _pull_once, fmt_size
from mpi4py import MPI

from disagg_mpi.api import CacheTransceiverConfig
from disagg_mpi.transfer.cache_state import CacheState
from disagg_mpi.transfer.opaque import OpaqueState
from disagg_mpi.transfer.transceiver import KvTransceiver

CUDA_SIZES = [1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 << 30]


class _CudaSide:
    def __init__(self, tc: KvTransceiver, state: CacheState):
        self.tc, self.state = tc, state


def _time_cuda(fn, reps: int, warmup: int, devices: tuple[int, ...] = ()) -> float:
    """Median seconds of fn() from an idle GPU to its work done (on `devices` too, default: the current one)."""
    def sync() -> None:
        for d in devices or (None,):
            torch.cuda.synchronize(d)

    ts = []
    for _ in range(warmup + reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[warmup:])


class _Nccl:
    """An NCCL communicator of the two ranks (bootstrapped over MPI) for the send/receive reference."""

    def __init__(self, comm, dev: torch.device):
        from cupy.cuda import nccl

        if not getattr(nccl, "available", True):  # cupy built without NCCL: the same answer on every rank
            raise ImportError("cupy was built without NCCL")
        self.nccl, self.comm = nccl, comm
        uid = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
        with torch.cuda.device(dev):
            self.nc = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())
        self.stream = torch.cuda.Stream(dev)
        self.byte = getattr(nccl, "NCCL_UINT8", getattr(nccl, "NCCL_INT8", 0))

    def once(self, rank: int, buf: torch.Tensor, n: int) -> float:
        """Rank 0 sends n bytes of buf to rank 1; returns rank 1's seconds (0.0 on rank 0)."""
        self.comm.Barrier()
        t0 = time.perf_counter()
        if rank == 0:
            self.nc.send(buf.data_ptr(), n, self.byte, 1, self.stream.cuda_stream)
        else:
            self.nc.recv(buf.data_ptr(), n, self.byte, 0, self.stream.cuda_stream)
        self.stream.synchronize()
        return time.perf_counter() - t0 if rank == 1 else 0.0


def bench_cuda(args: argparse.Namespace) -> dict[str, Any]:
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    ndev = torch.cuda.device_count()
    dev = torch.device("cuda", rank % ndev)
    torch.cuda.set_device(dev)
    bs = 8
    state = CacheState.create(32, 8, 128, bs, "bfloat16")
    bpt = state.bytes_per_token_per_rank(0)  # 128 KiB
    block_bytes = bpt * bs
    sizes = [max(block_bytes, p // block_bytes * block_bytes) for p in args.sizes]
    max_blocks = max(sizes) // block_bytes
    pool = torch.zeros((max_blocks, 32, 2, 8, bs, 128), dtype=torch.bfloat16, device=dev)
    if rank == 0:
        pool.fill_(1.0)
    sides = {}
    for b in args.backends:
        cfg = CacheTransceiverConfig(enable_cache_transceiver=True, zero_copy=True, buffer_bytes=args.buffer_bytes,
                                     backend=b.removesuffix("-mpi"), shared_staging=b != "staged-mpi")
        sides[b] = _CudaSide(KvTransceiver(world.Dup(), pool, state, 0, cfg), state)
    plain_comm = world.Dup()
    nmax = max(sizes)
    host = torch.empty(nmax, dtype=torch.uint8, pin_memory=True)
    d_src = torch.ones(nmax, dtype=torch.uint8, device=dev) if rank == 1 else None
    d_dst = torch.empty(nmax, dtype=torch.uint8, device=dev) if rank == 1 else None
    cross = ndev > 1  # rank 0 on GPU 0, rank 1 on GPU 1: peer-to-peer and NCCL references
    p_src = torch.ones(nmax, dtype=torch.uint8, device=torch.device("cuda", 0)) if cross and rank == 1 else None
    nccl = None
    if cross:
        try:
            nccl = _Nccl(plain_comm, dev)
        except ImportError as err:  # same on every rank: cupy without NCCL
            if rank == 0:
                print(f"# no NCCL reference: {err}", flush=True)
    n_buf = torch.ones(nmax, dtype=torch.uint8, device=dev) if cross else None
    rows = []
    req_ids = iter(range(1, 1 << 30))
    if rank == 0:
        cols = "".join(f"  {b + ' GB/s':>12}" for b in args.backends)
        extra = f"  {'P2P GB/s':>9}  {'NCCL GB/s':>9}  {'ipc/best':>8}" if ndev > 1 else ""
        print(f"{'payload':>10} {'tokens':>7}{cols}  {'d2d GB/s':>9}  {'D2H GB/s':>9}  {'H2D GB/s':>9}  "
              f"{'MPI host':>9}  {'ipc/d2d':>7}  {'copy/d2d':>8}  {'stg/pin':>7}{extra}", flush=True)
    for n in sizes:
        nblk = n // block_bytes
        ntok = nblk * bs
        reps = args.repeats if n >= 64 * MiB else 4 * args.repeats
        row: dict[str, Any] = {"payload": n, "tokens": ntok, "bytes": n}
        opaque = OpaqueState(0, (0,), 0, tuple(range(nblk)), ntok, state)
        times: dict[str, list[float]] = {k: [] for k in [*sides, "mpi_host"]}
        # Each variant's runs back to back, like the d2d / D2H / H2D copies they are compared with:
        # interleaved, a 1 GiB host transfer just before an IPC pull leaves the CPU caches cold, and
        # the pull's ~50 us of Python then takes 3-5x longer (measured on the H100 host).
        for name, side in sides.items():
            # IPC pulls are cheap, so they always get 4x the runs: with 5 (the large payloads'
            # count for the slow variants) the median still carried the first runs after the
            # previous payload's host transfers, 2x slower while the Python path warms back up.
            for _ in range(args.warmup + (4 * args.repeats if name == "ipc" else reps)):
                times[name].append(_pull_once(side, rank, opaque, nblk, next(req_ids)))
                # ipc_copy: copies queued .. seen complete; excludes the time spent queueing them (the GPU
                # runs them meanwhile), so it understates the copy time: a diagnostic, not a bandwidth.
                if name == "ipc" and rank == 1:
                    times.setdefault("ipc_copy", []).append(side.tc.ipc_copy_seconds[-1])
                    times.setdefault("ipc_start", []).append(START_SECONDS[-1])
        for _ in range(args.warmup + reps):
            times["mpi_host"].append(_plain_once(plain_comm, rank, host[:n].numpy(), 0, 1))
        if nccl is not None:
            times["nccl"] = [nccl.once(rank, n_buf, n) for _ in range(args.warmup + 4 * args.repeats)]
        if rank == 1:
            torch.cuda.synchronize()
            assert bool((pool[:nblk] == 1).all()), "pulled KV is wrong"
            for k, v in times.items():
                row[f"{k}_s"] = statistics.median(v[args.warmup:])
            if "ipc" in sides:  # every timed run, for the spread
                row["ipc_runs_s"] = times["ipc"][args.warmup:]
            row["d2d_s"] = _time_cuda(lambda n=n: d_dst[:n].copy_(d_src[:n]), 4 * args.repeats, args.warmup)  # as many runs as ipc
            if cross:
                row["p2p_s"] = _time_cuda(lambda n=n: d_dst[:n].copy_(p_src[:n]), 4 * args.repeats, args.warmup,
                                          devices=(0, dev.index))
            row["d2h_s"] = _time_cuda(lambda n=n: host[:n].copy_(d_src[:n], non_blocking=True), reps, args.warmup)
            row["h2d_s"] = _time_cuda(lambda n=n: d_dst[:n].copy_(host[:n], non_blocking=True), reps, args.warmup)
            refs = ["d2d", "d2h", "h2d", *(["p2p"] if cross else []), *(["nccl"] if nccl else [])]
            for k in [*sides, *(["ipc_copy"] if "ipc" in sides else []), "mpi_host", *refs]:
                row[f"{k}_gbs"] = n / row[f"{k}_s"] / 1e9
            if "ipc" in sides:
                row["ipc_vs_d2d"] = row["ipc_gbs"] / row["d2d_gbs"]
                row["ipc_copy_vs_d2d"] = row["ipc_copy_gbs"] / row["d2d_gbs"]
                if cross:  # between GPUs the bar is the faster of a peer copy and NCCL
                    row["ipc_vs_best"] = row["ipc_gbs"] / max(row["p2p_gbs"], row.get("nccl_gbs", 0.0))
            for b in ("staged", "staged-mpi"):
                if b in sides:
                    row[f"{b}_vs_pinned"] = row[f"{b}_gbs"] / min(row["d2h_gbs"], row["h2d_gbs"])
                    row[f"{b}_vs_mpi_host"] = row[f"{b}_gbs"] / row["mpi_host_gbs"]
        row = world.bcast(row, root=1)
        rows.append(row)
        if rank == 0:
            cols = "".join(f"  {row[b + '_gbs']:12.2f}" for b in args.backends)
            extra = (f"  {row['p2p_gbs']:9.1f}  {row.get('nccl_gbs', float('nan')):9.1f}  "
                     f"{row.get('ipc_vs_best', float('nan')):8.2f}"
                     if cross else "")
            print(f"{fmt_size(n):>10} {ntok:7d}{cols}  {row['d2d_gbs']:9.1f}  {row['d2h_gbs']:9.1f}  "
                  f"{row['h2d_gbs']:9.1f}  {row['mpi_host_gbs']:9.2f}  {row.get('ipc_vs_d2d', float('nan')):7.2f}  "
                  f"{row.get('ipc_copy_vs_d2d', float('nan')):8.2f}  "
                  f"{row.get('staged_vs_pinned', float('nan')):7.2f}{extra}", flush=True)
    for side in sides.values():
        side.tc.close()
    props = torch.cuda.get_device_properties(dev)
    return {"device": "cuda", "gpu": props.name, "gpus_used": sorted({r % ndev for r in range(world.Get_size())}),
            "torch": torch.__version__, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
            "model": "Llama-3.1-8B KV: 32 layers, 8 KV heads, head_dim 128, bf16, block_size 8",
            "bytes_per_token": bpt, "block_bytes": block_bytes, "buffer_bytes": args.buffer_bytes,
            "repeats": args.repeats, "backends": list(args.backends), "rows": rows}


def plot_cuda(res: dict[str, Any], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    x = [r["bytes"] / MiB for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"ipc": ("CUDA IPC pull", "-o"), "staged": ("staged pull (shared pinned slots)", "-s"),
              "staged-mpi": ("staged pull (pinned + MPI)", "-^"),
              "d2d": ("device-to-device copy", "--"), "d2h": ("pinned D2H copy", ":"),
              "p2p": ("peer-to-peer copy (GPU 0 -> 1)", "--"), "nccl": ("NCCL send/recv", "-."),
              "h2d": ("pinned H2D copy", ":"), "mpi_host": ("MPI Send/Recv, pinned host", "-.")}
    for k, (label, st) in styles.items():
        if f"{k}_gbs" in rows[0]:
            ax.plot(x, [r[f"{k}_gbs"] for r in rows], st, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("payload (MiB)")
    ax.set_ylabel("GB/s (1e9 B/s)")
    where = "GPUs 0 and 1" if len(res.get("gpus_used", [0])) > 1 else "one GPU"
    ax.set_title(f"KV pull, 2 ranks on {where} ({res.get('gpu', 'GPU')}, {res['model'].split(':')[0]})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)

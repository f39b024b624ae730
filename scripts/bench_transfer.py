"""KV-transfer benchmark: the real pull path (KvTransceiver) vs a plain MPI Send/Recv.

Run inside one MPI job:

    mpiexec -n 2 python -m mpi4py scripts/bench_transfer.py [--json out.json]
        [--sizes 64K 256K 1M ...] [--repeats 5] [--zero-copy on|off|both]
    mpiexec -n 3 python -m mpi4py scripts/bench_transfer.py --layout tp2to1

`--layout same` (2 ranks): rank 0 is a context executor (TP1) holding a KV
pool of a SmolLM2-like layout (30 layers, 3 KV heads, head_dim 64, fp32,
block_size 16), rank 1 a generation executor with the same layout. For each
payload, rank 1 pulls a request of N tokens (N * bytes_per_token ~= payload)
with `KvTransceiver.start_pull` while both ranks `poll()` until it is done;
then rank 0 `Send`s the same number of bytes to rank 1 with plain mpi4py.
Each transceiver uses its own `COMM_WORLD.Dup()`, as the runtime does.

`--device cuda` (2 ranks; both may share one GPU): a Llama-3.1-8B-shaped KV
pool (32 layers, 8 KV heads, head_dim 128, bf16, block_size 8: 128 KiB per
token, 1 MiB per block; 2,048 tokens = 256 MiB) on each rank's GPU. Per
payload (whole blocks, 1 MiB .. 1 GiB) rank 1 pulls with each CUDA backend
(`ipc`: CUDA IPC, device-to-device; `staged`: pinned host buffers + MPI),
and, in the same run on rank 1's GPU, the references: a plain device-to-device
copy of the same bytes, pinned device->host and host->device copies, and a
plain MPI Send/Recv of pinned host buffers between the two ranks. Ratios:
ipc / device copy, staged / min(pinned D2H, pinned H2D). `--png` plots it
(needs matplotlib; `--plot-only JSON --png PNG` plots an earlier run).

`--layout tp2to1` (3 ranks): a 2-KV-head model (30 layers, 8 query heads,
2 KV heads, head_dim 64, fp32). Re-sharded: context TP2 (ranks 0 and 1, one
KV head each) -> generation TP1 (rank 2, both heads): rank 2 pulls one half
from each context rank and scatters it into its head slices. Same layout:
context TP1 (rank 0) -> generation TP1 (rank 2), same total bytes. Plain:
rank 0 `Send`s the same bytes to rank 2.

Timing: every measurement starts after a `Barrier` and is taken on the
receiving rank (start_pull .. poll() reports the request done / Recv
returns). Each size is warmed up first (the first message between two ranks
pays connection set-up), then repeated; the median is reported. GB/s = KV
bytes of the N tokens / seconds (1 GB = 1e9 bytes). The transfer moves whole
blocks, so it may carry up to one partly-filled block more than the KV
bytes; the `wire` column shows what actually moved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from mpi4py import MPI

from disagg_mpi.api import CacheTransceiverConfig
from disagg_mpi.transfer.cache_state import CacheState
from disagg_mpi.transfer.opaque import OpaqueState
from disagg_mpi.transfer.transceiver import KvTransceiver

KiB, MiB = 1 << 10, 1 << 20
DEFAULT_SIZES = [64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB]


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def fmt_size(n: int) -> str:
    for unit, m in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / KiB:.1f} KiB"


class Side:
    """One transceiver endpoint: a pool, a layout and a transceiver on its own Dup()."""

    def __init__(self, state: CacheState, local_rank: int, num_blocks: int, cfg: CacheTransceiverConfig,
                 fill: float | None = None):
        self.state = state
        s, _ = state.coords(local_rank)
        nl = state.layer_split[s]
        self.pool = torch.zeros((num_blocks, nl, 2, state.local_kv_heads, state.block_size, state.head_dim),
                                dtype=torch.float32)
        if fill is not None:
            self.pool.fill_(fill)
        self.comm = MPI.COMM_WORLD.Dup()
        self.tc = KvTransceiver(self.comm, self.pool, state, local_rank, cfg)


WHOLE_BLOCKS = 0  # set from --whole-blocks: round token counts to whole blocks of this size


def tokens_for(payload: int, bytes_per_token: int) -> int:
    n = max(1, round(payload / bytes_per_token))
    if WHOLE_BLOCKS:
        n = max(WHOLE_BLOCKS, round(n / WHOLE_BLOCKS) * WHOLE_BLOCKS)
    return n


def bench_same(args: argparse.Namespace) -> dict[str, Any]:
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    bs = 16
    state = CacheState.create(30, 3, 64, bs, "float32")
    bpt = state.bytes_per_token_per_rank(0)
    block_bytes = bpt * bs
    max_tokens = max(tokens_for(p, bpt) for p in args.sizes)
    num_blocks = -(-max_tokens // bs) + 1
    modes = {"on": True, "off": False}
    modes = {k: v for k, v in modes.items() if args.zero_copy in (k, "both")}
    sides = {}
    for name, zc in modes.items():
        cfg = CacheTransceiverConfig(enable_cache_transceiver=True, zero_copy=zc,
                                     buffer_bytes=args.buffer_bytes)
        sides[name] = Side(state, 0, num_blocks, cfg, fill=1.0 if rank == 0 else None)
    plain_comm = world.Dup()
    plain_buf = torch.ones(max_tokens * bpt // 4, dtype=torch.float32).numpy().view("uint8")
    rows = []
    req_ids = iter(range(1, 1 << 30))
    for payload in args.sizes:
        ntok = tokens_for(payload, bpt)
        kv_bytes = ntok * bpt
        nblk = -(-ntok // bs)
        wire = nblk * block_bytes
        row: dict[str, Any] = {"payload": payload, "tokens": ntok, "kv_bytes": kv_bytes, "wire_bytes": wire}
        reps = args.repeats if payload >= 4 * MiB else 4 * args.repeats
        opaque = OpaqueState(0, (0,), 0, tuple(range(nblk)), ntok, state)
        # Interleave the variants rep by rep, so that they see the same machine load.
        times: dict[str, list[float]] = {k: [] for k in [*sides, "plain"]}
        for _ in range(args.warmup + reps):
            for name, side in sides.items():
                times[name].append(_pull_once(side, rank, opaque, nblk, next(req_ids)))
            times["plain"].append(_plain_once(plain_comm, rank, plain_buf[:kv_bytes], 0, 1))
        for name in sides:
            row[f"transfer_zc_{name}_s"] = statistics.median(times[name][args.warmup:]) if rank == 1 else None
        row["plain_s"] = statistics.median(times["plain"][args.warmup:]) if rank == 1 else None
        row = world.bcast(row, root=1)
        rows.append(row)
        if rank == 0:
            _print_row(row, list(sides))
    for side in sides.values():
        assert not side.tc.busy
    return {"layout": "same", "model": "30 layers, 3 KV heads, head_dim 64, fp32, block_size 16",
            "bytes_per_token": bpt, "block_bytes": block_bytes, "buffer_bytes": args.buffer_bytes,
            "whole_blocks": bool(WHOLE_BLOCKS),
            "repeats": args.repeats, "rows": rows}


def _pull_once(side: Side, rank: int, opaque: OpaqueState, nblk: int, req_id: int,
               gen_rank: int = 1, ctx_ranks: tuple[int, ...] = (0,)) -> float:
    """One pull; returns the seconds seen by the generation rank (0.0 on the others)."""
    tc = side.tc
    _barrier(rank in (gen_rank, *ctx_ranks))
    took = 0.0
    if rank == gen_rank:
        blocks = list(range(-(-opaque.num_tokens // side.state.block_size)))  # the engine has them ready
        t0 = time.perf_counter()
        tc.start_pull(req_id, opaque, blocks)
        START_SECONDS.append(time.perf_counter() - t0)
        while True:
            done = tc.poll()
            if done:
                assert done[0][0] == req_id
                took = time.perf_counter() - t0
                break
        for r in ctx_ranks:  # the context ranks serve until told (a one-sided IPC pull asks nothing of them)
            MPI.COMM_WORLD.send(req_id, dest=r, tag=_TAG_PULLED)
    elif rank in ctx_ranks:
        while not MPI.COMM_WORLD.Iprobe(source=gen_rank, tag=_TAG_PULLED):
            tc.poll()
        assert MPI.COMM_WORLD.recv(source=gen_rank, tag=_TAG_PULLED) == req_id
        while tc.busy:  # the generation rank's "done" (first IPC pull) may still be in flight
            tc.poll()
    return took


_TAG_PULLED = 4242
START_SECONDS: list[float] = []  # generation rank: how long each start_pull took (diagnostic)


def _barrier(active: bool) -> None:
    """Barrier; a rank that sits out the next measurement waits in it without spinning.

    With 3 ranks on 2 cores (tp2to1), an idle rank spinning in MPI_Barrier would
    steal a core from the ranks being timed. Ranks taking part spin (no sleep).
    """
    req = MPI.COMM_WORLD.Ibarrier()
    if active:
        req.Wait()
        return
    while not req.Test():
        time.sleep(200e-6)


def _plain_once(comm: Any, rank: int, buf: Any, src: int, dst: int) -> float:
    _barrier(rank in (src, dst))
    if rank == dst:
        t0 = time.perf_counter()
        comm.Recv(buf, source=src, tag=7)
        return time.perf_counter() - t0
    if rank == src:
        comm.Send(buf, dest=dst, tag=7)
    return 0.0


def _gbs(nbytes: int, s: float | None) -> float:
    return nbytes / s / 1e9 if s else float("nan")


def _print_header(modes: list[str]) -> None:
    cols = "".join(f"  {'zc=' + m + ' GB/s':>12}  {'ratio':>6}" for m in modes)
    print(f"{'payload':>10} {'tokens':>7} {'wire':>10}{cols}  {'plain GB/s':>10}", flush=True)


def _print_row(row: dict[str, Any], modes: list[str]) -> None:
    kv = row["kv_bytes"]
    plain = _gbs(kv, row["plain_s"])
    cols = ""
    for m in modes:
        g = _gbs(kv, row[f"transfer_zc_{m}_s"])
        row[f"transfer_zc_{m}_gbs"] = g
        row[f"ratio_zc_{m}"] = g / plain
        cols += f"  {g:12.2f}  {g / plain:6.2f}"
    row["plain_gbs"] = plain
    print(f"{fmt_size(row['payload']):>10} {row['tokens']:7d} {fmt_size(row['wire_bytes']):>10}{cols}"
          f"  {plain:10.2f}", flush=True)


def bench_tp2to1(args: argparse.Namespace) -> dict[str, Any]:
    """Re-sharded (ctx TP2 on ranks 0,1 -> gen TP1 on rank 2) vs same layout (rank 0 -> rank 2)."""
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    bs = 16
    ctx2 = CacheState.create(30, 2, 64, bs, "float32", tp_size=2)
    one = CacheState.create(30, 2, 64, bs, "float32")
    bpt = one.bytes_per_token_per_rank(0)  # whole KV of a token (both heads)
    max_tokens = max(tokens_for(p, bpt) for p in args.sizes)
    num_blocks = -(-max_tokens // bs) + 1
    cfg = CacheTransceiverConfig(enable_cache_transceiver=True, zero_copy=args.zero_copy != "off",
                                 buffer_bytes=args.buffer_bytes)
    # Every rank builds every endpoint (Dup is collective); only its own pool is used.
    resh = Side(ctx2 if rank < 2 else one, rank if rank < 2 else 0, num_blocks, cfg,
                fill=1.0 if rank < 2 else None)
    same = Side(one, 0, num_blocks if rank != 1 else 1, cfg, fill=1.0 if rank == 0 else None)
    plain_comm = world.Dup()
    plain_buf = torch.ones(max_tokens * bpt // 4, dtype=torch.float32).numpy().view("uint8")
    rows = []
    req_ids = iter(range(1, 1 << 30))
    if rank == 0:
        print(f"{'payload':>10} {'tokens':>7}  {'resharded GB/s':>14}  {'same GB/s':>10}  "
              f"{'resh/same':>9}  {'plain GB/s':>10}", flush=True)
    for payload in args.sizes:
        ntok = tokens_for(payload, bpt)
        kv = ntok * bpt
        nblk = -(-ntok // bs)
        reps = args.repeats if payload >= 4 * MiB else 4 * args.repeats
        row: dict[str, Any] = {"payload": payload, "tokens": ntok, "kv_bytes": kv}
        op = OpaqueState(0, (0, 1), 0, tuple(range(nblk)), ntok, ctx2)
        op1 = OpaqueState(0, (0,), 0, tuple(range(nblk)), ntok, one)
        t: dict[str, list[float]] = {"resharded": [], "same": [], "plain": []}
        for _ in range(args.warmup + reps):  # interleaved, as in bench_same
            t["resharded"].append(_pull_once(resh, rank, op, nblk, next(req_ids), gen_rank=2, ctx_ranks=(0, 1)))
            t["same"].append(_pull_once(same, rank, op1, nblk, next(req_ids), gen_rank=2, ctx_ranks=(0,)))
            t["plain"].append(_plain_once(plain_comm, rank, plain_buf[:kv], 0, 2))
        for k, v in t.items():
            row[f"{k}_s"] = statistics.median(v[args.warmup:]) if rank == 2 else None
        row = world.bcast(row, root=2)
        for k in ("resharded", "same", "plain"):
            row[f"{k}_gbs"] = _gbs(kv, row[f"{k}_s"])
        rows.append(row)
        if rank == 0:
            print(f"{fmt_size(payload):>10} {ntok:7d}  {row['resharded_gbs']:14.2f}  {row['same_gbs']:10.2f}  "
                  f"{row['resharded_gbs'] / row['same_gbs']:9.2f}  {row['plain_gbs']:10.2f}", flush=True)
    return {"layout": "tp2to1", "model": "30 layers, 8 heads, 2 KV heads, head_dim 64, fp32, block_size 16",
            "bytes_per_token": bpt, "buffer_bytes": args.buffer_bytes, "zero_copy": cfg.zero_copy,
            "repeats": args.repeats, "rows": rows}


CUDA_BACKENDS = ("ipc", "staged", "staged-mpi")  # staged-mpi: staged with shared_staging off


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here (rank 0)")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                   help="payloads, e.g. 64K 1M 256M (default 64K..256M, powers of 4)")
    p.add_argument("--layout", choices=["same", "tp2to1"], default="same")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: CUDA pools (2 ranks), each backend vs device / pinned copies")
    p.add_argument("--backends", nargs="+", choices=list(CUDA_BACKENDS), default=list(CUDA_BACKENDS))
    p.add_argument("--png", help="--device cuda: plot the results here (needs matplotlib)")
    p.add_argument("--plot-only", metavar="JSON", help="plot an earlier --device cuda JSON to --png and exit")
    p.add_argument("--zero-copy", choices=["on", "off", "both"], default="both")
    p.add_argument("--buffer-bytes", type=parse_size, default=CacheTransceiverConfig.buffer_bytes)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (x4 below 4 MiB)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--whole-blocks", action="store_true",
                   help="round each request to whole blocks (KV bytes == bytes moved), "
                        "to compare the transport without the last block's padding")
    args = p.parse_args(argv)
    if args.plot_only:
        from bench_transfer_cuda import plot_cuda

        with open(args.plot_only) as f:
            plot_cuda(json.load(f), args.png or args.plot_only.removesuffix(".json") + ".png")
        return 0
    global WHOLE_BLOCKS
    WHOLE_BLOCKS = 16 if args.whole_blocks else 0
    world = MPI.COMM_WORLD
    if args.device == "cuda":
        from bench_transfer_cuda import CUDA_SIZES, bench_cuda, plot_cuda

        args.sizes = args.sizes or CUDA_SIZES
        if not torch.cuda.is_available():
            if world.Get_rank() == 0:
                print("--device cuda needs a CUDA GPU; this machine has none (use --device cpu)", file=sys.stderr)
            return 2
        if world.Get_size() != 2:
            if world.Get_rank() == 0:
                print("--device cuda needs exactly 2 ranks: mpiexec -n 2 ...", file=sys.stderr)
            return 2
        if world.Get_rank() == 0:
            print(f"# device=cuda backends={args.backends} buffer_bytes={args.buffer_bytes} repeats={args.repeats} "
                  f"warmup={args.warmup}", flush=True)
        res = bench_cuda(args)
        if world.Get_rank() == 0:
            print(f"# {res['gpu']}, {res['mpi']}, torch {res['torch']}", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=2)
            if args.png:
                try:
                    plot_cuda(res, args.png)
                except ImportError:
                    print("# matplotlib missing: plot later with --plot-only JSON --png PNG", flush=True)
        return 0
    args.sizes = args.sizes or DEFAULT_SIZES
    need = 2 if args.layout == "same" else 3
    if world.Get_size() != need:
        if world.Get_rank() == 0:
            print(f"--layout {args.layout} needs exactly {need} ranks: mpiexec -n {need} ...", file=sys.stderr)
        return 2
    if world.Get_rank() == 0:
        print(f"# layout={args.layout} ranks={need} buffer_bytes={args.buffer_bytes} repeats={args.repeats} "
              f"warmup={args.warmup} whole_blocks={args.whole_blocks} torch threads={torch.get_num_threads()}",
              flush=True)
        if args.layout == "same":
            modes = [m for m in ("on", "off") if args.zero_copy in (m, "both")]
            _print_header(modes)
    res = bench_same(args) if args.layout == "same" else bench_tp2to1(args)
    if world.Get_rank() == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

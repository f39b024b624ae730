#!/usr/bin/env python
"""What one GPU allows, measured without the engine or the transceiver in the way (CUDA only).

One process, raw runtime calls (cupy), so each figure is a ceiling for the real path:

- `staged`: a staged transfer's best case on this GPU (and a device copy, torch vs raw). Device -> pinned host -> device of S
  bytes in chunks of c: every chunk's D2H queued on one stream, its H2D on another behind an
  event, i.e. the shared ring's pipeline with no protocol and no second process. Next to it, as
  in scripts/bench_transfer.py, one torch D2H / H2D of S bytes (the "pinned copy" the staged
  target is a ratio of), the same D2H as a chain of S / c copies, and a D2H and an H2D of S
  bytes run at once (what both directions of the link give together).
- `attn`: the fused decode kernel (RoPE + KV write + paged attention) of a Llama-3.1-8B-shaped
  layer stack, timed per tile (tokens per tile, warps, pipeline stages), against the KV bytes it
  reads over the measured device copy bandwidth.
- `gemm`: each decode GEMM of that shape at batch 1 and 64: its weight bytes over its time, as
  a fraction of the device copy bandwidth.
- `profile`: the engine's decode at batch 64 under torch.profiler: GPU time by kernel.
- `cross` (two ranks on this GPU): one rank's D2H and the other's H2D, alone and at once.

Kernels and GEMMs are timed from CUDA graphs (no host launch cost); fractions are of the device
copy bandwidth counted as bytes read plus written (bench_engine's roofline).

    python scripts/probe_limits.py --json out.json [--parts staged attn gemm profile]
    mpiexec -n 2 python -m mpi4py scripts/probe_limits.py --parts cross --json cross.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MiB = 1 << 20
D2H, H2D, D2D = 2, 1, 3  # cudaMemcpyKind


def _median_s(fn, reps: int, warmup: int = 3) -> float:
    ts = []
    for _ in range(warmup + reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[warmup:])


def copy_bandwidth(dev: torch.device) -> float:
    """Device copy GB/s of 1 GiB, bytes read plus bytes written (bench_engine's roofline bandwidth)."""
    n = 1 << 30
    a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
    s = _median_s(lambda: b.copy_(a), 10)
    return 2 * n / s / 1e9


def staged(sizes: list[int], chunks: list[int], reps: int) -> list[dict]:
    from cupy.cuda import runtime as rt

    nmax = max(sizes)
    src = torch.ones(nmax, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    host = torch.empty(nmax, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(nmax, dtype=torch.uint8, pin_memory=True)
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()
    ha, hb = sa.cuda_stream, sb.cuda_stream
    nev = nmax // min(chunks)
    evs = [rt.eventCreateWithFlags(2) for _ in range(nev)]
    ps, pd, ph, ph2 = src.data_ptr(), dst.data_ptr(), host.data_ptr(), host2.data_ptr()

    def pipeline(n: int, c: int) -> None:
        k = n // c
        for i in range(k):
            rt.memcpyAsync(ph + i * c, ps + i * c, c, D2H, ha)
            rt.eventRecord(evs[i], ha)
        for i in range(k):
            rt.streamWaitEvent(hb, evs[i], 0)
            rt.memcpyAsync(pd + i * c, ph + i * c, c, H2D, hb)

    def chain(n: int, c: int) -> None:
        for i in range(n // c):
            rt.memcpyAsync(ph + i * c, ps + i * c, c, D2H, ha)

    def both(n: int) -> None:
        rt.memcpyAsync(ph, ps, n, D2H, ha)
        rt.memcpyAsync(pd, ph2, n, H2D, hb)

    rows = []
    for n in sizes:
        row = {"bytes": n,
               "d2h_torch_s": _median_s(lambda n=n: host[:n].copy_(src[:n], non_blocking=True), reps),
               "h2d_torch_s": _median_s(lambda n=n: dst[:n].copy_(host[:n], non_blocking=True), reps),
               "d2h_raw_s": _median_s(lambda n=n: rt.memcpyAsync(ph, ps, n, D2H, ha), reps),
               "both_directions_s": _median_s(lambda n=n: both(n), reps),
               # the IPC target's reference (a torch copy_ on the device) and the raw copy under it
               "d2d_torch_s": _median_s(lambda n=n: dst[:n].copy_(src[:n]), reps),
               "d2d_raw_s": _median_s(lambda n=n: rt.memcpyAsync(pd, ps, n, D2D, ha), reps)}
        pinned = max(row["d2h_torch_s"], row["h2d_torch_s"])  # min(D2H, H2D) bandwidth, as the bench
        for c in chunks:
            if c > n:
                continue
            row[f"chain_{c // MiB}M_s"] = _median_s(lambda n=n, c=c: chain(n, c), reps)
            row[f"pipeline_{c // MiB}M_s"] = t = _median_s(lambda n=n, c=c: pipeline(n, c), reps)
            row[f"pipeline_{c // MiB}M_vs_pinned"] = pinned / t
        torch.cuda.synchronize()
        assert bool((dst[:n] == 1).all())
        rows.append(row)
        best = max((k for k in row if k.endswith("_vs_pinned")), key=row.get)
        print(f"staged {n // MiB:5d} MiB: D2H {n / row['d2h_torch_s'] / 1e9:5.1f} GB/s, both ways "
              f"{2 * n / row['both_directions_s'] / 1e9:5.1f} GB/s in all, best pipeline {best} "
              f"{row[best]:.2f}; " + ", ".join(f"{k}={row[k]:.2f}" for k in row if k.endswith('_vs_pinned')),
              flush=True)
    for e in evs:
        rt.eventDestroy(e)
    return rows


def _decode_case(b: int, ctx_len: int, layers: int, n_q: int, n_kv: int, d: int, bs: int) -> tuple:
    """The fused decode kernel's arguments for b sequences of ctx_len tokens (random bf16 KV)."""
    per_seq = -(-(ctx_len + 1) // bs)
    pool = torch.randn(b * per_seq + 1, layers, 2, n_kv, bs, d, dtype=torch.bfloat16, device="cuda")
    tables = torch.arange(1, b * per_seq + 1, device="cuda").view(b, per_seq)
    ctx = torch.full((b,), ctx_len, dtype=torch.int32, device="cuda")
    slots = (tables[:, (ctx_len - 1) // bs] * bs + (ctx_len - 1) % bs).contiguous()
    qkv = torch.randn(b, (n_q + 2 * n_kv) * d, dtype=torch.bfloat16, device="cuda")
    q, k, v = qkv.split([n_q * d, n_kv * d, n_kv * d], dim=-1)
    cs = torch.randn(2, b, 1, d, dtype=torch.bfloat16, device="cuda")
    return q, k, v, cs[0], cs[1], pool, slots, tables.view(-1), torch.tensor([per_seq], device="cuda"), ctx


def _graph_us(fn, reps: int) -> float:
    """Median GPU microseconds of fn() replayed from a CUDA graph (no host launch cost in it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compiles
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ts = []
    for _ in range(3 + reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts[3:])


def attn(cases: dict[tuple[int, int], list[tuple[int, int, int]]], bw: float, reps: int) -> list[dict]:
    """Each (batch, context) case: the fused decode kernel over 32 layers per tile, from a graph."""
    from disagg_mpi.model import triton_kernels as tk

    layers, n_q, n_kv, d, bs = 32, 32, 8, 128, 16
    rows = []
    for (b, ctx_len), tiles in cases.items():
        q, k, v, cos, sin, pool, slots, tables, stride, ctx = _decode_case(b, ctx_len, layers, n_q, n_kv, d, bs)
        kv_bytes = layers * b * ctx_len * n_kv * d * 2 * 2

        def step(tile, q=q, k=k, v=v, cos=cos, sin=sin, pool=pool, slots=slots, tables=tables, stride=stride,
                 ctx=ctx):
            for layer in range(layers):
                tk.rope_write_decode_attention(q, k, v, cos, sin, pool, layer, slots, tables, stride, ctx,
                                               n_q, n_kv, d, tile=tile)

        default = tk.decode_tile(b, n_kv, d, torch.device("cuda"))
        best = None
        for tile in [default, *[t for t in tiles if t != default]]:
            try:
                us = _graph_us(lambda tile=tile: step(tile), reps) / layers
            except Exception as err:  # noqa: BLE001 - a tile that does not compile here: say so, go on
                print(f"attn b={b} tile={tile}: {type(err).__name__}: {str(err)[:120]}", flush=True)
                continue
            row = {"batch": b, "ctx": ctx_len, "tile": list(tile), "default": tile == default,
                   "us_per_layer": us, "kv_gbs": kv_bytes / layers / us / 1e3,
                   "roofline": kv_bytes / layers / us / 1e3 / bw}
            rows.append(row)
            best = row if best is None or us < best["us_per_layer"] else best
            print(f"attn b={b:3d} ctx={ctx_len:5d} tile={tile}{' (default)' if tile == default else ''}: "
                  f"{us:6.1f} us/layer = {row['roofline']:.2f} of the copy bandwidth", flush=True)
        print(f"attn b={b:3d} ctx={ctx_len:5d}: best {tuple(best['tile'])} {best['us_per_layer']:.1f} us", flush=True)
        del pool
        torch.cuda.empty_cache()
    return rows


def gemm(bw: float, reps: int) -> list[dict]:
    hid, ffn, vocab, q, kv = 4096, 14336, 128256, 4096, 1024
    shapes = {"qkv": (q + 2 * kv, hid), "o": (hid, q), "gate_up": (2 * ffn, hid), "down": (hid, ffn),
              "lm_head": (vocab, hid)}
    rows = []
    for m in (1, 64):
        for name, (n, k) in shapes.items():
            copies = max(2, -(-(256 * MiB) // (n * k * 2)))  # cycle through >= 256 MiB: nothing stays in L2
            ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            us = _graph_us(lambda ws=ws, x=x: [torch.nn.functional.linear(x, w) for w in ws], reps) / copies
            gbs = n * k * 2 / us / 1e3
            row = {"m": m, "name": name, "n": n, "k": k, "us": us, "gbs": gbs, "roofline": gbs / bw}
            # the same product other ways: W @ x^T (cuBLAS sees the skinny side as N), and cuBLASLt
            row["mm_swapped_us"] = _graph_us(lambda ws=ws, x=x: [torch.mm(w, x.t()) for w in ws], reps) / copies
            before = torch.backends.cuda.preferred_blas_library()
            try:
                torch.backends.cuda.preferred_blas_library("cublaslt")
                row["cublaslt_us"] = _graph_us(lambda ws=ws, x=x: [torch.nn.functional.linear(x, w) for w in ws],
                                               reps) / copies
            finally:
                torch.backends.cuda.preferred_blas_library(before)
            rows.append(row)
            print(f"gemm m={m:3d} {name:8s} [{n}x{k}]: {us:7.1f} us, {gbs:6.0f} GB/s = {gbs / bw:.2f} of copy; "
                  f"W @ x^T {row['mm_swapped_us']:7.1f} us, cuBLASLt {row['cublaslt_us']:7.1f} us", flush=True)
            del ws
    return rows


def cross(sizes: list[int], reps: int) -> list[dict]:
    """Two ranks on one GPU: rank 0's D2H and rank 1's H2D of the same bytes, each alone, then
    both at once (what a staged pull between two processes of one GPU can overlap at best)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    r = comm.Get_rank()
    nmax = max(sizes)
    d = torch.ones(nmax, dtype=torch.uint8, device="cuda")
    h = torch.ones(nmax, dtype=torch.uint8, pin_memory=True)

    def once(n: int, who: tuple[int, ...]) -> float:
        comm.Barrier()
        t0 = MPI.Wtime()
        if r in who:
            (h[:n].copy_(d[:n], non_blocking=True) if r == 0 else d[:n].copy_(h[:n], non_blocking=True))
            torch.cuda.synchronize()
        spans = comm.allgather((t0, MPI.Wtime()) if r in who else None)
        return max(s[1] for s in spans if s) - min(s[0] for s in spans if s)

    rows = []
    for n in sizes:
        row = {"bytes": n}
        for name, who in (("d2h_alone", (0,)), ("h2d_alone", (1,)), ("both", (0, 1))):
            row[f"{name}_s"] = statistics.median([once(n, who) for _ in range(3 + reps)][3:])
        row["both_vs_alone"] = max(row["d2h_alone_s"], row["h2d_alone_s"]) / row["both_s"]
        rows.append(row)
        if r == 0:
            print(f"cross {n // MiB:5d} MiB: D2H alone {row['d2h_alone_s'] * 1e6:7.0f} us, H2D alone "
                  f"{row['h2d_alone_s'] * 1e6:7.0f} us, both at once {row['both_s'] * 1e6:7.0f} us "
                  f"(overlap {row['both_vs_alone']:.2f}; 1.0 = full, 0.5 = serialized)", flush=True)
    return rows


def profile(prompt_len: int, new_tokens: int, batch: int, spec: str = "random:llama-3.1-8b") -> list[dict]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request
    from disagg_mpi.engine.executor import Executor
    from disagg_mpi.model import load_model

    model = load_model(spec, dtype=torch.bfloat16, device="cuda")
    bs = 16
    per_seq = -(-(prompt_len + new_tokens) // bs)
    ex = Executor(model, ExecutorConfig(max_batch_size=batch, max_num_tokens=batch * prompt_len,
                                        kv_cache_config=KvCacheConfig(block_size=bs, num_blocks=per_seq * batch + 1),
                                        dtype="bfloat16", device="cuda"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1000, 100000, (prompt_len,), generator=g).tolist() for _ in range(batch)]

    def run(n):
        return ex.generate([Request(list(p), max_tokens=n, ignore_eos=True) for p in prompts])

    run(new_tokens)  # warm-up: compiles, graphs
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        run(new_tokens)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append({"name": e.key[:90], "calls": e.count, "us_total": t})
    rows.sort(key=lambda r: -r["us_total"])
    total = sum(r["us_total"] for r in rows)
    print(f"profile {spec} batch {batch}: {total / 1e3:.1f} ms of kernels in {new_tokens} tokens", flush=True)
    for r in rows[:25]:
        print(f"profile {r['us_total'] / 1e3:8.1f} ms {100 * r['us_total'] / total:5.1f}% {r['calls']:6d}x  {r['name']}",
              flush=True)
    return rows[:60]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["staged", "attn", "gemm", "profile"],
                   choices=["staged", "attn", "gemm", "profile", "cross"],
                   help="cross: alone, under mpiexec -n 2 (both ranks on this GPU)")
    p.add_argument("--json", default=None)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile-model", default="random:llama-3.1-8b", help="the model the profile part runs")
    p.add_argument("--profile-batches", default="64", help="comma-separated batch sizes of the profile part")
    p.add_argument("--profile-prompt", type=int, default=512, help="prompt tokens of each profiled request")
    p.add_argument("--profile-new-tokens", type=int, default=32,
                   help="new tokens of each profiled request (1: a prefill profile)")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_limits.py needs a CUDA GPU", file=sys.stderr)
        return 2
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if a.parts == ["cross"]:
        res["cross"] = cross([4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB], a.repeats)
        from mpi4py import MPI

        if a.json and MPI.COMM_WORLD.Get_rank() == 0:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
        return 0
    res["copy_gbs"] = bw = copy_bandwidth(torch.device("cuda"))
    print(f"# {res['gpu']}: device copy {bw:.0f} GB/s (read + write)", flush=True)
    if "staged" in a.parts:
        res["staged"] = staged([16 * MiB, 64 * MiB, 256 * MiB], [1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB], a.repeats)
    if "gemm" in a.parts:
        res["gemm"] = gemm(bw, a.repeats)
    if "attn" in a.parts:
        many = list(itertools.product([32, 64, 128], [2, 4], [2, 3, 4]))
        few = list(itertools.product([64, 128, 256], [4, 8], [2, 3]))
        res["attn"] = attn({(64, 576): many, (64, 160): many, (64, 1024): many, (32, 576): many,
                            (8, 576): few + many, (1, 576): few, (1, 2048): few}, bw, a.repeats)
    if "profile" in a.parts:
        res["profile"] = {b: profile(a.profile_prompt, a.profile_new_tokens, int(b), a.profile_model) for b in a.profile_batches.split(",")}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The routed experts of one MoE layer at decode batch sizes, alone on a GPU: the fused kernels
(model/triton_moe.py) at several tiles against the grouped GEMMs (model/moe_grouped.py).

Qwen3-30B-A3B's shapes by default (128 experts, top 8, hidden 2048, expert FFN 768), bf16. Each
timed call reads another of `--stacks` weight stacks (so the 50 MB of an H100/H200 L2 cannot hold
what the next call reads) and another random routing; the calls replay from a CUDA graph, as in a
decode step (`--no-graph`: launched from Python). Prints microseconds a call and the bandwidth of the
bytes of the experts the call picked; `--json` writes them.

    python scripts/probe_moe.py --json moe_tiles.json
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from disagg_mpi.model.moe_grouped import grouped_experts
from disagg_mpi.model.triton_moe import TILES, fused_experts

CANDIDATES = [TILES, (16, 256, 4, 16, 256, 4), (8, 512, 4, 16, 256, 4), (32, 256, 8, 32, 256, 8),
              (16, 1024, 8, 8, 512, 4), (8, 256, 4, 8, 256, 4), (16, 512, 8, 32, 128, 4), (4, 1024, 4, 16, 512, 8)]


def time_calls(fn, cases, reps: int, graph: bool = True) -> float:
    """Mean microseconds of fn(*case) over reps calls, cycling through the cases. `graph`: the calls
    of one pass over the cases are captured in a CUDA graph and replayed (as a decode step runs
    them: no launch cost); else launched one by one from Python (launch-bound at small batches)."""
    for c in cases:
        fn(*c)
    torch.cuda.synchronize()
    passes = max(1, reps // len(cases))
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in cases:
                fn(*c)
        g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(passes):
        if graph:
            g.replay()
        else:
            for c in cases:
                fn(*c)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (passes * len(cases))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--batches", default="1,2,4")
    p.add_argument("--stacks", type=int, default=6)
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--no-graph", action="store_true",
                   help="launch each call from Python instead of replaying a CUDA graph of them")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_moe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, dt = "cuda", torch.bfloat16
    e, k, hid, ffn = a.experts, a.top_k, a.hidden, a.ffn
    stacks = [((torch.randn(e, 2 * ffn, hid, device=dev) / hid ** 0.5).to(dt),
               (torch.randn(e, hid, ffn, device=dev) / ffn ** 0.5).to(dt)) for _ in range(a.stacks)]
    res = {"gpu": torch.cuda.get_device_name(), "shape": [e, k, hid, ffn], "graph": not a.no_graph, "batches": {}}
    for n in [int(b) for b in a.batches.split(",")]:
        g = torch.Generator(device="cpu").manual_seed(n)
        cases = []
        for i in range(4 * a.stacks):
            ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).to(dev)
            w = torch.softmax(torch.randn(n, k, generator=g), -1).to(dev)
            x = torch.randn(n, hid, generator=g).to(dev, dt)
            gu, dn = stacks[i % a.stacks]
            cases.append((x, w, ids, gu, dn))
        distinct = sum(len(set(c[2].flatten().tolist())) for c in cases) / len(cases)
        nbytes = distinct * 3 * ffn * hid * 2
        row = {"distinct_experts": distinct, "bytes": nbytes}
        ref = grouped_experts(*cases[0])
        row["grouped_us"] = round(time_calls(grouped_experts, cases, a.reps, not a.no_graph), 1)
        print(f"batch {n}: {distinct:.1f} experts, {nbytes / 1e6:.1f} MB a call; grouped {row['grouped_us']:.1f} us "
              f"({nbytes / row['grouped_us'] / 1e3:.0f} GB/s)", flush=True)
        row["fused"] = {}
        for tiles in CANDIDATES:
            got = fused_experts(*cases[0], tiles=tiles)
            err = (got.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
            us = time_calls(lambda *c, t=tiles: fused_experts(*c, tiles=t), cases, a.reps, not a.no_graph)
            row["fused"][",".join(map(str, tiles))] = {"us": round(us, 1), "gbs": round(nbytes / us / 1e3), "rel_err": err}
            print(f"  fused {tiles}: {us:.1f} us ({nbytes / us / 1e3:.0f} GB/s), max rel err {err:.1e}", flush=True)
        res["batches"][n] = row
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

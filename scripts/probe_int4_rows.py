#!/usr/bin/env python
"""How torch's CPU int4 weight-only GEMM scales with the rows, beside fp32 and bf16 GEMMs (issue 24).

One thread, best of `--reps` calls, SmolLM2-135M's gate+up (3,072 x 576) and down (576 x 1,536)
shapes, `model.quant.Int4Linear` (`_weight_int4pack_mm_for_cpu`) against `F.linear` with the dense
fp32 and bf16 weights, at 1 to 2,048 rows (a decode step to a 2,048-token prefill step).

    python scripts/probe_int4_rows.py --json int4_rows.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg_mpi.model.quant import Int4Linear  # noqa: E402


def _best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,8,64,256,2048")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = []
    for n, k in [(3072, 576), (576, 1536)]:
        lin = nn.Linear(k, n, bias=False)
        q4, w, wb = Int4Linear(lin), lin.weight.data, lin.weight.data.bfloat16()
        for m in map(int, a.rows.split(",")):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            r = {"shape": [n, k], "rows": m, "int4_ms": _best_ms(lambda: q4(x), a.reps),
                 "fp32_ms": _best_ms(lambda: F.linear(x, w), a.reps),
                 "bf16_ms": _best_ms(lambda: F.linear(xb, wb), a.reps)}
            r["int4_over_bf16"] = r["int4_ms"] / r["bf16_ms"]
            out.append(r)
            print(f"[{n} x {k}] {m:5d} rows: int4 {r['int4_ms']:7.2f} ms, fp32 {r['fp32_ms']:7.2f} ms, "
                  f"bf16 {r['bf16_ms']:7.2f} ms (int4 / bf16 {r['int4_over_bf16']:.2f})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"torch": torch.__version__, "threads": 1, "results": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

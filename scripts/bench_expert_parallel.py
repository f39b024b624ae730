#!/usr/bin/env python
"""One MoE block's compute per rank, TP2 (every expert split in two) against EP2 (each rank half the
experts whole), in one run.

Both layouts end in the same all-reduce of [tokens, hidden] over the TP group, so the step's MoE
time differs only by what each rank computes; the slowest rank sets the pace. The two ranks of a
layout run one after the other in this process (one thread each, `--threads`), the layouts
interleaved in each repeat, best of `--repeats`. Routing is real (softmax top-k of a random router
over random tokens), so EP's load imbalance shows. Default shapes: Qwen3-30B-A3B's MoE layer
(hidden 2048, expert FFN 768, top-8) with 64 of its 128 experts, to hold both layouts in ~2.4 GB.

    python scripts/bench_expert_parallel.py --threads 1 [--json docs/bench/cpu/expert_parallel.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg_mpi.model.config import ModelConfig
from disagg_mpi.model.moe import SparseMoE, route
from disagg_mpi.model.parallel import ShardSpec


def _layout(cfg: ModelConfig, ep: int, tp: int = 2) -> list[SparseMoE]:
    """The tp ranks' blocks of one layout; the same global weights (seeded per expert) in both."""
    ranks = []
    for r in range(tp):
        shard = ShardSpec(r, tp, all_reduce=lambda x: x, ep_size=ep)
        f0, f1 = shard.expert_ffn_range(cfg.moe_intermediate_size)
        m = SparseMoE(cfg, f1 - f0, shard).requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=g) * 0.05)
        h, f = cfg.hidden_size, cfg.moe_intermediate_size
        for i, expert in enumerate(m.experts):
            g.manual_seed(1 + m.expert_range[0] + i)   # global expert id: the same weights in both layouts
            gate, up, down = (torch.randn(f, h, generator=g) * 0.02, torch.randn(f, h, generator=g) * 0.02,
                              torch.randn(h, f, generator=g) * 0.02)
            expert.gate_proj.weight.copy_(gate[f0:f1])
            expert.up_proj.weight.copy_(up[f0:f1])
            expert.down_proj.weight.copy_(down[:, f0:f1])
        ranks.append(m)
    return ranks


def _time(m: SparseMoE, x: torch.Tensor) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        m(x)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(vocab_size=8, hidden_size=a.hidden, intermediate_size=a.ffn, num_layers=1, num_heads=8,
                      num_kv_heads=8, head_dim=a.hidden // 8, architecture="qwen3_moe", num_experts=a.experts,
                      num_experts_per_tok=a.top_k, moe_intermediate_size=a.ffn, norm_topk_prob=True)
    layouts = {"TP2": _layout(cfg, 1), "EP2": _layout(cfg, 2)}
    rows = []
    for n in a.tokens:
        x = torch.randn(n, a.hidden, generator=torch.Generator().manual_seed(n))
        _, ids = route(layouts["TP2"][0].gate(x), a.top_k, True)
        best = {name: [float("inf")] * 2 for name in layouts}
        for _ in range(a.repeats):
            for name, ranks in layouts.items():   # interleaved: both see the same machine
                for r, m in enumerate(ranks):
                    best[name][r] = min(best[name][r], _time(m, x))
        with torch.no_grad():   # the same block: the ranks' sums agree between the layouts
            sums = [sum(m(x) for m in ranks) for ranks in layouts.values()]
        torch.testing.assert_close(sums[0], sums[1], rtol=1e-4, atol=1e-5)
        # Expert slots (token x chosen expert) each EP rank computes; TP ranks each compute all of
        # them at half width. An uneven split is EP's load imbalance.
        ep_slots = [int(((ids >= m.expert_range[0]) & (ids < m.expert_range[1])).sum()) for m in layouts["EP2"]]
        row = {"tokens": n, "unique_experts": int(torch.unique(ids).numel()), "ep_rank_slots": ep_slots,
               **{f"{k}_ms": [round(v, 3) for v in best[k]] for k in best},
               "slowest_EP2_over_TP2": round(max(best["EP2"]) / max(best["TP2"]), 3)}
        rows.append(row)
        print(f"tokens {n:4d}: experts hit {row['unique_experts']:3d}  TP2 ranks {best['TP2'][0]:8.2f} "
              f"{best['TP2'][1]:8.2f} ms  EP2 ranks {best['EP2'][0]:8.2f} {best['EP2'][1]:8.2f} ms  "
              f"(slots per EP rank {ep_slots})  slowest rank EP2/TP2 {row['slowest_EP2_over_TP2']:.2f}",
              flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

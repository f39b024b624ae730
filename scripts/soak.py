"""Soak test: many requests through 1 context + 2 generation executors, some cancelled.

    mpiexec -n 4 python -m mpi4py scripts/soak.py --requests 10000 --json soak.json

Every request must get exactly one final response; the outcome counts are
printed, and every executor's KV pool must be full again at the end.
Cancellations hit requests at random moments: queued, prefilling, waiting
for or during their KV transfer, decoding.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time

from disagg_mpi import Request, launch
from disagg_mpi.config import parse_topology


def soak_topology(n_ctx: int = 1, n_gen: int = 2, num_blocks: int = 256) -> object:
    def ex(rank: int) -> dict:
        return {"participant_ids": [rank], "max_batch_size": 16, "max_num_tokens": 256,
                "kv_cache": {"block_size": 8, "num_blocks": num_blocks},
                "cache_transceiver_config": {"enable_cache_transceiver": True}}
    return parse_topology({"model": {"path": "random:tiny", "dtype": "float32"}, "router": "least_loaded",
                           "context_executors": [ex(1 + i) for i in range(n_ctx)],
                           "generation_executors": [ex(1 + n_ctx + i) for i in range(n_gen)]})


def run_soak(orch, n_requests: int, cancel_share: float = 0.1, in_flight: int = 48, seed: int = 0,
             progress: bool = False) -> dict:
    """Drive the load from rank 0; returns the report (raises if a request was lost or doubled)."""
    rng = random.Random(seed)
    finals: dict[int, str] = {}
    extra_finals = 0
    pending: set[int] = set()
    cancel_at: dict[int, float] = {}
    sent = 0
    shown = -1
    t0 = time.perf_counter()
    while len(finals) < n_requests:
        while sent < n_requests and len(pending) < in_flight:
            n_prompt = rng.choice([1, 3, 8, 20, 60, 150])
            prompt = [rng.randrange(3, 1000) for _ in range(n_prompt)]
            req = Request(prompt, max_tokens=rng.choice([1, 2, 8, 24]), ignore_eos=True,
                          streaming=rng.random() < 0.2)
            [gid] = orch.submit([req])
            pending.add(gid)
            if rng.random() < cancel_share:
                cancel_at[gid] = time.perf_counter() + rng.uniform(0, 0.05)
            sent += 1
        now = time.perf_counter()
        for gid in [g for g, t in cancel_at.items() if t <= now]:
            del cancel_at[gid]
            if gid in pending:
                orch.cancel_request(gid)
        for gid, resp in orch.await_responses(timeout=0.002):
            if not resp.is_final:
                continue
            if gid in finals:
                extra_finals += 1
                continue
            pending.discard(gid)
            finals[gid] = "error" if resp.error_msg else (resp.result.finish_reason or "length")
        if progress and len(finals) // 500 != shown:
            shown = len(finals) // 500
            print(f"\r{len(finals)}/{n_requests}", end="", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    stats = orch.wait_pools_full(timeout=60)
    outcomes = collections.Counter(finals.values())
    report = {"requests": n_requests, "finals": len(finals), "duplicate_finals": extra_finals,
              "outcomes": dict(outcomes), "wall_s": round(wall, 2),
              "requests_per_s": round(n_requests / wall, 1),
              "pools": {ex: f"{s['free_blocks']}/{s['num_blocks']}" for ex, s in stats.items()}}
    if extra_finals or len(finals) != n_requests:
        raise AssertionError(f"lost or doubled responses: {report}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--cancel-share", type=float, default=0.1)
    ap.add_argument("--in-flight", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with launch(soak_topology()) as orch:
        if orch is None:
            return
        report = run_soak(orch, args.requests, args.cancel_share, args.in_flight, args.seed, progress=True)
        print("\n" + json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

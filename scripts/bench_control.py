#!/usr/bin/env python
"""Control-plane round trips between rank 0 and the executor leaders, on CPU.

Run as one MPI job of 3 ranks (rank 0 + one context + one generation executor over the tiny
random model); it measures, through the public orchestrator API only (so the same script times
any version of the control plane):

- `stats`: rank 0 asks every executor leader for its counters and waits for all answers
  (`executor_stats`): one message out and one back per executor, nothing else;
- `request`: one disaggregated request of a 16-token prompt and 2 new tokens, end to end
  (enqueue, context answer, generation enqueue, claim, pull, release, final response);
  mostly control messages, with two tiny forward passes.

    mpiexec -n 3 python -m mpi4py scripts/bench_control.py --json out.json

Prints medians and p90s in microseconds. Compare two versions by running both in the same
minute on the same machine (the figures move with the machine's load).

`--codec` (no MPI) times the encode + decode of typical control messages as protocol records
against the untyped dicts they replaced (msgpack of `{"op": ..., ...}`, the wire before issue 19),
in the same process: the per-message cost as a ratio, and the bytes on the wire.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from disagg_mpi import Request, launch
from disagg_mpi.config import parse_topology


def _topology():
    ex = {"kv_cache": {"block_size": 4, "num_blocks": 256}, "max_batch_size": 16, "max_num_tokens": 256,
          "cache_transceiver_config": {"enable_cache_transceiver": True}}
    return parse_topology({"model": {"path": "random:tiny", "dtype": "float32"},
                           "context_executors": [{"participant_ids": [1], **ex}],
                           "generation_executors": [{"participant_ids": [2], **ex}]})


def _summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"n": len(s), "p50_us": statistics.median(s) * 1e6, "p90_us": s[int(0.9 * (len(s) - 1))] * 1e6}


def _codec_cases():
    from disagg_mpi import protocol as P
    from disagg_mpi.api import Response, Result

    req = Request(list(range(2048)), max_tokens=128)
    resp = Response(7, Result([11], False))
    # Each legacy case builds its dict as the old senders did (to_dict included) and parses it
    # as the old receivers did (from_dict included).
    return [
        ("enqueue, 2,048-token prompt", P.Enqueue([(7, req)]),
         lambda: {"op": "enqueue", "items": [[7, req.to_dict()]]},
         lambda d: [Request.from_dict(rd) for _, rd in d["items"]]),
        ("responses, 8 streamed tokens", P.Responses(1, [resp] * 8, 4096, 100),
         lambda: {"op": "responses", "executor": 1, "responses": [resp.to_dict() for _ in range(8)],
                  "load": 4096, "free_blocks": 100},
         lambda d: [Response.from_dict(rd) for rd in d["responses"]]),
        ("claim, 128 blocks", P.Claim(3, 9, list(range(128)), 1),
         lambda: {"op": "claim", "ctx_req_id": 3, "gen_req_id": 9, "blocks": list(range(128)), "executor": 1},
         lambda d: d["blocks"]),
        ("cancel", P.Cancel(7), lambda: {"op": "cancel", "req_id": 7}, lambda d: d["req_id"]),
    ]


def codec(repeats: int) -> dict:
    import msgpack

    from disagg_mpi import protocol as P

    out = {}
    for name, record, build, parse in _codec_cases():
        def typed(record=record):
            P.decode(P.encode(record))

        def untyped(build=build, parse=parse):
            parse(msgpack.unpackb(msgpack.packb(build()), strict_map_key=False))

        times = {}
        for label, fn in (("record", typed), ("dict", untyped)) * 2:  # interleaved, best of two
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[label] = min(times.get(label, 1e9), (time.perf_counter() - t0) / repeats)
        out[name] = {"record_us": times["record"] * 1e6, "dict_us": times["dict"] * 1e6,
                     "ratio": times["record"] / times["dict"],
                     "record_bytes": len(P.encode(record)), "dict_bytes": len(msgpack.packb(build()))}
        r = out[name]
        print(f"{name:30s} record {r['record_us']:8.1f} us  dict {r['dict_us']:8.1f} us  ratio {r['ratio']:.2f}"
              f"   bytes {r['record_bytes']} vs {r['dict_bytes']}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codec", action="store_true", help="time the codec only (no MPI job)")
    ap.add_argument("--repeats", type=int, default=2000, help="--codec: calls per message kind")
    ap.add_argument("--stats", type=int, default=500, help="stats round trips")
    ap.add_argument("--requests", type=int, default=100, help="disaggregated requests, one at a time")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.codec:
        out = codec(args.repeats)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
        return 0
    with launch(_topology()) as orch:
        if not orch:
            return 0
        for _ in range(20):  # warm-up
            orch.executor_stats()
        stats = []
        for _ in range(args.stats):
            t0 = time.perf_counter()
            orch.executor_stats()
            stats.append(time.perf_counter() - t0)
        prompt = [(7 * j + 3) % 1000 for j in range(16)]
        orch.generate([Request(prompt, max_tokens=2, ignore_eos=True)])  # warm-up
        reqs = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            orch.generate([Request(prompt, max_tokens=2, ignore_eos=True)])
            reqs.append(time.perf_counter() - t0)
        out = {"stats_round_trip": _summary(stats), "disaggregated_request": _summary(reqs)}
        for name, s in out.items():
            print(f"{name:24s} p50 {s['p50_us']:9.1f} us   p90 {s['p90_us']:9.1f} us   (n={s['n']})")
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

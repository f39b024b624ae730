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
import math
import random
import sys
import time

from disagg_mpi import Request, launch
from disagg_mpi.api import ContextPhaseParams, RequestError, RequestType, SamplingConfig
from disagg_mpi.config import parse_topology
from disagg_mpi.orchestrator.tracks import Flow


def soak_topology(n_ctx: int = 1, n_gen: int = 2, num_blocks: int = 256, lease_seconds: float = 5.0) -> object:
    # A short lease: the orphaned context-only requests' blocks come back within the soak.
    def ex(rank: int) -> dict:
        return {"participant_ids": [rank], "max_batch_size": 16, "max_num_tokens": 256,
                "kv_cache": {"block_size": 8, "num_blocks": num_blocks},
                "cache_transceiver_config": {"enable_cache_transceiver": True, "lease_seconds": lease_seconds}}
    return parse_topology({"model": {"path": "random:tiny", "dtype": "float32"}, "router": "least_loaded",
                           "context_executors": [ex(1 + i) for i in range(n_ctx)],
                           "generation_executors": [ex(1 + n_ctx + i) for i in range(n_gen)]})


# ---- hostile requests: each must be refused with an error that names it, and hurt nobody ----------

VOCAB = 1024  # random:tiny


def bad_request(rng: random.Random) -> Request:
    """A request rank 0 must refuse at submit (a RequestError naming the field)."""
    ok = [rng.randrange(3, 1000) for _ in range(rng.choice([1, 8, 60]))]
    kind = rng.randrange(7)
    if kind == 0:
        return Request(ok + [VOCAB + rng.randrange(10**6)], max_tokens=4)  # out of the vocabulary
    if kind == 1:
        return Request(ok + [2**64 + rng.randrange(10**9)], max_tokens=4)  # a huge integer as a token
    if kind == 2:
        return Request(ok, max_tokens=rng.choice([0, -1, 2**70]))
    if kind == 3:
        return Request(ok, max_tokens=4, sampling_config=SamplingConfig(temperature=rng.choice([-1.0, math.nan])))
    if kind == 4:
        return Request(ok, max_tokens=4, sampling_config=SamplingConfig(temperature=0.7,
                                                                        top_p=rng.choice([0.0, 1.5, math.inf])))
    if kind == 5:
        return Request(ok, max_tokens=4, sampling_config=SamplingConfig(temperature=0.7, seed=2**64))
    return Request(ok, max_tokens=4, sampling_config=SamplingConfig(top_k=-rng.randrange(1, 100)))


def forged(rng: random.Random, prompt: list[int], cpp: ContextPhaseParams) -> Request:
    """A generation-only request whose params were altered (or that claims no context at all)."""
    kind = rng.randrange(5)
    opaque, first, ids, req_id = bytearray(cpp.opaque_state), list(cpp.first_gen_tokens), list(prompt), cpp.req_id
    if kind == 0:
        opaque[rng.randrange(len(opaque))] ^= 1 << rng.randrange(8)  # a flipped bit in the signed state
    elif kind == 1:
        first = [(first[0] + 1) % VOCAB]  # another first token than the context sampled
    elif kind == 2:
        ids[rng.randrange(len(ids))] = (ids[0] + 7) % VOCAB  # another prompt than the context's
    elif kind == 3:
        req_id = req_id + 1 + rng.randrange(1000)  # another request's id
    else:
        ids = ids + [5]  # a longer prompt: blocks the context never held
    return Request(ids, max_tokens=4, request_type=RequestType.REQUEST_TYPE_GENERATION_ONLY,
                   context_phase_params=ContextPhaseParams(req_id, first, bytes(opaque)))


def _try_submit(submit, request: Request) -> list[int] | None:
    """The request's ids, or None when rank 0 refuses it at once with a RequestError naming the field."""
    try:
        return submit([request])
    except RequestError as err:
        if not err.param:
            raise AssertionError(f"refused without naming the field: {err}") from None
        return None


class _Book:
    """What each request id must end with: a good one its tokens (or cancelled), a hostile one an error."""

    def __init__(self) -> None:
        self.expect: dict[int, tuple[str, int, list[int]]] = {}  # gid -> (kind, max_tokens, prompt)
        self.finals: dict[int, str] = {}
        self.doubled = 0
        self.wrong: list[str] = []
        self.follow_ups: list[tuple[list[int], int, ContextPhaseParams]] = []  # (prompt, max_tokens, params)
        self.pending: set[int] = set()
        self.refused_at_submit = 0

    def track(self, gids: list[int] | None, kind: str, max_tokens: int, prompt: list[int]) -> None:
        if gids is None:
            self.refused_at_submit += 1
        for gid in gids or ():
            self.expect[gid] = (kind, max_tokens, prompt)
            self.pending.add(gid)

    def settle(self, gid: int, resp) -> None:
        self.pending.discard(gid)
        if gid in self.finals:
            self.doubled += 1
            return
        kind, max_tokens, prompt = self.expect[gid]
        reason = "error" if resp.error_msg else (resp.result.finish_reason or "length")
        if kind == "hostile":
            if reason != "error":
                self.wrong.append(f"hostile request {gid} was served ({reason})")
            reason = "refused"
        elif kind == "context" and resp.retry_after is not None:
            reason = "held_full"  # orphans fill the held contexts' share of the pool: 429, come back later
        elif reason == "error":
            self.wrong.append(f"good request {gid} failed: {resp.error_msg}")
        elif kind == "context" and reason != "cancelled":
            cpp = resp.result.context_phase_params
            if cpp is None:
                self.wrong.append(f"context-only request {gid} came back without its params")
            elif max_tokens:  # not an orphan: its generation phase follows (after a forgery)
                self.follow_ups.append((prompt, max_tokens, cpp))
            reason = "context"
        elif kind == "good" and reason == "length" and len(resp.result.output_token_ids) != max_tokens:
            self.wrong.append(f"good request {gid}: {len(resp.result.output_token_ids)} tokens, not {max_tokens}")
        self.finals[gid] = reason


def _follow_up(orch, rng: random.Random, book: _Book) -> None:
    """A forgery first, then the genuine generation phase, which must still be served."""
    prompt, max_tokens, cpp = book.follow_ups.pop()
    book.track(_try_submit(orch.enqueue_generation_only, forged(rng, prompt, cpp)), "hostile", 4, prompt)
    genuine = Request(prompt, max_tokens=max_tokens, ignore_eos=True,
                      request_type=RequestType.REQUEST_TYPE_GENERATION_ONLY, context_phase_params=cpp)
    book.track(orch.enqueue_generation_only([genuine]), "good", max_tokens, prompt)


def _send_hostile(orch, rng: random.Random, book: _Book, prompt: list[int], max_tokens: int) -> None:
    """A bad request (refused at submit), an orphaned context-only one, or one whose generation
    phase will be forged (then sent genuine: `_follow_up`)."""
    kind = rng.randrange(3)
    if kind == 0:
        gids = _try_submit(orch.submit, bad_request(rng))
        if gids is not None:
            book.wrong.append("a bad request was accepted at submit")
        book.track(gids, "hostile", 4, prompt)
        return
    max_tokens = max(2, max_tokens)  # 1 would end in the context phase: no params to forge
    ctx = Request(prompt, max_tokens=max_tokens, ignore_eos=True)
    book.track(orch.enqueue_context([ctx], flow=Flow.CONTEXT_ONLY), "context", 0 if kind == 1 else max_tokens, prompt)


def run_soak(orch, n_requests: int, cancel_share: float = 0.1, in_flight: int = 48, seed: int = 0,
             progress: bool = False, hostile_share: float = 0.0) -> dict:
    """Drive the load from rank 0; returns the report (raises if a request was lost, doubled or
    wrongly answered). `hostile_share` of the slots send hostile requests: refused at submit
    (bad values), context-only ones never followed (orphans), or context-only ones followed by a
    forged generation-only request and then the genuine one."""
    rng = random.Random(seed)
    book = _Book()
    cancel_at: dict[int, float] = {}
    sent = 0
    shown = -1
    t0 = time.perf_counter()
    while sent < n_requests or book.pending or book.follow_ups:
        while book.follow_ups:
            _follow_up(orch, rng, book)
        while sent < n_requests and len(book.pending) < in_flight:
            sent += 1
            prompt = [rng.randrange(3, 1000) for _ in range(rng.choice([1, 3, 8, 20, 60, 150]))]
            max_tokens = rng.choice([1, 2, 8, 24])
            if rng.random() < hostile_share:
                _send_hostile(orch, rng, book, prompt, max_tokens)
                continue
            req = Request(prompt, max_tokens=max_tokens, ignore_eos=True, streaming=rng.random() < 0.2)
            [gid] = orch.submit([req])
            book.track([gid], "good", max_tokens, prompt)
            if rng.random() < cancel_share:
                cancel_at[gid] = time.perf_counter() + rng.uniform(0, 0.05)
        now = time.perf_counter()
        for gid in [g for g, t in cancel_at.items() if t <= now]:
            del cancel_at[gid]
            if gid in book.pending:
                orch.cancel_request(gid)
        for gid, resp in orch.await_responses(timeout=0.002):
            if resp.is_final:
                book.settle(gid, resp)
        if progress and len(book.finals) // 500 != shown:
            shown = len(book.finals) // 500
            print(f"\r{len(book.finals)}/{n_requests}", end="", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    stats = orch.wait_pools_full(timeout=60)
    outcomes = collections.Counter(book.finals.values())
    if book.refused_at_submit:
        outcomes["refused_at_submit"] = book.refused_at_submit
    report = {"requests": n_requests, "finals": len(book.finals), "duplicate_finals": book.doubled,
              "outcomes": dict(outcomes), "wrong": book.wrong[:10], "wall_s": round(wall, 2),
              "requests_per_s": round(n_requests / wall, 1),
              "pools": {ex: f"{s['free_blocks']}/{s['num_blocks']}" for ex, s in stats.items()}}
    if book.doubled or book.wrong or set(book.finals) != set(book.expect):
        raise AssertionError(f"lost, doubled or wrongly answered requests: {report}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--cancel-share", type=float, default=0.1)
    ap.add_argument("--in-flight", type=int, default=48)
    ap.add_argument("--hostile-share", type=float, default=0.05,
                    help="share of hostile requests (bad values, orphaned contexts, forged hand-offs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with launch(soak_topology()) as orch:
        if orch is None:
            return
        report = run_soak(orch, args.requests, args.cancel_share, args.in_flight, args.seed, progress=True,
                          hostile_share=args.hostile_share)
        print("\n" + json.dumps(report, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

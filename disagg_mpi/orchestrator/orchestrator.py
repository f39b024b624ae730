"""Rank 0 (kLEADER): routes requests and keeps the two-phase flow together.

Follows the seed's `DisaggExecutorOrchestrator`: `enqueue_context`,
`enqueue_generation`, `await_context_responses`, `await_generation_responses`,
each keyed by a *global* request id; the orchestrator maps it to the
request ids of the context and generation executors. `generate` drives both
phases for callers who do not want to.
"""

from __future__ import annotations

import copy
import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..api import ContextPhaseParams, Request, RequestType, Response, Result
from ..config import Topology
from ..runtime.comms import TAG_TO_EXEC, TAG_TO_ORCH, Backoff, Comms, recv_ready, send
from .admission import admitted, model_limits
from .prefix_index import PrefixIndex
from .router import Router, run_locally

_CTX, _GEN = "context", "generation"


@dataclass
class _Track:
    """What rank 0 knows of one global request."""

    request: Request
    t_enqueue: float = field(default_factory=time.perf_counter)
    phase: str = _GEN
    executor: int = -1
    exec_req_id: int = -1
    t_first: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False


class DisaggOrchestrator:
    def __init__(self, topo: Topology, comms: Comms):
        self.topo = topo
        self.comms = comms
        n_ctx = len(topo.context_executors)
        self.context_ids = list(range(n_ctx))
        self.generation_ids = list(range(n_ctx, len(topo.executors)))
        self.leaders = {i: e.participant_ids[0] for i, e in enumerate(topo.executors)}
        self.router = Router(topo.router.policy)
        self.load: dict[int, int] = {i: 0 for i in self.leaders}
        self.free_blocks: dict[int, int] = {}
        self.devices: dict[int, str] = {}
        self._gids = itertools.count(1)
        self._exec_ids = itertools.count(1)
        self._tracks: dict[int, _Track] = {}
        self._by_exec: dict[tuple[int, int], int] = {}
        self._queues: dict[str, deque[tuple[int, Response]]] = {_CTX: deque(), _GEN: deque()}
        self._seed_rng = random.Random()
        self._backoff = Backoff.for_devices(any(e.device_ids for e in topo.executors))
        self.prefix = {i: PrefixIndex(e.kv_cache.block_size, e.kv_cache.num_blocks)
                       for i, e in enumerate(topo.executors)}
        self._stats: dict[int, dict] = {}

    # ---- enqueue ---------------------------------------------------------

    def _route(self, candidates: list[int], select: int | None, what: str,
               tokens: Sequence[int] = ()) -> int:
        if select is None:
            cached = ({e: self.prefix[e].cached_tokens(tokens) for e in candidates}
                      if self.router.policy == "kv_aware" else None)
            return self.router.pick(candidates, self.load, cached)
        if select not in candidates:
            raise ValueError(f"select_{what}_id={select} is not a {what} executor; allowed: {candidates}")
        return select

    def _dispatch(self, gid: int, request: Request, executor: int, phase: str) -> None:
        t = self._tracks[gid]
        exec_req_id = next(self._exec_ids)
        # Sent before any bookkeeping: a request that cannot be sent leaves none behind.
        send(self.comms.ctl, {"op": "enqueue", "items": [[exec_req_id, request.to_dict()]]},
             self.leaders[executor], TAG_TO_EXEC)
        t.phase, t.executor, t.exec_req_id = phase, executor, exec_req_id
        self._by_exec[(executor, t.exec_req_id)] = gid
        self.load[executor] += len(request.input_token_ids) + request.max_tokens
        self.prefix[executor].insert(request.input_token_ids)

    def _dispatch_new(self, gid: int, request: Request, executor: int, phase: str) -> None:
        try:
            self._dispatch(gid, request, executor, phase)
        except BaseException:
            self._tracks.pop(gid, None)  # rank 0 forgets a request it could not start
            raise

    def _check(self, requests: Sequence[Request], generation_only: bool = False) -> list[Request]:
        """Every request's values, before any of them starts (admission.py): all or none."""
        limits = model_limits(str(self.topo.model.path))
        return [admitted(r, limits, generation_only) for r in requests]

    def _new(self, request: Request) -> tuple[int, Request]:
        request = copy.deepcopy(request)
        sc = request.sampling_config
        if sc.seed is None and sc.temperature > 0:
            sc.seed = self._seed_rng.getrandbits(63)  # both phases must sample with the same seed
        gid = next(self._gids)
        self._tracks[gid] = _Track(request)
        return gid, request

    def _enqueue_on_generation(self, requests: Sequence[Request], request_type: RequestType,
                               select_id: int | None) -> list[int]:
        requests = self._check(requests, request_type == RequestType.REQUEST_TYPE_GENERATION_ONLY)
        out = []
        for r in requests:
            ex = self._route(self.generation_ids, select_id, "gen", r.input_token_ids)
            gid, r = self._new(r)
            r.request_type = request_type
            self._dispatch_new(gid, r, ex, _GEN)
            out.append(gid)
        return out

    def enqueue_requests(self, requests: Sequence[Request], select_id: int | None = None) -> list[int]:
        """Aggregated serving: each request runs both phases on one executor."""
        return self._enqueue_on_generation(requests, RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION, select_id)

    def enqueue_context(self, requests: Sequence[Request], select_context_id: int | None = None) -> list[int]:
        requests = self._check(requests)
        out = []
        for r in requests:
            ex = self._route(self.context_ids or self.generation_ids, select_context_id, "context",
                             r.input_token_ids)
            gid, r = self._new(r)
            r.request_type = RequestType.REQUEST_TYPE_CONTEXT_ONLY
            self._dispatch_new(gid, r, ex, _CTX)
            out.append(gid)
        return out

    def enqueue_generation(self, requests: Sequence[Request], global_ids: Sequence[int],
                           select_gen_id: int | None = None) -> None:
        requests = self._check(requests, generation_only=True)
        for r, gid in zip(requests, global_ids, strict=True):
            if gid not in self._tracks:
                raise KeyError(f"global request id {gid} is unknown")
            r = copy.deepcopy(r)
            r.request_type = RequestType.REQUEST_TYPE_GENERATION_ONLY
            self._tracks[gid].request = r
            self._dispatch(gid, r, self._route(self.generation_ids, select_gen_id, "gen", r.input_token_ids), _GEN)

    def cancel_request(self, gid: int) -> None:
        t = self._tracks.get(gid)
        if t is None:
            return
        t.cancelled = True
        send(self.comms.ctl, {"op": "cancel", "req_id": t.exec_req_id}, self.leaders[t.executor], TAG_TO_EXEC)

    # ---- responses -------------------------------------------------------

    def poll(self) -> bool:
        got_any = False
        while (got := recv_ready(self.comms.ctl, _any(), TAG_TO_ORCH)):
            msg, _ = got
            got_any = True
            ex = msg["executor"]
            if msg["op"] == "stats":
                self._stats[ex] = msg
                continue
            if msg["op"] != "responses":
                continue
            self.load[ex] = msg["load"]
            self.free_blocks[ex] = msg["free_blocks"]
            now = time.perf_counter()
            for rd in msg["responses"]:
                resp = Response.from_dict(rd)
                gid = self._by_exec.get((ex, resp.request_id))
                if gid is None:
                    continue
                t = self._tracks[gid]
                if resp.result is not None and resp.result.output_token_ids and t.t_first is None:
                    t.t_first = now
                if resp.is_final:
                    del self._by_exec[(ex, resp.request_id)]
                phase = _CTX if self.topo.is_context(ex) and t.phase == _CTX else _GEN
                resp.request_id = gid
                self._queues[phase].append((gid, resp))
        return got_any

    def _await(self, phase: str, timeout: float | None) -> list[tuple[int, Response]]:
        deadline = None if timeout is None else time.perf_counter() + timeout
        q = self._queues[phase]
        while not q:
            if self.poll():
                self._backoff.busy()
                continue
            if deadline is not None and time.perf_counter() >= deadline:
                break
            self._backoff.idle()
        out = list(q)
        q.clear()
        return out

    def await_context_responses(self, timeout: float | None = None) -> list[tuple[int, Response]]:
        return self._await(_CTX, timeout)

    def await_generation_responses(self, timeout: float | None = None) -> list[tuple[int, Response]]:
        return self._await(_GEN, timeout)

    def await_responses(self, timeout: float | None = None) -> list[tuple[int, Response]]:
        """Both phases' responses, whichever arrive first."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            self.poll()
            out = list(self._queues[_CTX]) + list(self._queues[_GEN])
            if out or (deadline is not None and time.perf_counter() >= deadline):
                self._queues[_CTX].clear()
                self._queues[_GEN].clear()
                return out
            self._backoff.idle()

    # ---- one call for both phases ------------------------------------------

    def generate(self, requests: Sequence[Request], timeout: float | None = None,
                 on_response: Callable[[int, Response], None] | None = None,
                 cancel_when: Callable[[], bool] | None = None) -> list[Response]:
        """Run requests to completion through both phases; final responses in input order.

        Each final response carries every output token (the first one included)
        and the request's metrics: ttft_ms, e2e_ms, context_executor,
        generation_executor, kv_transfer_ms (claim to landed), kv_claim_ms (of it, waiting for
        the context executor to grant the claim; kv_claim_answer_ms, of that, until the context
        leader answered, by the two ranks' wall clocks), kv_transfer_bytes. Once
        `cancel_when()` returns True the unfinished requests are cancelled (they
        end `cancelled`, keeping the tokens they have).
        """
        gids = self.submit(requests)
        done: dict[int, Response] = {}
        deadline = None if timeout is None else time.perf_counter() + timeout
        cancelled = False
        while len(done) < len(gids):
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            if left == 0.0:
                raise TimeoutError(f"{len(gids) - len(done)} requests did not finish in {timeout} s")
            if cancel_when is not None and not cancelled and cancel_when():
                cancelled = True
                for g in gids:
                    if g not in done:
                        self.cancel_request(g)
            wait = left if cancel_when is None or cancelled else min(left or 0.1, 0.1)
            for gid, resp in self.advance(self.await_responses(timeout=wait)):
                if on_response is not None:
                    on_response(gid, resp)
                if resp.is_final:
                    done[gid] = resp
        return [done[g] for g in gids]

    def submit(self, requests: Sequence[Request]) -> list[int]:
        """Start requests the way the topology serves them (disaggregated if it can)."""
        requests = self._check(requests)
        if not self.context_ids:
            return self.enqueue_requests(requests)
        limit = self.topo.router.local_prefill_max_tokens
        if limit <= 0:
            return self.enqueue_context(requests)
        gids = []
        for r in requests:  # conditional disaggregation, request by request
            gen = self._route(self.generation_ids, None, "gen", r.input_token_ids)
            cached = self.prefix[gen].cached_tokens(r.input_token_ids)
            if run_locally(len(r.input_token_ids), cached, limit):
                gids += self.enqueue_requests([r], select_id=gen)
            else:
                gids += self.enqueue_context([r])
        return gids

    def advance(self, responses: list[tuple[int, Response]]) -> list[tuple[int, Response]]:
        """Move context responses on to generation; returns the client-visible responses.

        Streaming responses pass through as they come (new tokens only); a final
        response holds all output tokens.
        """
        out = []
        for gid, resp in responses:
            t = self._tracks.get(gid)
            if t is None:
                continue
            if t.phase == _CTX:
                t.metrics["context_executor"] = t.executor
                cpp = resp.result.context_phase_params if resp.result else None
                if resp.has_error() or cpp is None:
                    out.append((gid, self._final(gid, resp)))  # error, or finished by the first token
                    continue
                if t.cancelled:
                    send(self.comms.ctl, {"op": "cancel", "req_id": t.exec_req_id},
                         self.leaders[t.executor], TAG_TO_EXEC)  # frees the held blocks
                    out.append((gid, self._final(gid, Response(gid, Result([], True, "cancelled")))))
                    continue
                req = copy.deepcopy(t.request)
                req.context_phase_params = ContextPhaseParams(cpp.req_id, cpp.first_gen_tokens, cpp.opaque_state)
                try:
                    self.enqueue_generation([req], [gid])
                except Exception as err:  # noqa: BLE001 - fail this request alone, free its context's KV
                    send(self.comms.ctl, {"op": "cancel", "req_id": t.exec_req_id}, self.leaders[t.executor],
                         TAG_TO_EXEC)
                    out.append((gid, self._final(gid, Response(gid, None, f"internal error: the generation "
                                                               f"phase could not start: {err}"))))
                continue
            t.metrics.setdefault("generation_executor", t.executor)
            if resp.is_final:
                out.append((gid, self._final(gid, resp)))
            else:
                t.metrics.setdefault("streamed", []).extend(resp.result.output_token_ids)
                out.append((gid, resp))
        return out

    def _final(self, gid: int, resp: Response) -> Response:
        t = self._tracks.pop(gid)
        now = time.perf_counter()
        m = t.metrics
        streamed = m.pop("streamed", [])
        if resp.result is not None:
            tokens = streamed + list(resp.result.output_token_ids) if t.request.streaming else list(
                resp.result.output_token_ids)
            m.update({k: v for k, v in resp.result.metrics.items() if k != "executor"})
            resp = Response(gid, Result(tokens, True, resp.result.finish_reason, None, m), None, resp.client_id)
        else:
            resp = Response(gid, None, resp.error_msg, resp.client_id, resp.error_param)
        first = t.t_first if t.t_first is not None else now
        m["ttft_ms"] = (first - t.t_enqueue) * 1e3
        m["e2e_ms"] = (now - t.t_enqueue) * 1e3
        return resp

    # ---- introspection ---------------------------------------------------

    def executor_stats(self, timeout: float = 30.0) -> dict[int, dict]:
        """Ask every executor for its counters (blocks, queues, iterations)."""
        self._stats = {}
        for leader in self.leaders.values():
            send(self.comms.ctl, {"op": "stats"}, leader, TAG_TO_EXEC)
        deadline = time.perf_counter() + timeout
        while len(self._stats) < len(self.leaders):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"executors {sorted(set(self.leaders) - set(self._stats))} did not answer")
            if not self.poll():
                self._backoff.idle()
        return dict(self._stats)

    def wait_pools_full(self, timeout: float = 30.0) -> dict[int, dict]:
        """Wait until every executor's KV pool is fully free; raise with the counters if not."""
        deadline = time.perf_counter() + timeout
        while True:
            stats = self.executor_stats(timeout)
            if all(s["free_blocks"] == s["num_blocks"] for s in stats.values()):
                return stats
            if time.perf_counter() > deadline:
                raise AssertionError(f"KV blocks still held after {timeout} s: {stats}")
            time.sleep(0.05)

    # ---- lifecycle -------------------------------------------------------

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Wait for every executor to load its model; raise if any failed."""
        left = set(self.leaders)
        deadline = time.perf_counter() + timeout
        errors = []
        while left:
            got = recv_ready(self.comms.ctl, _any(), TAG_TO_ORCH)
            if got is None:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"executors {sorted(left)} did not start within {timeout} s")
                self._backoff.idle()
                continue
            msg, _ = got
            if msg["op"] == "ready":
                left.discard(msg["executor"])
                self.devices[msg["executor"]] = msg.get("device", "?")
                if msg["error"]:
                    errors.append(msg["error"])
        if errors:
            raise RuntimeError("executors failed to start:\n  " + "\n  ".join(errors))

    def shutdown(self) -> None:
        for leader in self.leaders.values():
            send(self.comms.ctl, {"op": "shutdown"}, leader, TAG_TO_EXEC)

    # ---- split phases for a server (disagg-mpi serve) --------------------

    def enqueue_generation_only(self, requests: Sequence[Request], select_gen_id: int | None = None) -> list[int]:
        """Start the generation phase of contexts run earlier (each request carries its
        `context_phase_params`), under new global ids; `advance` handles their responses."""
        return self._enqueue_on_generation(requests, RequestType.REQUEST_TYPE_GENERATION_ONLY, select_gen_id)

    def finish_context_only(self, gid: int, resp: Response) -> Response:
        """Close a context-only request on its context response instead of moving it on
        to generation (what `advance` does); the final response keeps the ContextPhaseParams.
        A cancelled request has its held blocks freed and comes back cancelled."""
        t = self._tracks.get(gid)
        if t is None:
            return resp
        t.metrics["context_executor"] = t.executor
        cpp = resp.result.context_phase_params if resp.result is not None else None
        if t.cancelled and resp.is_final:
            if cpp is not None:
                send(self.comms.ctl, {"op": "cancel", "req_id": t.exec_req_id}, self.leaders[t.executor],
                     TAG_TO_EXEC)
            return self._final(gid, Response(gid, Result([], True, "cancelled")))
        final = self._final(gid, resp)
        if final.result is not None:
            final.result.context_phase_params = cpp
        return final

    def request_executor_stats(self) -> None:
        """Ask every executor for its counters without waiting; `poll` collects the
        answers into `latest_executor_stats()`."""
        for leader in self.leaders.values():
            send(self.comms.ctl, {"op": "stats"}, leader, TAG_TO_EXEC)

    def latest_executor_stats(self) -> dict[int, dict]:
        return dict(self._stats)

    @property
    def num_tracked(self) -> int:
        """Requests rank 0 keeps state for: 0 once idle (a refused or failed request leaves none)."""
        return len(self._tracks)


def _any() -> int:
    from mpi4py import MPI

    return MPI.ANY_SOURCE

"""Rank 0 (kLEADER): routes requests and owns the two-phase flow.

Follows the seed's `DisaggExecutorOrchestrator`: `enqueue_context`,
`enqueue_generation`, `await_context_responses`, `await_generation_responses`,
each keyed by a *global* request id; the orchestrator maps it to the
request ids of the context and generation executors (`tracks.py`).

A request started with `submit` (or `generate`, or by the HTTP server) is moved from its context
phase to its generation phase by rank 0 itself, as soon as the context executor answers (inside
`poll`); callers only consume client-visible responses (`await_responses`). `enqueue_context`
keeps the seed's manual flow: the caller awaits the context answer and enqueues the generation.

The direct hand-off (`cache_transceiver_config.direct_handoff` on every executor): `submit` routes
both phases at once and parks the generation phase on its executor (`_start_direct`); the context
leader sends the params straight there (engine/direct.py), and its answer here only records the
context's metrics and moves the track on (`_on_direct_answer`). Rank 0 stays the orchestrator of
record: it routes, maps ids, streams, cancels and finalizes as before.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import deque
from collections.abc import Callable, Sequence

from ..api import ContextPhaseParams, Request, RequestType, Response, Result
from ..config import Topology
from ..hops import Hop
from ..protocol import Cancel, Enqueue, ExecutorStats, Message, ProtocolError, Responses, Tag
from ..runtime.comms import Comms, recv_ready
from .admission import admitted, model_limits
from .fleet import Fleet, any_source
from .router import Router, run_locally
from .sample_routes import SampleRoutes
from .tracks import CONTEXT, GENERATION, Flow, Track, Tracks


class DisaggOrchestrator:
    def __init__(self, topo: Topology, comms: Comms):
        self.topo = topo
        self.comms = comms
        self.fleet = f = Fleet(topo, comms)  # what rank 0 knows of each executor (fleet.py)
        # The fleet's tables under the names the routing below and callers (serve/app.py) read.
        self.context_ids, self.generation_ids = f.context_ids, f.generation_ids
        self.load, self.free_blocks, self.devices, self.prefix = f.load, f.free_blocks, f.devices, f.prefix
        self.router = Router(topo.router.policy)
        self.groups = SampleRoutes()
        self.tracks = Tracks()
        self._context_answers: deque[tuple[int, Response]] = deque()  # Flow.MANUAL only
        self._out: deque[tuple[int, Response]] = deque()  # what callers see
        self._seed_rng = random.Random()
        self.direct = f.direct_handoff

    def _send(self, msg: Message, executor: int) -> None:
        self.fleet.send(msg, executor)

    # ---- enqueue ---------------------------------------------------------

    def _route(self, candidates: list[int], select: int | None, what: str, r: Request) -> int:
        if select is None:  # (the members of a sample group go where the first went: sample_routes.py)
            cached = ({e: self.prefix[e].cached_tokens(r.input_token_ids) for e in candidates}
                      if self.router.policy == "kv_aware" else None)
            return self.groups.pick(r.sample_group, what, candidates,
                                    lambda: self.router.pick(candidates, self.load, cached))
        if select not in candidates:
            raise ValueError(f"select_{what}_id={select} is not a {what} executor; allowed: {candidates}")
        return select

    def _dispatch(self, gid: int, request: Request, executor: int, phase: str, notify: list | None = None) -> None:
        exec_req_id = self.tracks.next_exec_id()
        # An HTTP client's context_only: its hold is capped on the executor (engine/hold_cap.py).
        client_hold = phase == CONTEXT and self.tracks.get(gid).flow is Flow.CONTEXT_ONLY
        # Sent before any bookkeeping: a request that cannot be sent leaves none behind.
        self._send(Enqueue([(exec_req_id, request)], client_hold, notify), executor)
        self.tracks.assign(gid, executor, phase, exec_req_id)
        m = self.tracks.get(gid).metrics
        m.stamp(Hop.GEN_ENQUEUED if m.passed(Hop.DISPATCH) else Hop.DISPATCH)
        self.fleet.count(executor, request)

    def _dispatch_new(self, gid: int, request: Request, executor: int, phase: str) -> None:
        try:
            self._dispatch(gid, request, executor, phase)
        except BaseException:
            self.tracks.drop(gid)  # rank 0 forgets a request it could not start
            raise

    def _check(self, requests: Sequence[Request], generation_only: bool = False) -> list[Request]:
        """Every request's values, before any of them starts (admission.py): all or none."""
        limits = model_limits(str(self.topo.model.path))
        return [admitted(r, limits, generation_only) for r in requests]

    def _new(self, request: Request, flow: Flow) -> int:
        """Track an admitted request (`_check` made it rank 0's own copy)."""
        sc = request.sampling_config
        if sc.seed is None and sc.temperature > 0:
            sc.seed = self._seed_rng.getrandbits(63)  # both phases must sample with the same seed
        return self.tracks.new(request, flow)

    def _start_one_phase(self, r: Request, request_type: RequestType, select_id: int | None) -> int:
        """An admitted request that runs where it decodes: aggregated, or a client's generation-only."""
        ex = self._route(self.generation_ids, select_id, "gen", r)
        r.request_type = request_type
        gid = self._new(r, Flow.AUTO)
        self._dispatch_new(gid, r, ex, GENERATION)
        return gid

    def _start_context(self, r: Request, select_id: int | None, flow: Flow) -> int:
        ex = self._route(self.context_ids or self.generation_ids, select_id, "context", r)
        r.request_type = RequestType.REQUEST_TYPE_CONTEXT_ONLY
        gid = self._new(r, flow)
        self._dispatch_new(gid, r, ex, CONTEXT)
        return gid

    def _start_direct(self, r: Request, gen: int) -> int:
        """Flow.AUTO with the direct hand-off: the generation phase is parked on `gen` first (so its
        context's notice rarely comes before it), then the context phase names it."""
        ctx = self._route(self.context_ids, None, "context", r)
        r.request_type = RequestType.REQUEST_TYPE_CONTEXT_ONLY
        gid = self._new(r, Flow.AUTO)
        gen_req = dataclasses.replace(r, request_type=RequestType.REQUEST_TYPE_GENERATION_ONLY)
        gen_id = self.tracks.next_exec_id()
        try:
            self._send(Enqueue([(gen_id, gen_req)], await_context=True), gen)
            self.tracks.get(gid).metrics.stamp(Hop.GEN_ENQUEUED)
            try:
                self._dispatch(gid, r, ctx, CONTEXT, notify=[self.fleet.leaders[gen], gen_id])
            except BaseException:
                self._send(Cancel(gen_id), gen)  # (its answer finds no track, and is dropped)
                raise
        except BaseException:
            self.tracks.drop(gid)
            raise
        self.tracks.park(gid, gen, gen_id)
        self.fleet.count(gen, gen_req)
        return gid

    def _start_generation(self, gid: int, r: Request, select_id: int | None) -> None:
        """The generation phase of a tracked request (`r` admitted, its params attached)."""
        r.request_type = RequestType.REQUEST_TYPE_GENERATION_ONLY
        self.tracks.get(gid).request = r
        self._dispatch(gid, r, self._route(self.generation_ids, select_id, "gen", r), GENERATION)

    def enqueue_requests(self, requests: Sequence[Request], select_id: int | None = None) -> list[int]:
        """Aggregated serving: each request runs both phases on one executor."""
        aggregated = RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION
        return [self._start_one_phase(r, aggregated, select_id) for r in self._check(requests)]

    def enqueue_generation_only(self, requests: Sequence[Request], select_gen_id: int | None = None) -> list[int]:
        """Start the generation phase of contexts run earlier (each request carries its
        `context_phase_params`, e.g. from an HTTP client), under new global ids."""
        generation = RequestType.REQUEST_TYPE_GENERATION_ONLY
        return [self._start_one_phase(r, generation, select_gen_id)
                for r in self._check(requests, generation_only=True)]

    def enqueue_context(self, requests: Sequence[Request], select_context_id: int | None = None,
                        flow: Flow = Flow.MANUAL) -> list[int]:
        """The context phase. Flow.MANUAL (the seed's API): the answers come from
        `await_context_responses`, and the caller enqueues the generation phase; Flow.AUTO: rank 0
        moves each on by itself; Flow.CONTEXT_ONLY: the answer, with its ContextPhaseParams, is the
        final response."""
        return [self._start_context(r, select_context_id, flow) for r in self._check(requests)]

    def enqueue_generation(self, requests: Sequence[Request], global_ids: Sequence[int],
                           select_gen_id: int | None = None) -> None:
        requests = self._check(requests, generation_only=True)
        for r, gid in zip(requests, global_ids, strict=True):
            if gid not in self.tracks:
                raise KeyError(f"global request id {gid} is unknown")
        for r, gid in zip(requests, global_ids, strict=True):
            self._start_generation(gid, r, select_gen_id)

    def submit(self, requests: Sequence[Request]) -> list[int]:
        """Start requests the way the topology serves them (disaggregated if it can); rank 0
        moves each from its context phase to its generation phase."""
        requests = self._check(requests)
        aggregated = RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION
        if not self.context_ids:
            return [self._start_one_phase(r, aggregated, None) for r in requests]
        limit = self.topo.router.local_prefill_max_tokens
        gids = []
        for r in requests:  # conditional disaggregation, request by request
            if r.benchmark_generation_only:  # no context to compute: straight to where it decodes
                gids.append(self._start_one_phase(r, aggregated, None))
                continue
            gen = self._route(self.generation_ids, None, "gen", r) if limit > 0 or self.direct else -1
            if limit > 0 and run_locally(len(r.input_token_ids), self.prefix[gen].cached_tokens(r.input_token_ids),
                                         limit):
                gids.append(self._start_one_phase(r, aggregated, gen))
            elif self.direct:
                gids.append(self._start_direct(r, gen))
            else:
                gids.append(self._start_context(r, None, Flow.AUTO))
        return gids

    def cancel_request(self, gid: int) -> None:
        t = self.tracks.get(gid)
        if t is None:
            return
        t.cancelled = True
        self._send(Cancel(t.exec_req_id), t.executor)
        if t.parked is not None:  # both sides drop it (a held context is released by its generation side)
            self._send(Cancel(t.parked[1]), t.parked[0])

    # ---- responses: the two-phase flow ---------------------------------------

    def poll(self) -> bool:
        """Take in what the executors sent; move answered contexts on to generation."""
        got_any = False
        while (got := recv_ready(self.comms.ctl, any_source(), Tag.TO_ORCHESTRATOR)):
            got_any = True
            match got[0]:
                case Responses(ex, responses, load, free_blocks):
                    self.fleet.report(ex, load, free_blocks)
                    self._on_responses(ex, responses)
                case ExecutorStats(ex, counters):
                    self.fleet.stats[ex] = counters
                case other:
                    raise ProtocolError(f"rank {got[1]} sent {other!r:.120} to rank 0 while serving")
        return got_any

    def _on_responses(self, ex: int, responses: list[Response]) -> None:
        now, wall = time.perf_counter(), time.time()
        for resp in responses:
            exec_req_id = resp.request_id
            gid = self.tracks.of_response(ex, resp, now)
            if gid is None:
                continue
            resp.request_id = gid
            t = self.tracks.get(gid)
            if t.parked == (ex, exec_req_id):  # the generation side answered before its context did
                t.early.append(resp)
                continue
            self._on_response(gid, t, resp, wall)

    def _on_response(self, gid: int, t: Track, resp: Response, wall: float) -> None:
        """One response of a tracked request, under its global id."""
        t.carry_prompt_logprobs(resp.result)
        if t.phase == CONTEXT:
            t.metrics.context_executor = t.executor
            if resp.result is not None and resp.is_final:  # the context executor's hops, and ours
                t.metrics.merge(resp.result.metrics, skip=("executor",))
                t.metrics.stamp(Hop.CTX_ANSWER_RECEIVED, wall)
            self._on_context_answer(gid, t, resp)
            return
        if t.metrics.generation_executor is None:
            t.metrics.generation_executor = t.executor
        if resp.is_final:
            self._out.append((gid, self.tracks.finalize(gid, resp)))
        else:
            t.streamed.extend(resp.result.output_token_ids)
            if resp.result.log_probs:
                t.streamed_logprobs.extend(resp.result.log_probs)
            t.prompt_logprobs_out = True
            self._out.append((gid, resp))

    def _on_direct_answer(self, gid: int, t: Track, resp: Response) -> None:
        """The context answer of a request whose generation phase is parked (direct hand-off): the
        params went to it already; the answer moves the track there, or ends the request."""
        if not resp.is_final:
            return
        gen, gen_id = t.parked
        if resp.has_error() or resp.result is None or resp.result.context_phase_params is None:
            self._send(Cancel(gen_id), gen)  # (an error, or finished by its first token: the parked one ends)
            self._out.append((gid, self.tracks.finalize(gid, resp)))
            return
        # Cancelled or not, the generation side has the context now and answers for it (it was sent
        # the cancel too, and releases the context once no pull reads it).
        early = t.early
        self.tracks.unpark(gid)
        t.early = []
        for r in early:
            self._on_response(gid, t, r, time.time())

    def _on_context_answer(self, gid: int, t: Track, resp: Response) -> None:
        if t.parked is not None:
            self._on_direct_answer(gid, t, resp)
            return
        if t.flow is Flow.MANUAL:
            self._context_answers.append((gid, resp))
            return
        if not resp.is_final:
            return
        cpp = resp.result.context_phase_params if resp.result else None
        if t.cancelled and cpp is not None:
            self._send(Cancel(t.exec_req_id), t.executor)  # frees the held blocks
            self._out.append((gid, self.tracks.finalize(gid, Response(gid, Result([], True, "cancelled")))))
        elif t.flow is Flow.CONTEXT_ONLY:
            final = self.tracks.finalize(gid, resp)
            if final.result is not None:
                final.result.context_phase_params = cpp
            self._out.append((gid, final))
        elif resp.has_error() or cpp is None:  # an error, or finished by its first token
            self._out.append((gid, self.tracks.finalize(gid, resp)))
        else:
            # Admitted at submit: the same values go on (a shallow copy: the prompt is never changed).
            req = dataclasses.replace(t.request, context_phase_params=ContextPhaseParams(
                cpp.req_id, cpp.first_gen_tokens, cpp.opaque_state))
            try:
                self._start_generation(gid, req, None)
            except Exception as err:  # noqa: BLE001 - fail this request alone, free its context's KV
                self._send(Cancel(t.exec_req_id), t.executor)
                self._out.append((gid, self.tracks.finalize(gid, Response(
                    gid, None, f"internal error: the generation phase could not start: {err}"))))

    def _await(self, queues: list[deque], timeout: float | None) -> list[tuple[int, Response]]:
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            if self.poll():
                self.fleet.backoff.busy()
            out = [x for q in queues for x in q]
            if out or (deadline is not None and time.perf_counter() >= deadline):
                for q in queues:
                    q.clear()
                return out
            self.fleet.backoff.idle()

    def await_context_responses(self, timeout: float | None = None) -> list[tuple[int, Response]]:
        """Context answers of Flow.MANUAL requests (`enqueue_context`)."""
        return self._await([self._context_answers], timeout)

    def await_generation_responses(self, timeout: float | None = None) -> list[tuple[int, Response]]:
        return self._await([self._out], timeout)

    def await_responses(self, timeout: float | None = None) -> list[tuple[int, Response]]:
        """Everything a caller sees, whichever arrives first: streamed tokens, final responses
        (every output token, under the global id, with metrics), and manual context answers."""
        return self._await([self._context_answers, self._out], timeout)

    # ---- one call for both phases ------------------------------------------

    def generate(self, requests: Sequence[Request], timeout: float | None = None,
                 on_response: Callable[[int, Response], None] | None = None,
                 cancel_when: Callable[[], bool] | None = None) -> list[Response]:
        """Run requests to completion through both phases; final responses in input order.

        Each final response carries every output token (the first one included)
        and the request's metrics: ttft_ms, e2e_ms, context_executor,
        generation_executor, kv_transfer_ms (claim to landed), kv_claim_ms (of it, waiting for
        the context executor to grant the claim; kv_claim_answer_ms, of that, until the context
        leader answered, by the two ranks' wall clocks), kv_transfer_bytes, and hops (when it passed
        each place on every rank: hops.py). Once
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
            for gid, resp in self.await_responses(timeout=wait):
                if on_response is not None:
                    on_response(gid, resp)
                if resp.is_final:
                    done[gid] = resp
        return [done[g] for g in gids]

    # ---- the executors: counters and lifecycle (fleet.py) ------------------------

    def request_executor_stats(self) -> None:
        """Ask every executor for its counters without waiting; `poll` collects the
        answers into `latest_executor_stats()`."""
        self.fleet.request_stats()

    def latest_executor_stats(self) -> dict[int, dict]:
        return dict(self.fleet.stats)

    def executor_stats(self, timeout: float = 30.0) -> dict[int, dict]:
        """Ask every executor for its counters (blocks, queues, iterations)."""
        return self.fleet.collect_stats(self.poll, timeout)

    def wait_pools_full(self, timeout: float = 30.0) -> dict[int, dict]:
        """Wait until every executor's KV pool is fully free; raise with the counters if not."""
        return self.fleet.wait_pools_full(self.poll, timeout)

    def wait_ready(self, timeout: float = 600.0, on_ready: Callable[[int, str], None] | None = None) -> None:
        """Wait for every executor to load its model; raise if any failed. `on_ready(executor, device)`
        is called as each one reports ready (fleet.py)."""
        self.fleet.wait_ready(timeout, on_ready)

    def shutdown(self) -> None:
        self.fleet.shutdown()

    @property
    def num_tracked(self) -> int:
        """Requests rank 0 keeps state for: 0 once idle (a refused or failed request leaves none)."""
        return len(self.tracks)


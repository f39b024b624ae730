"""What rank 0 knows of each request in flight: its phase, where it runs, its metrics.

Pure bookkeeping (no MPI): global request ids, the map from an executor's own request ids
back to them, and the final response that sums a request up.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from ..api import Request, RequestMetrics, Response, Result, TokenLogprobs
from ..hops import Hop

CONTEXT, GENERATION = "context", "generation"


class Flow(enum.Enum):
    """Who moves a request from its context phase to its generation phase."""

    AUTO = "auto"  # rank 0, as soon as the context answers (submit, generate, serve)
    MANUAL = "manual"  # the caller: await_context_responses, then enqueue_generation (the seed's API)
    CONTEXT_ONLY = "context_only"  # nobody: the context answer (with its params) is the final response


@dataclass
class Track:
    request: Request
    flow: Flow = Flow.AUTO
    phase: str = GENERATION
    executor: int = -1
    exec_req_id: int = -1
    t_enqueue: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    cancelled: bool = False
    streamed: list[int] = field(default_factory=list)  # tokens already passed on to a streaming caller
    streamed_logprobs: list[TokenLogprobs] = field(default_factory=list)  # theirs, when asked
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # The prompt's logprobs (Request.num_prompt_logprobs), from the phase that prefilled; whether a
    # response to the caller carried them already (the first one does, and the final one).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs_out: bool = False
    # The direct hand-off: (executor, its request id) of the generation phase parked while the context
    # runs, and what that executor answered before the context's answer reached rank 0 (kept in order
    # and taken once the context's answer is in, so the caller sees what it sees without it).
    parked: tuple[int, int] | None = None
    early: list[Response] = field(default_factory=list)

    def carry_prompt_logprobs(self, r: Result | None) -> None:
        """Keep the prompt logprobs a response brings; put them on the first one that goes out."""
        if r is None:
            return
        if r.prompt_log_probs is not None:
            self.prompt_logprobs = r.prompt_log_probs
        elif not self.prompt_logprobs_out:
            r.prompt_log_probs = self.prompt_logprobs


class Tracks:
    def __init__(self) -> None:
        self._gids = itertools.count(1)
        self._exec_ids = itertools.count(1)
        self._tracks: dict[int, Track] = {}
        self._by_exec: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self._tracks)

    def __contains__(self, gid: int) -> bool:
        return gid in self._tracks

    def get(self, gid: int) -> Track | None:
        return self._tracks.get(gid)

    def new(self, request: Request, flow: Flow) -> int:
        gid = next(self._gids)
        self._tracks[gid] = t = Track(request, flow)
        t.metrics.stamp(Hop.ARRIVAL)
        return gid

    def next_exec_id(self) -> int:
        """The id the next phase sent to an executor will have there."""
        return next(self._exec_ids)

    def assign(self, gid: int, executor: int, phase: str, exec_req_id: int) -> None:
        """The request's next phase runs on `executor` under `exec_req_id` (sent already)."""
        t = self._tracks[gid]
        t.phase, t.executor, t.exec_req_id = phase, executor, exec_req_id
        self._by_exec[(executor, exec_req_id)] = gid

    def drop(self, gid: int) -> None:
        t = self._tracks.pop(gid, None)
        if t is not None:
            self._by_exec.pop((t.executor, t.exec_req_id), None)
            if t.parked is not None:
                self._by_exec.pop(t.parked, None)

    def park(self, gid: int, executor: int, exec_req_id: int) -> None:
        """The request's generation phase waits on `executor` under `exec_req_id` (sent already; the
        direct hand-off): its responses map to the request from now on."""
        self._tracks[gid].parked = (executor, exec_req_id)
        self._by_exec[(executor, exec_req_id)] = gid

    def unpark(self, gid: int) -> Track:
        """The context answered: the request is in its parked generation phase."""
        t = self._tracks[gid]
        (t.executor, t.exec_req_id), t.phase, t.parked = t.parked, GENERATION, None
        return t

    def of_response(self, executor: int, resp: Response, now: float) -> int | None:
        """The global id of an executor's response (None: already finished here), noting its
        first token's time; a final response ends the mapping."""
        key = (executor, resp.request_id)
        gid = self._by_exec.get(key)
        if gid is None:
            return None
        if resp.is_final:
            del self._by_exec[key]
        t = self._tracks.get(gid)
        if t is None:  # a parked generation phase's answer to its cancel, after the request ended
            return None
        if resp.result is not None and resp.result.output_token_ids and t.t_first is None:
            t.t_first = now
        return gid

    def finalize(self, gid: int, resp: Response) -> Response:
        """The request's final response under its global id: every output token (streamed ones
        included) and its metrics (ttft_ms, e2e_ms, executors, the KV hand-off's)."""
        t = self._tracks.pop(gid)
        now = time.perf_counter()
        m = t.metrics
        m.stamp(Hop.FINAL)
        if resp.result is not None:
            r = resp.result
            tokens = t.streamed + list(r.output_token_ids) if t.request.streaming else list(r.output_token_ids)
            lps = r.log_probs
            if lps is not None and t.request.streaming:
                lps = t.streamed_logprobs + list(lps)
            m.merge(r.metrics, skip=("executor",))
            resp = Response(gid, Result(tokens, True, r.finish_reason, None, m, lps,
                                        r.prompt_log_probs or t.prompt_logprobs), None, resp.client_id)
        else:
            resp = Response(gid, None, resp.error_msg, resp.client_id, resp.error_param, resp.retry_after)
        first = t.t_first if t.t_first is not None else now
        m.ttft_ms = (first - t.t_enqueue) * 1e3
        m.e2e_ms = (now - t.t_enqueue) * 1e3
        return resp

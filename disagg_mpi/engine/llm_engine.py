"""One executor's decisions: admission, scheduling, responses, KV holding.

Runs on the executor's leader rank (or in process). It talks to the ranks
that run the model through an `ExecutorGroup` (one rank in process, TP x PP
ranks under MPI) and to other executors' leaders through `send_peer`, so the
same code serves aggregated, context-only and generation-only requests.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..api import (
    ContextPhaseParams,
    ExecutorConfig,
    FinishReason,
    Request,
    RequestError,
    RequestMetrics,
    RequestType,
    Response,
    Result,
    as_int,
)
from ..hops import Hop
from ..knobs import env_value
from ..transfer.cache_state import CacheState
from ..transfer.opaque import OpaqueState, OpaqueStateError
from . import benchmark
from .block_manager import BlockManager
from .cuda_graphs import is_decode_only
from .grammar import Grammars
from .grammar_masks import fill_masks
from .handoff import Handoff
from .logprobs import NOT_ASKED, logprobs_plan, prompt_rows
from .model_runner import StepPlan
from .overlap import next_decode_inputs
from .request_checks import make_sequence
from .sample_groups import PrefillGroups
from .scheduler import RequestTooLargeError, Scheduler
from .sequence import Sequence
from .step_isolation import retry_alone
from .step_log import StepLog, mark_first_chunks, mark_first_tokens

log = logging.getLogger(__name__)


_as_int = as_int


def _param_of(err: Exception) -> str | None:
    """The request field a refusal is about (shown to HTTP clients as the error's `param`)."""
    if isinstance(err, OpaqueStateError):
        return "context_phase_params.opaque_state"
    return getattr(err, "param", None)


class ExecutorGroup(Protocol):
    """The ranks that run one executor's model, seen from its leader."""

    def run_step(self, plan: StepPlan) -> Any: ...  # model_runner.Sampled

    def start_pull(self, req_id: int, opaque: OpaqueState, blocks: list[int]) -> None: ...

    def poll_transfers(self) -> list[tuple[int, int, float]]: ...

    def pull_in_flight(self, req_id: int) -> bool: ...

    def unsettled(self, req_id: int) -> bool: ...  # a finished pull's copy may still read the context's pool

    def can_pull_unclaimed(self, opaque: OpaqueState) -> bool: ...  # optional: see handoff.py

    @property
    def exports_ipc(self) -> bool: ...  # optional: generation ranks may map our pools (handoff.py)

    @property
    def chains_decode(self) -> bool: ...  # runs StepPlan.next_inputs ahead (overlap.py)

    @property
    def chain_pending(self) -> bool: ...  # a step launched ahead waits to be claimed


@dataclass
class _Meta:
    request_type: RequestType
    streaming: bool
    client_id: str | None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None  # (perf_counter; set by step_log.mark_first_tokens)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    num_streamed: int = 0  # output tokens already sent in non-final streaming responses


class LLMEngine:
    def __init__(self, group: ExecutorGroup, model_config: Any, config: ExecutorConfig,
                 cache_state: CacheState, executor_id: int = 0, world_ranks: tuple[int, ...] = (0,),
                 key: bytes = b"", send_peer: Callable[[int, dict], None] | None = None,
                 load_tokenizer: Callable[[], Any] | None = None):
        kv = config.kv_cache_config
        self.group = group
        self.model_config = model_config
        self.config = config
        self.executor_id = executor_id
        self.transceiver_enabled = config.cache_transceiver_config.enable_cache_transceiver
        self.blocks = BlockManager(kv.num_blocks, kv.block_size, kv.enable_prefix_reuse)
        self.scheduler = Scheduler(self.blocks, config.max_batch_size, config.max_num_tokens, env_value(
            "DISAGG_MAX_BYPASS"), env_value("DISAGG_MAX_BYPASS_SECONDS"), config.prefill_chunk_tokens)
        self.eos = set(model_config.eos_token_ids)
        self._meta: dict[int, _Meta] = {}
        self.handoff = Handoff(self, self.blocks, self.scheduler, group, config.cache_transceiver_config,
                               cache_state, key, executor_id, world_ranks, send_peer)
        self._responses: deque[Response] = deque()
        self._seed_rng = random.Random()
        self.stats: dict[str, Any] = {"iterations": 0, "tokens": 0}
        self.groups = PrefillGroups(self.scheduler, self.stats)  # parallel sampling (sample_groups.py)
        self._step_log = StepLog.open(executor_id)
        self._chains = bool(getattr(group, "chains_decode", False))
        self._predicted: list[int] | None = None  # request ids of the step predicted last
        self.grammars = Grammars(load_tokenizer, model_config.vocab_size)  # guided decoding (grammar.py)

    # ---- admission -------------------------------------------------------

    def add_request(self, req_id: int, request: Request, client_hold: bool = False,
                    notify: tuple[int, int] | None = None, await_context: bool = False) -> None:
        """Admit a request; a bad one is answered with an error at once. `client_hold`: a context-only
        request whose generation phase a client sends itself; its hold is capped (hold_cap.py).
        The direct hand-off (direct.py): `notify`, a context-only request's generation (leader rank,
        request id) to send its params to; `await_context`, a generation-only request parked for them."""
        meta = _Meta(request.request_type, request.streaming, request.client_id)
        generation = request.request_type == RequestType.REQUEST_TYPE_GENERATION_ONLY
        if not await_context:  # (a parked one is admitted when its params come)
            meta.metrics.stamp(Hop.GEN_ADMITTED if generation else Hop.ADMITTED)
        self._meta[req_id] = meta
        try:
            seq = make_sequence(req_id, request, self.model_config, self.eos, self.transceiver_enabled,
                                self._seed_rng)
            if getattr(request, "guided_decoding", None) is not None:
                seq.grammar = self.grammars.state(request.guided_decoding)
            if generation and await_context:
                self.handoff.direct.park(seq, request)
            elif generation:
                self.handoff.admit(seq, request)
            elif seq.fake_context and seq.check_stop(seq.output_ids[0]) is not None:  # ended by its first token
                seq.finish(seq.check_stop(seq.output_ids[0]))
                self._finish(seq)
            else:
                if client_hold and seq.keep_blocks:
                    self.handoff.check_client_hold(seq)
                    seq.held_for_client = True
                if not self.groups.admit(seq):
                    self.scheduler.add(seq)
                if notify is not None:
                    self.handoff.notify[req_id] = (int(notify[0]), int(notify[1]))
        except (RequestError, RequestTooLargeError, ValueError, OpaqueStateError) as err:
            if await_context:
                self.handoff.direct.leave(req_id)
            self._error(req_id, str(err), _param_of(err), getattr(err, "retry_after", None))
        except TypeError as err:  # a field of the wrong type that the checks above missed
            self._error(req_id, f"malformed request: {err}")

    # ---- steps -----------------------------------------------------------

    def step(self) -> None:
        self.housekeeping()
        # A step launched ahead (overlap.py) for exactly the running sequences is already on the
        # GPU: run it as predicted and admit newcomers in the step after, instead of dropping it.
        # They would have waited for it either way.
        ahead = (self._predicted is not None and self.group.chain_pending
                 and [s.req_id for s in self.scheduler.running] == self._predicted)
        self._predicted = None
        step = self.scheduler.schedule(admit=not ahead)
        if step.is_empty:
            return
        self.groups.on_step(step)  # (members of a group sharing a prompt computed here join this step)
        by_id = {seq.req_id: seq for seq, _ in step.items}
        for seq in benchmark.first_steps(step.items, self._meta):  # streamed as they join the batch
            self._emit(seq, list(seq.output_ids), final=False)
        mark_first_chunks(step.items, self._meta)
        t_start = time.time()
        try:
            sampled = self._run(step, predict=True)
        except Exception:
            log.exception("executor %d: a step of %d requests failed; running each alone", self.executor_id,
                          len(step.items))
            self._predicted = None
            step, sampled, failed = retry_alone(step, lambda one: self._run(one, predict=False))
            for rid, err in failed.items():  # (the request itself is at fault: the others go on)
                self.scheduler.abort(rid)
                self._error(rid, f"internal error while running the model: {type(err).__name__}: {err}")
            if step.is_empty:
                return
        self.stats["iterations"] += 1
        self.stats["tokens"] += step.num_tokens
        if self._step_log is not None:
            self._step_log.write(t_start, time.time(), [n for _, n in step.items])
        finished = self.scheduler.update(step, sampled)
        mark_first_tokens(sampled, self._meta)
        for rid, token in sampled.items():
            meta = self._meta.get(rid)
            seq = by_id[rid]
            if meta and meta.streaming and not seq.status.is_finished:
                self._emit(seq, [token], final=False)
        for seq in finished:
            self._finish(seq)

    def _run(self, step: Any, predict: bool) -> dict[int, int]:
        """Run one scheduled step on the executor's ranks: {req_id: sampled token}."""
        inputs = self.scheduler.make_step_inputs(step)
        by_id = {seq.req_id: seq for seq, _ in step.items}
        sampling = [by_id[r].sampling for r in inputs.sample_req_ids]
        plan = StepPlan(inputs, sampling,
                        [by_id[r].sample_key() for r in inputs.sample_req_ids],
                        histories=[by_id[r].all_ids if by_id[r].sampling.needs_history else None
                                   for r in inputs.sample_req_ids],
                        logprobs=logprobs_plan([by_id[r] for r in inputs.sample_req_ids]),
                        next_inputs=self._predict_next(step, inputs, sampling) if predict else None)
        rows = [i for i, r in enumerate(inputs.sample_req_ids) if by_id[r].grammar is not None]
        if rows:  # only the rows with a grammar cost a mask
            seqs = [by_id[inputs.sample_req_ids[i]] for i in rows]
            plan.mask_rows = rows
            plan.masks = fill_masks([s.grammar for s in seqs], [s.output_ids for s in seqs],
                                    self.model_config.vocab_size)
        plan.prompt_rows, plan.prompt_targets, plan.prompt_ks, owners = prompt_rows(step.items,
                                                                                  inputs.query_start_loc)
        if plan.next_inputs is not None:
            self._predicted = plan.next_inputs.sample_req_ids
        out = self.group.run_step(plan)
        if out.logprobs is not None:  # kept beside the tokens that scheduler.update appends next
            for rid, lp in zip(inputs.sample_req_ids, out.logprobs, strict=True):
                if lp is not None:
                    by_id[rid].logprobs.append(lp)
        for seq, lp in zip(owners, out.prompt_logprobs or [], strict=True):
            seq.prompt_logprobs.append(lp)
        return dict(zip(inputs.sample_req_ids, out.tokens, strict=True))

    def _predict_next(self, step, inputs, sampling) -> Any:
        """The next step's inputs when it can only be these sequences one position further
        (overlap.py), else None."""
        if not self._chains or self.scheduler.waiting or self.scheduler.ready:
            return None
        if len(sampling) != len(step.items) or not all(s.masked_greedy for s in sampling):
            return None
        if any(len(seq.output_ids) + 1 >= seq.max_tokens for seq, _ in step.items):
            return None   # one finishes by length now: the next step is smaller
        if not is_decode_only(inputs):
            return None
        return next_decode_inputs(inputs, self.blocks.block_size)

    # ---- responses -------------------------------------------------------

    def _finish(self, seq: Sequence) -> None:
        meta = self._meta.get(seq.req_id)
        if meta is None:
            return
        cpp = None
        if seq.keep_blocks:
            more = seq.finish_reason == "length" and seq.full_max_tokens > 1
            if more:
                cpp = self.handoff.hold(seq)
            else:
                self.blocks.free(seq.req_id)  # the first token ended it: nothing to hand off
                self.handoff.forget(seq.req_id)
        # Streaming: the final response carries only what was not streamed yet (the last
        # token; nothing for a cancelled request, whose tokens all went out already).
        tokens = list(seq.output_ids) if not meta.streaming else seq.output_ids[meta.num_streamed:]
        self._emit(seq, tokens, final=True, cpp=cpp)

    def _emit(self, seq: Sequence, tokens: list[int], final: bool, cpp: ContextPhaseParams | None = None) -> None:
        meta = self._meta[seq.req_id]
        reason = None
        if final:
            reason = seq.finish_reason
            if cpp is not None:
                reason = None  # not finished: the generation side goes on
            elif reason == "abort":
                reason = FinishReason.CANCELLED.value
            meta.metrics.executor = self.executor_id
            meta.metrics.num_prompt_tokens = len(seq.prompt_ids)
            self._meta.pop(seq.req_id)
        start = meta.num_streamed if meta.streaming else 0  # `tokens` is output_ids[start:start + len]
        lps = seq.logprobs[start:start + len(tokens)] if seq.num_logprobs != NOT_ASKED else None
        if meta.streaming:
            meta.num_streamed += len(tokens)
        result = Result(tokens, final, reason, cpp, meta.metrics if final else RequestMetrics(), lps)
        if seq.num_prompt_logprobs != NOT_ASKED and not seq.prompt_logprobs_sent:  # on the first response
            result.prompt_log_probs, seq.prompt_logprobs_sent = list(seq.prompt_logprobs), True
        self._responses.append(Response(seq.req_id, result, None, meta.client_id))

    def _error(self, req_id: int, message: str, param: str | None = None, retry_after: float | None = None) -> None:
        meta = self._meta.pop(req_id, None)
        self.handoff.forget(req_id)
        self._responses.append(Response(req_id, None, message, meta.client_id if meta else None, param,
                                        retry_after))

    def take_responses(self) -> list[Response]:
        out = list(self._responses)
        self._responses.clear()
        return out

    def cancel(self, req_id: int) -> None:
        if self.handoff.cancel(req_id):
            return
        seq = self.groups.cancel(req_id) or self.scheduler.abort(req_id)
        if seq is not None:
            self._finish(seq)

    def snapshot(self) -> dict[str, Any]:
        """Counters rank 0 can ask for (tests read the block accounting here)."""
        return {"num_blocks": self.blocks.num_blocks, "free_blocks": self.blocks.num_free,
                "held_contexts": self.handoff.num_held, "pending_transfers": self.handoff.num_pending,
                "parked": len(self.handoff.direct.parking),  # generation phases awaiting their context
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "inflight_tokens": self.load(), **self.handoff.hold_stats(), **self.stats}

    def load(self) -> int:
        return self.scheduler.num_inflight_tokens() + self.handoff.pending_tokens

    @property
    def busy(self) -> bool:
        return self.scheduler.has_work() or self.handoff.num_pending > 0 or self.groups.num_held > 0

    def housekeeping(self) -> None:
        """Timers and transfer completions; cheap, called every loop turn even when idle."""
        self.handoff.housekeeping()
        self.groups.tick()

    # ---- HandoffHost: what the hand-off asks of the engine ------------------

    def finish(self, seq: Sequence) -> None:
        self._finish(seq)

    def fail(self, req_id: int, message: str, param: str | None = None) -> None:
        self._error(req_id, message, param)

    def stream(self, seq: Sequence, tokens: list[int]) -> None:
        self._emit(seq, tokens, final=False)

    def metrics(self, req_id: int) -> RequestMetrics:
        return self._meta[req_id].metrics

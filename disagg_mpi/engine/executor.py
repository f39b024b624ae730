"""`Executor`: the seed's executor API for one in-process executor.

TensorRT-LLM runs the step loop in a background thread; here the loop is driven
by the caller: `await_responses` runs engine steps until a response is ready
or the timeout passes, which keeps a single-process executor deterministic.
Under MPI the same `LLMEngine` is driven by the rank loop instead
(`disagg_mpi.runtime.worker`).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any

import torch

from ..api import ExecutorConfig, Request, RequestError, Response
from ..model.loader import load_model
from ..model.tokenizer import load_tokenizer
from ..transfer.cache_state import CacheState
from .llm_engine import LLMEngine
from .model_runner import ModelRunner, Sampled, StepPlan
from .warm_up import enabled as warm_up_enabled
from .warm_up import warm_up

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _LocalGroup:
    """An executor of one rank: the step runs right here."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def run_step(self, plan: StepPlan) -> Sampled:
        return self.runner.execute(plan)

    @property
    def chain_pending(self) -> bool:
        return self.runner.chain_pending

    @property
    def chains_decode(self) -> bool:
        return self.runner.chains_decode

    def start_pull(self, req_id: int, opaque: Any, blocks: list[int]) -> None:
        raise RequestError("KV transfer needs an MPI job: use disagg_mpi.launch()")

    def poll_transfers(self) -> list[tuple[int, int, float]]:
        return []

    def pull_in_flight(self, req_id: int) -> bool:
        return False

    def unsettled(self, req_id: int) -> bool:
        return False


class Executor:
    def __init__(self, model: Any = "smollm2", config: ExecutorConfig | None = None):
        self.config = config = config or ExecutorConfig()
        config.cache_transceiver_config.check_available()
        dtype = _DTYPES[config.dtype]
        tokenizer = None  # guided decoding needs the model's tokenizer: only known from a path
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            spec = model
            tokenizer = lambda: load_tokenizer(spec)
            model = load_model(model, dtype=dtype, device=config.device, quantization=config.quantization)
        elif config.quantization != "none":
            raise ValueError(f"ExecutorConfig.quantization={config.quantization!r} applies when the executor "
                             "loads the model from a path or name; for a built model call "
                             "disagg_mpi.model.quant.quantize_model(model, mode) first and leave it 'none'")
        kv = config.kv_cache_config
        self.model = model
        mc = model.config
        self._runner = ModelRunner(model, kv.num_blocks, kv.block_size, config.device)
        self._runner.capture_decode_graphs(config.max_batch_size)
        cache_state = CacheState.create(mc.num_layers, mc.num_kv_heads, mc.head_dim, kv.block_size,
                                        config.dtype)
        self._engine = LLMEngine(_LocalGroup(self._runner), mc, config, cache_state, load_tokenizer=tokenizer)
        self.warm_up_report: dict | None = None   # what engine/warm_up.py ran (DISAGG_WARM_UP)
        if warm_up_enabled(self._runner.device.type):
            self.warm_up_report = warm_up(self._engine, mc.max_position_embeddings)
        self._ids = itertools.count(1)
        self._ready: deque[Response] = deque()
        self._shutdown = False

    # ---- the seed's API --------------------------------------------------

    def enqueue_request(self, request: Request) -> int:
        self._check_open()
        req_id = next(self._ids)
        self._engine.add_request(req_id, request)
        return req_id

    def enqueue_requests(self, requests: list[Request]) -> list[int]:
        return [self.enqueue_request(r) for r in requests]

    def await_responses(self, request_id: int | None = None, timeout: float | None = None) -> list[Response]:
        """Responses ready now, stepping the engine until there is one (or `timeout` s pass)."""
        self._check_open()
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            self._ready.extend(self._engine.take_responses())
            out = self._take(request_id)
            if out or not self._engine.busy:
                return out
            if deadline is not None and time.perf_counter() >= deadline:
                return out
            self._engine.step()

    def _take(self, request_id: int | None) -> list[Response]:
        if request_id is None:
            out = list(self._ready)
            self._ready.clear()
            return out
        out = [r for r in self._ready if r.request_id == request_id]
        self._ready = deque(r for r in self._ready if r.request_id != request_id)
        return out

    def cancel_request(self, request_id: int) -> None:
        self._engine.cancel(request_id)

    def get_latest_iteration_stats(self) -> dict[str, Any]:
        e = self._engine
        return {**e.stats, "num_free_blocks": e.blocks.num_free, "num_blocks": e.blocks.num_blocks,
                "inflight_tokens": e.load(), "num_running": len(e.scheduler.running),
                "num_waiting": len(e.scheduler.waiting)}

    def check_blocks_free(self) -> None:
        """The accounting check: raises if any KV block is still held."""
        self._engine.blocks.check_full()

    def shutdown(self) -> None:
        self._shutdown = True

    def _check_open(self) -> None:
        if self._shutdown:
            raise RuntimeError("the executor was shut down")

    # ---- convenience -----------------------------------------------------

    def generate(self, requests: list[Request]) -> list[Response]:
        """Enqueue, run to completion, and return one final response per request, in order.

        Streaming responses are folded: the final one carries every output token.
        """
        ids = self.enqueue_requests(requests)
        tokens: dict[int, list[int]] = {i: [] for i in ids}
        lps: dict[int, list] = {i: [] for i in ids}  # and their logprobs, where asked
        prompt_lps: dict[int, list] = {}  # the prompt's logprobs come on the first response, where asked
        final: dict[int, Response] = {}
        while len(final) < len(ids):
            for r in self.await_responses():
                if r.result is not None:
                    if requests[ids.index(r.request_id)].streaming:
                        tokens[r.request_id].extend(r.result.output_token_ids)
                        lps[r.request_id].extend(r.result.log_probs or [])
                    else:
                        tokens[r.request_id] = list(r.result.output_token_ids)
                        lps[r.request_id] = list(r.result.log_probs or [])
                    r.result.output_token_ids = list(tokens[r.request_id])
                    if r.result.log_probs is not None:
                        r.result.log_probs = list(lps[r.request_id])
                    if r.result.prompt_log_probs is not None:
                        prompt_lps[r.request_id] = r.result.prompt_log_probs
                    r.result.prompt_log_probs = prompt_lps.get(r.request_id)
                if r.is_final:
                    final[r.request_id] = r
        return [final[i] for i in ids]

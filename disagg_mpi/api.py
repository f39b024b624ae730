"""The executor API of the seed (TensorRT-LLM's `executor` bindings), in Python.

Names follow TensorRT-LLM so that code written against its executor API reads
the same here; everything is a plain dataclass so it can cross MPI as msgpack.
"""

from __future__ import annotations

import enum
import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Any

# The configuration records and the per-request metrics live in their own modules; the API is one
# import (`from disagg_mpi.api import RequestMetrics` keeps working).
from .executor_config import CacheTransceiverConfig, CommType, ExecutorConfig, KvCacheConfig  # noqa: F401
from .request_metrics import RequestMetrics
from .sample_group import SampleGroup


class RequestType(enum.IntEnum):
    REQUEST_TYPE_CONTEXT_AND_GENERATION = 0
    REQUEST_TYPE_CONTEXT_ONLY = 1
    REQUEST_TYPE_GENERATION_ONLY = 2


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"


DISAGG_NOT_ENABLED = "Disaggregated serving is not enabled, please check the configuration"


def as_int(value: Any) -> int | None:
    """A Python int from an integer-like value (int, numpy or torch integer); None for bool, float, str."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


class RequestError(ValueError):
    """A request that cannot be served; the message says what was wrong, `param` which field
    (dotted, as in `Request`: "max_tokens", "context_phase_params.first_gen_tokens"), or None."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingConfig:
    """Sampling parameters; beam_width > 1 is refused (the seed's limitation).

    Penalties follow OpenAI (presence, frequency: over the output tokens) and transformers
    (repetition: over prompt and output tokens); `logit_bias` maps token id -> bias added to its
    logit; `min_tokens` keeps EOS and stop tokens out until that many tokens were generated.
    """

    beam_width: int = 1
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0  # 0 disables min-p
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 disables it
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0

    def validate(self) -> None:
        if self.beam_width != 1:
            raise RequestError(f"beam_width={self.beam_width} is not supported: only beam width 1",
                               "sampling_config.beam_width")
        if not self.temperature >= 0:
            raise RequestError(f"temperature={self.temperature} must be >= 0 (0 is greedy)", "sampling_config.temperature")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k={self.top_k} must be an integer >= 0 (0 disables top-k)",
                               "sampling_config.top_k")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p={self.top_p} must be in (0, 1]", "sampling_config.top_p")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise RequestError(f"seed={self.seed} must be an integer in [0, 2**63)", "sampling_config.seed")
        if not _number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p={self.min_p!r} must be a number in [0, 1] (0 disables min-p)",
                               "sampling_config.min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _number(v) or not -2.0 <= v <= 2.0:
                raise RequestError(f"{name}={v!r} must be a number in [-2, 2]", f"sampling_config.{name}")
        if not _number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise RequestError(f"repetition_penalty={self.repetition_penalty!r} must be a number > 0 (1 disables it)",
                               "sampling_config.repetition_penalty")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise RequestError(f"logit_bias must be a map of token id -> bias, got {type(self.logit_bias).__name__}",
                                   "sampling_config.logit_bias")
            for k, v in self.logit_bias.items():
                if not isinstance(k, int) or isinstance(k, bool) or not _number(v) or not -100 <= v <= 100:
                    raise RequestError(f"logit_bias[{k!r}]={v!r}: keys must be token ids and biases numbers in "
                                       "[-100, 100]", "sampling_config.logit_bias")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise RequestError(f"min_tokens={self.min_tokens!r} must be an integer >= 0", "sampling_config.min_tokens")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # msgpack maps take string keys only: the bias travels as [id, bias] pairs
        d["logit_bias"] = [[k, v] for k, v in self.logit_bias.items()] if self.logit_bias else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingConfig:
        d = dict(d)
        bias = d.get("logit_bias")
        if isinstance(bias, list):
            d["logit_bias"] = {int(k): float(v) for k, v in bias}
        return cls(**d)


@dataclass
class GuidedDecodingParams:
    """Constrained (structured) generation, TensorRT-LLM's name: every sampled token keeps the output a
    prefix of the grammar's language (engine/grammar.py masks the others).

    `guide_type`: "json" (any JSON object, OpenAI's json_object) or "json_schema" (`guide` is the schema,
    a JSON string). The generation side of a disaggregated request rebuilds the grammar's state from the
    tokens generated so far, so only this spec travels (inside the Request)."""

    guide_type: str
    guide: str | None = None

    GUIDE_TYPES = ("json", "json_schema")

    def to_dict(self) -> dict[str, Any]:
        return {"guide_type": self.guide_type, "guide": self.guide}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> GuidedDecodingParams | None:
        return None if d is None else cls(str(d["guide_type"]), d.get("guide"))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs limit)


@dataclass
class OutputConfig:
    """What a result carries besides the tokens (TensorRT-LLM's name and field).

    `return_log_probs`: each output token's log-probability, with `Request.num_logprobs` top
    alternatives. The values are the model's log-softmax over the vocabulary **before** any penalty,
    logit bias, min_tokens mask or temperature (vLLM's "raw" logprobs), so they do not depend on how
    the token was sampled.
    """

    return_log_probs: bool = False


@dataclass(frozen=True)
class TokenLogprobs:
    """One output token's log-probability and its `num_logprobs` most likely alternatives
    (the sampled token is among them only if it is that likely), best first."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()

    def to_wire(self) -> list:
        return [self.logprob, list(self.top_ids), list(self.top_logprobs)]

    @classmethod
    def from_wire(cls, w: Any) -> TokenLogprobs:
        lp, ids, lps = w
        return cls(float(lp), tuple(int(i) for i in ids), tuple(float(v) for v in lps))

    def top(self, k: int) -> TokenLogprobs:
        """Only the best `k` alternatives."""
        return TokenLogprobs(self.logprob, self.top_ids[:k], self.top_logprobs[:k])


def logprobs_to_wire(lps: list[TokenLogprobs] | None) -> list | None:
    return None if lps is None else [t.to_wire() for t in lps]


def logprobs_from_wire(w: Any) -> list[TokenLogprobs] | None:
    return None if w is None else [TokenLogprobs.from_wire(t) for t in w]


def prompt_logprobs_to_wire(lps: list[TokenLogprobs | None] | None) -> list | None:
    """Result.prompt_log_probs on the wire (its first entry is None: nothing precedes the first token)."""
    return None if lps is None else [None if t is None else t.to_wire() for t in lps]


def prompt_logprobs_from_wire(w: Any) -> list[TokenLogprobs | None] | None:
    return None if w is None else [None if t is None else TokenLogprobs.from_wire(t) for t in w]


@dataclass
class ContextPhaseParams:
    """What a context-only request hands to its generation-only twin.

    `opaque_state` is bytes: where the KV blocks live and the cache layout
    (see `disagg_mpi.transfer.opaque`); callers must treat it as opaque.
    """

    req_id: int
    first_gen_tokens: list[int]
    opaque_state: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        return {"req_id": self.req_id, "first_gen_tokens": list(self.first_gen_tokens),
                "opaque_state": self.opaque_state}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ContextPhaseParams:
        return cls(int(d["req_id"]), [int(t) for t in d["first_gen_tokens"]], bytes(d["opaque_state"]))


@dataclass
class Request:
    input_token_ids: list[int]
    max_tokens: int = 16
    sampling_config: SamplingConfig = field(default_factory=SamplingConfig)
    streaming: bool = False
    request_type: RequestType = RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION
    context_phase_params: ContextPhaseParams | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    client_id: str | None = None
    # Stop strings (TensorRT-LLM's name). The executors never see them: rank 0 detokenizes the
    # output, ends it before the first stop string and cancels the request (disagg_mpi/stops.py).
    stop_words: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False  # vLLM's name: keep the stop string in the text
    output_config: OutputConfig = field(default_factory=OutputConfig)
    # With output_config.return_log_probs: how many top alternatives each token's logprobs list
    # (0 to MAX_LOGPROBS; 0 = the sampled token's logprob alone).
    num_logprobs: int = 0
    # The prompt's logprobs (vLLM's `prompt_logprobs`; OpenAI's echo with logprobs): None = not asked,
    # k = each prompt token's logprob (the model's raw log-softmax, as return_log_probs) and its k best
    # alternatives (0 to MAX_LOGPROBS), in `Result.prompt_log_probs`. Such a prompt is computed in full
    # (no prefix reuse), and costs a [prompt, vocab] logits pass in slices on the context executor.
    num_prompt_logprobs: int | None = None

    @property
    def logprobs_k(self) -> int | None:
        """Top alternatives per token when logprobs are asked, else None."""
        return self.num_logprobs if self.output_config.return_log_probs else None
    guided_decoding: GuidedDecodingParams | None = None  # e.g. OpenAI's response_format (JSON)
    # Benchmarks only (TensorRT-LLM's generation-only benchmark requests): no context phase. The
    # executor that decodes reserves the prompt's KV blocks without computing them (they hold whatever
    # the pool held: the output is meaningless), takes the prompt's last token as the first output
    # token and decodes the rest, so each decode step costs what it would after a real prompt of that
    # length. Rank 0 sends it straight to a generation (or the aggregated) executor; see
    # engine/benchmark.py and docs/benchmarks.md.
    benchmark_generation_only: bool = False
    sample_group: SampleGroup | None = None  # one of the n choices of a prompt (sample_group.py)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["request_type"] = int(self.request_type)
        d["sampling_config"] = self.sampling_config.to_dict()
        d["context_phase_params"] = (
            self.context_phase_params.to_dict() if self.context_phase_params else None)
        d["guided_decoding"] = self.guided_decoding.to_dict() if self.guided_decoding else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        cpp = d.get("context_phase_params")
        return cls(
            input_token_ids=list(d["input_token_ids"]),
            max_tokens=d["max_tokens"],
            sampling_config=SamplingConfig.from_dict(d["sampling_config"]),
            streaming=d["streaming"],
            request_type=RequestType(d["request_type"]),
            context_phase_params=ContextPhaseParams.from_dict(cpp) if cpp else None,
            stop_token_ids=list(d["stop_token_ids"]),
            ignore_eos=d["ignore_eos"],
            client_id=d.get("client_id"),
            stop_words=list(d.get("stop_words") or []),
            include_stop_str_in_output=bool(d.get("include_stop_str_in_output", False)),
            output_config=OutputConfig(**(d.get("output_config") or {})),
            num_logprobs=d.get("num_logprobs", 0),
            num_prompt_logprobs=d.get("num_prompt_logprobs"),
            guided_decoding=GuidedDecodingParams.from_dict(d.get("guided_decoding")),
            benchmark_generation_only=bool(d.get("benchmark_generation_only", False)),
            sample_group=SampleGroup.from_dict(d.get("sample_group")))


@dataclass
class Result:
    output_token_ids: list[int]
    is_final: bool
    finish_reason: str | None = None
    context_phase_params: ContextPhaseParams | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    # One per output token (same order) when the request asked (OutputConfig.return_log_probs), else None.
    log_probs: list[TokenLogprobs] | None = None
    # One per prompt token when the request asked (Request.num_prompt_logprobs), the first None; on the
    # first response of a request (and again on the final one rank 0 sums up), else None.
    prompt_log_probs: list[TokenLogprobs | None] | None = None


@dataclass
class Response:
    """Either a `result` or an `error_msg`, for the request `request_id`."""

    request_id: int
    result: Result | None = None
    error_msg: str | None = None
    client_id: str | None = None
    error_param: str | None = None  # the request field an error is about (RequestError.param), if any
    # Refused for room that frees with time (contexts held for their generation phase, hold_cap.py):
    # retry after this many seconds (HTTP 429 with Retry-After).
    retry_after: float | None = None

    def has_error(self) -> bool:
        return self.error_msg is not None

    @property
    def is_final(self) -> bool:
        return self.error_msg is not None or bool(self.result and self.result.is_final)

    def to_dict(self) -> dict[str, Any]:
        r = None
        if self.result is not None:
            res = self.result
            r = {"output_token_ids": res.output_token_ids, "is_final": res.is_final,
                 "finish_reason": res.finish_reason}
            if res.log_probs is not None:  # (absent when not asked: responses stay as small as before)
                r["log_probs"] = logprobs_to_wire(res.log_probs)
            if res.prompt_log_probs is not None:
                r["prompt_log_probs"] = prompt_logprobs_to_wire(res.prompt_log_probs)
            r["context_phase_params"] = (self.result.context_phase_params.to_dict()
                                         if self.result.context_phase_params else None)
            r["metrics"] = self.result.metrics.to_dict()
        d = {"request_id": self.request_id, "result": r, "error_msg": self.error_msg,
             "client_id": self.client_id, "error_param": self.error_param}
        if self.retry_after is not None:  # (rare: not on the wire of every streamed token)
            d["retry_after"] = self.retry_after
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Response:
        r = d.get("result")
        result = None
        if r is not None:
            cpp = r.get("context_phase_params")
            result = Result(list(r["output_token_ids"]), r["is_final"], r.get("finish_reason"),
                            ContextPhaseParams.from_dict(cpp) if cpp else None,
                            RequestMetrics.from_dict(r.get("metrics")), logprobs_from_wire(r.get("log_probs")),
                            prompt_logprobs_from_wire(r.get("prompt_log_probs")))
        return cls(d["request_id"], result, d.get("error_msg"), d.get("client_id"), d.get("error_param"),
                   d.get("retry_after"))

"""The executor API of the seed (TensorRT-LLM's `executor` bindings), in Python.

Names follow TensorRT-LLM so that code written against its executor API reads
the same here; everything is a plain dataclass so it can cross MPI as msgpack.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .knobs import env_overrides, field_knobs, knob


class RequestType(enum.IntEnum):
    REQUEST_TYPE_CONTEXT_AND_GENERATION = 0
    REQUEST_TYPE_CONTEXT_ONLY = 1
    REQUEST_TYPE_GENERATION_ONLY = 2


class CommType(enum.Enum):
    MPI = "MPI"
    UCX = "UCX"
    NIXL = "NIXL"


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"


DISAGG_NOT_ENABLED = "Disaggregated serving is not enabled, please check the configuration"


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
    guided_decoding: GuidedDecodingParams | None = None  # e.g. OpenAI's response_format (JSON)

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
            guided_decoding=GuidedDecodingParams.from_dict(d.get("guided_decoding")),
        )


@dataclass
class RequestMetrics:
    """One request's measurements, filled in as it goes: by the executors (`executor`,
    `num_prompt_tokens`, the KV hand-off's) and by rank 0 (where each phase ran, ttft, e2e).
    Times in ms; a field stays None where its event did not happen (no context phase, no transfer)."""

    ttft_ms: float | None = None  # rank 0: arrival to the first token back
    e2e_ms: float | None = None  # rank 0: arrival to the final response
    context_executor: int | None = None
    generation_executor: int | None = None
    executor: int | None = None  # the executor that sent this response
    num_prompt_tokens: int | None = None
    kv_transfer_ms: float | None = None  # generation side: claim sent to KV landed
    kv_claim_ms: float | None = None  # of it: until the context executor granted the claim
    kv_claim_answer_ms: float | None = None  # of that: until the context leader answered (one node's clocks)
    kv_transfer_bytes: int | None = None
    kv_cached_tokens: int | None = None  # prompt tokens the generation executor already cached (prefix reuse)

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (JSON output, the wire)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RequestMetrics:
        return cls(**(d or {}))

    def merge(self, other: RequestMetrics, skip: tuple[str, ...] = ()) -> None:
        """Take `other`'s set fields (but `skip`)."""
        for k, v in other.to_dict().items():
            if k not in skip:
                setattr(self, k, v)


@dataclass
class Result:
    output_token_ids: list[int]
    is_final: bool
    finish_reason: str | None = None
    context_phase_params: ContextPhaseParams | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)


@dataclass
class Response:
    """Either a `result` or an `error_msg`, for the request `request_id`."""

    request_id: int
    result: Result | None = None
    error_msg: str | None = None
    client_id: str | None = None
    error_param: str | None = None  # the request field an error is about (RequestError.param), if any

    def has_error(self) -> bool:
        return self.error_msg is not None

    @property
    def is_final(self) -> bool:
        return self.error_msg is not None or bool(self.result and self.result.is_final)

    def to_dict(self) -> dict[str, Any]:
        r = None
        if self.result is not None:
            r = asdict(self.result)
            r["context_phase_params"] = (self.result.context_phase_params.to_dict()
                                         if self.result.context_phase_params else None)
            r["metrics"] = self.result.metrics.to_dict()
        return {"request_id": self.request_id, "result": r, "error_msg": self.error_msg,
                "client_id": self.client_id, "error_param": self.error_param}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Response:
        r = d.get("result")
        result = None
        if r is not None:
            cpp = r.get("context_phase_params")
            result = Result(list(r["output_token_ids"]), r["is_final"], r.get("finish_reason"),
                            ContextPhaseParams.from_dict(cpp) if cpp else None,
                            RequestMetrics.from_dict(r.get("metrics")))
        return cls(d["request_id"], result, d.get("error_msg"), d.get("client_id"), d.get("error_param"))


@dataclass
class CacheTransceiverConfig:
    """KV transfer settings: each field is a knob (`knobs.py`), documented once here; the YAML schema,
    the environment overrides and the table in docs/transfer.md are derived from these fields."""

    enable_cache_transceiver: bool = knob(
        False, "build a transceiver on the executor's ranks; required for context and generation executors of "
        "a disaggregated topology (`true` in the YAML's `cache_transceiver_config`, `false` in the Python "
        "dataclass)")
    comm_type: CommType | None = knob(  # noqa: RUF009 - knob() is a dataclasses.field
        None, "transport (the YAML's default is `MPI`; unset means MPI); only `MPI` exists in this build "
        "(`UCX`, `NIXL` are refused)", choices=("MPI",))
    max_num_tokens: int | None = knob(
        None, "the transfer buffer in tokens (TensorRT-LLM's form): when set, `buffer_bytes` = max_num_tokens x "
        "this rank's KV bytes per token", ge=1)
    parallel_send: bool = knob(
        True, "serve several pulls at once (up to `send_concurrency`); off: one at a time, in arrival order",
        env="DISAGG_PARALLEL_SEND")
    send_concurrency: int = knob(
        4, "pulls a context rank sends at once when `parallel_send` is on", env="DISAGG_SEND_CONCURRENCY", ge=1)
    parallel_receive: bool = knob(
        True, "a generation rank pulls from all its context ranks at once; off: one plan item after the other",
        env="DISAGG_PARALLEL_RECEIVE")
    overlap: bool = knob(
        True, "the generation executor keeps stepping its other requests while a transfer runs; off: it waits "
        "for the transfer", env="DISAGG_OVERLAP")
    zero_copy: bool = knob(
        True, "send/receive blocks straight from/into the pools when the layouts match (and skip one side's "
        "copy when that side's slice is whole); off: always pack and scatter", env="DISAGG_ZERO_COPY")
    buffer_bytes: int = knob(
        32 << 20, "bound on the chunk buffers of one transfer (two chunks in flight share it); also the longest "
        "zero-copy message", env="DISAGG_BUFFER_BYTES", ge=4096)
    async_buffer: bool = knob(
        False, "`false`: device chunk buffers are allocated once and reused by every later transfer; `true`: "
        "each transfer allocates its chunk buffers on the transceiver's side stream through the stream-ordered "
        "(caching) allocator and returns them when it ends", env="DISAGG_ASYNC_BUFFER", where="GPU only")
    lease_seconds: float = knob(
        120.0, "context blocks nobody claims are freed after this", env="DISAGG_LEASE_SECONDS", gt=0)
    keep_seconds: float = knob(
        0.25, "context executor whose pools generation ranks may map (CUDA IPC, and a generation executor has "
        "a rank on its node): after a context's first token, none of its blocks is reused for this long, even "
        "once released; the signed params carry that time, so a same-node one-sided IPC pull that landed "
        "before it is used at once instead of waiting for the claim's answer. Released blocks stay allocated "
        "until then; 0: off, every pull waits for the answer; at most min(60, `lease_seconds`)",
        env="DISAGG_KEEP_SECONDS", where="GPU with CUDA IPC", ge=0)
    timeout_seconds: float = knob(
        60.0, "a transfer not finished this long after the claim fails its generation request with a clear "
        "error (or ends it cancelled); both sides free the request's blocks", env="DISAGG_TRANSFER_TIMEOUT", gt=0)
    backend: str = knob(
        "auto", "CUDA pools only: `ipc` (CUDA IPC device-to-device pulls between ranks of one node), `staged` "
        "(pinned host buffers over any MPI), `cuda_aware_mpi` (device buffers straight to MPI; refused with the "
        "reason unless `MPIX_Query_cuda_support()` says yes); `auto` = IPC on one node, else staged",
        env="DISAGG_KV_BACKEND", where="GPU only", choices=("auto", "ipc", "staged", "cuda_aware_mpi"))
    shared_staging: bool = knob(
        True, "staged transfers between ranks of one node go through a ring of shared, page-locked slots "
        "(`DISAGG_RING_SLOTS` of `buffer_bytes` / slots each, a file in /dev/shm) that both GPUs' streams "
        "synchronise on; off, or when /dev/shm cannot hold a ring: the bytes go through MPI",
        env="DISAGG_SHARED_STAGING", where="GPU only")

    def with_env_overrides(self) -> CacheTransceiverConfig:
        """This config with every knob whose environment variable is set replaced by its value."""
        return dataclasses.replace(self, **env_overrides(field_knobs(CacheTransceiverConfig)))

    def check_available(self) -> None:
        if self.enable_cache_transceiver and self.comm_type not in (None, CommType.MPI):
            raise RequestError(
                f"cache transceiver comm_type {self.comm_type.value} is not available in this build; "
                "use MPI")


@dataclass
class KvCacheConfig:
    block_size: int = 16
    num_blocks: int = 512
    enable_prefix_reuse: bool = False


@dataclass
class ExecutorConfig:
    max_batch_size: int = 8
    max_num_tokens: int = 2048
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    cache_transceiver_config: CacheTransceiverConfig = field(default_factory=CacheTransceiverConfig)
    dtype: str = "float32"
    device: str = "cpu"

"""The executor API of the seed (TensorRT-LLM's `executor` bindings), in Python.

Names follow TensorRT-LLM so that code written against its executor API reads
the same here; everything is a plain dataclass so it can cross MPI as msgpack.
"""

from __future__ import annotations

import enum
import itertools
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


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
    """A request that cannot be served; the message says what was wrong."""


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
            raise RequestError(f"beam_width={self.beam_width} is not supported: only beam width 1")
        if not self.temperature >= 0:
            raise RequestError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k={self.top_k} must be an integer >= 0 (0 disables top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p={self.top_p} must be in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise RequestError(f"seed={self.seed} must be an integer in [0, 2**63)")
        if not _number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p={self.min_p!r} must be a number in [0, 1] (0 disables min-p)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _number(v) or not -2.0 <= v <= 2.0:
                raise RequestError(f"{name}={v!r} must be a number in [-2, 2]")
        if not _number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise RequestError(f"repetition_penalty={self.repetition_penalty!r} must be a number > 0 (1 disables it)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise RequestError(f"logit_bias must be a map of token id -> bias, got {type(self.logit_bias).__name__}")
            for k, v in self.logit_bias.items():
                if not isinstance(k, int) or isinstance(k, bool) or not _number(v) or not -100 <= v <= 100:
                    raise RequestError(f"logit_bias[{k!r}]={v!r}: keys must be token ids and biases numbers in "
                                       "[-100, 100]")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise RequestError(f"min_tokens={self.min_tokens!r} must be an integer >= 0")

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["request_type"] = int(self.request_type)
        d["sampling_config"] = self.sampling_config.to_dict()
        d["context_phase_params"] = (
            self.context_phase_params.to_dict() if self.context_phase_params else None)
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
        )


@dataclass
class Result:
    output_token_ids: list[int]
    is_final: bool
    finish_reason: str | None = None
    context_phase_params: ContextPhaseParams | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Response:
    """Either a `result` or an `error_msg`, for the request `request_id`."""

    request_id: int
    result: Result | None = None
    error_msg: str | None = None
    client_id: str | None = None

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
        return {"request_id": self.request_id, "result": r, "error_msg": self.error_msg,
                "client_id": self.client_id}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Response:
        r = d.get("result")
        result = None
        if r is not None:
            cpp = r.get("context_phase_params")
            result = Result(list(r["output_token_ids"]), r["is_final"], r.get("finish_reason"),
                            ContextPhaseParams.from_dict(cpp) if cpp else None, r.get("metrics") or {})
        return cls(d["request_id"], result, d.get("error_msg"), d.get("client_id"))


def _env(name: str, default: Any, kind: type) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)


@dataclass
class CacheTransceiverConfig:
    """KV transfer settings. Each knob has an environment override (see docs/transfer.md)."""

    enable_cache_transceiver: bool = False
    comm_type: CommType | None = None
    max_num_tokens: int | None = None  # transfer buffer size, in tokens of KV
    parallel_send: bool = True  # serve several requests' pulls at once
    overlap: bool = True  # keep decoding other requests while a transfer runs
    parallel_receive: bool = True  # pull from several context ranks at once
    zero_copy: bool = True  # send whole blocks straight from the pool when layouts match
    buffer_bytes: int = 32 << 20  # bounded transfer buffer per peer
    send_concurrency: int = 4  # transfers a rank sends at once
    async_buffer: bool = False  # GPU only: stream-ordered allocator for the buffer
    lease_seconds: float = 120.0  # blocks nobody pulls are freed after this
    # Context side, CUDA IPC pools: an answered context's blocks are not reused for this long, even
    # once released, so a same-node one-sided pull may be used before its claim is answered (0: off)
    keep_seconds: float = 0.25
    timeout_seconds: float = 60.0  # a transfer that does not finish fails its request
    backend: str = "auto"  # CUDA pools: auto | ipc | staged | cuda_aware_mpi (disagg_mpi/transfer/transceiver.py)
    shared_staging: bool = True  # staged, same node: MPI carries notices, bytes go through shared pinned slots

    ENV: ClassVar[dict[str, tuple[str, type]]] = {
        "parallel_send": ("DISAGG_PARALLEL_SEND", bool),
        "overlap": ("DISAGG_OVERLAP", bool),
        "parallel_receive": ("DISAGG_PARALLEL_RECEIVE", bool),
        "zero_copy": ("DISAGG_ZERO_COPY", bool),
        "buffer_bytes": ("DISAGG_BUFFER_BYTES", int),
        "send_concurrency": ("DISAGG_SEND_CONCURRENCY", int),
        "async_buffer": ("DISAGG_ASYNC_BUFFER", bool),
        "lease_seconds": ("DISAGG_LEASE_SECONDS", float),
        "keep_seconds": ("DISAGG_KEEP_SECONDS", float),
        "timeout_seconds": ("DISAGG_TRANSFER_TIMEOUT", float),
        "backend": ("DISAGG_KV_BACKEND", str),
        "shared_staging": ("DISAGG_SHARED_STAGING", bool),
    }

    def with_env_overrides(self) -> CacheTransceiverConfig:
        values = {k: _env(name, getattr(self, k), kind) for k, (name, kind) in self.ENV.items()}
        return CacheTransceiverConfig(self.enable_cache_transceiver, self.comm_type,
                                      self.max_num_tokens, **values)

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


_ids = itertools.count(1)


def next_request_id() -> int:
    """Process-wide increasing request ids (per executor, as in the seed)."""
    return next(_ids)

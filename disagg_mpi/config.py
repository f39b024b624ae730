"""YAML topology: which world ranks and devices form each executor.

Validated with pydantic before any rank does work; every error names the key,
the value and what is allowed.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from .api import CacheTransceiverConfig, CommType, ExecutorConfig, KvCacheConfig
from .knobs import Knob, field_knobs

if TYPE_CHECKING:
    from .model.config import ModelConfig


class ConfigError(ValueError):
    """A topology that cannot run; the message names the key and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    path: str = "smollm2"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0  # for random:<preset> weights
    # Weight-only int8/int4 projections on CPU executors (model/quant.py); none: full precision.
    quantization: Literal["none", "int8", "int4"] = "none"


class KvCacheSpec(_Strict):
    block_size: int = Field(16, ge=1, le=1024)
    num_blocks: int = Field(512, ge=1)
    enable_prefix_reuse: bool = False


class _TransceiverChecks(_Strict):
    """Checks across knobs; the fields come from CacheTransceiverConfig (see TransceiverSpec)."""

    @field_validator("comm_type", check_fields=False)
    @classmethod
    def _only_mpi(cls, v: str) -> str:
        if v != "MPI":
            raise ValueError(f"comm_type {v} is not available in this build; allowed: MPI")
        return v

    @model_validator(mode="after")
    def _keep_within_lease(self) -> _TransceiverChecks:
        if self.keep_seconds > min(60.0, self.lease_seconds):
            raise ValueError(f"keep_seconds {self.keep_seconds:g} is too long: released blocks stay allocated "
                             f"that long; allowed: 0 to min(60, lease_seconds = {self.lease_seconds:g})")
        return self

    def to_api(self) -> CacheTransceiverConfig:
        d = self.model_dump()
        d["comm_type"] = CommType(d["comm_type"])
        return CacheTransceiverConfig(**d).with_env_overrides()


_YAML_DEFAULTS = {"enable_cache_transceiver": True, "comm_type": "MPI"}  # a YAML section means "use it"


def _spec_field(k: Knob) -> tuple[Any, Any]:
    kind = str if isinstance(k.type, type) and issubclass(k.type, enum.Enum) else k.type
    if k.choices and kind is str and k.name != "comm_type":
        kind = Literal[k.choices]  # type: ignore[valid-type]
    default = _YAML_DEFAULTS.get(k.name, k.default)
    return (kind | None if default is None else kind), Field(default, ge=k.ge, gt=k.gt, le=k.le, description=k.doc)


# `cache_transceiver_config` in the YAML: one field per knob of CacheTransceiverConfig.
TransceiverSpec = create_model("TransceiverSpec", __base__=_TransceiverChecks,
                               **{k.name: _spec_field(k) for k in field_knobs(CacheTransceiverConfig)})


class ExecutorSpec(_Strict):
    participant_ids: list[int] = Field(min_length=1)
    device_ids: list[int] | None = None  # node-local GPU ids; absent means CPU
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    # Mixture-of-experts models: split the experts over the TP ranks instead of every expert's FFN
    # (model/expert_parallel.py); must divide tensor_parallel_size. 1: experts TP-split like a dense MLP.
    expert_parallel_size: int = Field(1, ge=1)
    layer_split: list[int] | None = None
    max_batch_size: int = Field(8, ge=1)
    max_num_tokens: int = Field(2048, ge=1)
    prefill_chunk_tokens: int | None = Field(None, ge=1)
    kv_cache: KvCacheSpec = KvCacheSpec()
    cache_transceiver_config: TransceiverSpec | None = None

    @property
    def size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @model_validator(mode="after")
    def _shape(self) -> ExecutorSpec:
        if len(self.participant_ids) != self.size:
            raise ValueError(
                f"participant_ids {self.participant_ids} has {len(self.participant_ids)} ranks but "
                f"tensor_parallel_size x pipeline_parallel_size = {self.tensor_parallel_size} x "
                f"{self.pipeline_parallel_size} = {self.size}; list exactly {self.size} ranks")
        tp, ep = self.tensor_parallel_size, self.expert_parallel_size
        if tp % ep:
            raise ValueError(
                f"expert_parallel_size={ep} does not divide tensor_parallel_size={tp}: EP splits the experts "
                f"over the executor's TP ranks (attention stays TP over all of them); allowed: a divisor of "
                f"{tp}: {[d for d in range(1, tp + 1) if tp % d == 0]}")
        if len(set(self.participant_ids)) != len(self.participant_ids):
            raise ValueError(f"participant_ids {self.participant_ids} lists a rank twice")
        if self.device_ids is not None and len(self.device_ids) != self.size:
            raise ValueError(
                f"device_ids {self.device_ids} has {len(self.device_ids)} entries; it needs one GPU per "
                f"rank ({self.size}), or leave it out to run on CPU")
        if self.layer_split is not None and len(self.layer_split) != self.pipeline_parallel_size:
            raise ValueError(f"layer_split {self.layer_split} needs one entry per pipeline stage "
                             f"({self.pipeline_parallel_size})")
        return self

    @property
    def on_gpu(self) -> bool:
        return self.device_ids is not None

    def executor_config(self, dtype: str, quantization: str = "none") -> ExecutorConfig:
        tc = self.cache_transceiver_config
        return ExecutorConfig(
            max_batch_size=self.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            kv_cache_config=KvCacheConfig(**self.kv_cache.model_dump()),
            cache_transceiver_config=tc.to_api() if tc else CacheTransceiverConfig(),
            dtype=dtype,
            device="cuda" if self.on_gpu else "cpu",
            quantization=quantization,
        )


def _with_transceiver(ex: Any) -> Any:
    """An executor entry with its transceiver on when its cache_transceiver_config is missing."""
    if isinstance(ex, dict) and ex.get("cache_transceiver_config") is None:
        return {**ex, "cache_transceiver_config": {}}  # the YAML section's defaults: enabled, MPI
    if isinstance(ex, ExecutorSpec) and ex.cache_transceiver_config is None:
        return ex.model_copy(update={"cache_transceiver_config": TransceiverSpec()})
    return ex


RouterName = Literal["round_robin", "least_loaded", "kv_aware"]


class RouterSpec(_Strict):
    policy: RouterName = "round_robin"
    # Conditional disaggregation: an uncached prompt part of at most this many
    # tokens runs on a generation executor directly (0 disables it).
    local_prefill_max_tokens: int = Field(0, ge=0)


class ServerSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None
    max_body_bytes: int = Field(1 << 20, ge=1024)
    # Take generation-only benchmark requests (`disagg_benchmark`; serve --allow-benchmark-requests): they
    # hold KV blocks without computing anything, so a server for the public keeps them off.
    allow_benchmark_requests: bool = False


class Topology(_Strict):
    model: ModelSpec = ModelSpec()
    router: RouterSpec = RouterSpec()
    server: ServerSpec = ServerSpec()
    context_executors: list[ExecutorSpec] = Field(default_factory=list)
    generation_executors: list[ExecutorSpec] = Field(min_length=1)

    @field_validator("router", mode="before")
    @classmethod
    def _router_shorthand(cls, v: Any) -> Any:
        return {"policy": v} if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _transceivers_when_disaggregated(cls, data: Any) -> Any:
        """A topology with context executors moves KV between executors, so each executor's
        transceiver is on unless its YAML says otherwise: a missing cache_transceiver_config means
        `{enable_cache_transceiver: true}` there (it meant "refused" before, with docs promising the
        default). An aggregated topology needs none and gets none."""
        if not isinstance(data, dict) or not data.get("context_executors"):
            return data
        data = dict(data)
        for key in ("context_executors", "generation_executors"):
            if isinstance(data.get(key), list):
                data[key] = [_with_transceiver(e) for e in data[key]]
        return data

    @model_validator(mode="after")
    def _ranks(self) -> Topology:
        seen: dict[int, str] = {}
        for name, rank in self._all_ranks():
            if rank == 0:
                raise ValueError(f"{name} uses rank 0, which is the orchestrator; executors use ranks >= 1")
            if rank < 0:
                raise ValueError(f"{name} lists rank {rank}; ranks are >= 1")
            if rank in seen:
                raise ValueError(f"rank {rank} is in both {seen[rank]} and {name}; participant ids "
                                 "must not intersect")
            seen[rank] = name
        unused = sorted(set(range(1, self.world_size)) - set(seen))
        if unused:
            raise ValueError(f"ranks {unused} are used by no executor; participant ids must cover "
                             f"1..{self.world_size - 1}")
        if self.context_executors:
            for name, ex in self._named():
                if not ex.cache_transceiver_config.enable_cache_transceiver:
                    raise ValueError(
                        f"{name}.cache_transceiver_config.enable_cache_transceiver is false, but in a "
                        "disaggregated topology (one with context_executors) every executor moves KV; "
                        "allowed: true, or leave it out (true is the default there)")
        if self.model.quantization != "none":
            for name, ex in self._named():
                if ex.on_gpu:
                    raise ValueError(
                        f"model.quantization={self.model.quantization!r} runs on CPU executors only (torch's "
                        f"weight-only CPU kernels), but {name} has device_ids {ex.device_ids}; allowed there: "
                        "none (or leave out device_ids to run that executor on CPU)")
        return self

    def _named(self) -> list[tuple[str, ExecutorSpec]]:
        return ([(f"context_executors[{i}]", e) for i, e in enumerate(self.context_executors)]
                + [(f"generation_executors[{i}]", e) for i, e in enumerate(self.generation_executors)])

    def _all_ranks(self) -> list[tuple[str, int]]:
        return [(f"{n}.participant_ids", r) for n, e in self._named() for r in e.participant_ids]

    @property
    def world_size(self) -> int:
        return 1 + sum(e.size for e in self.context_executors + self.generation_executors)

    @property
    def disaggregated(self) -> bool:
        return bool(self.context_executors)

    @property
    def executors(self) -> list[ExecutorSpec]:
        """Context executors first, then generation ones; the index is the executor id."""
        return list(self.context_executors) + list(self.generation_executors)

    def executor_of_rank(self, rank: int) -> tuple[int, ExecutorSpec] | None:
        for i, e in enumerate(self.executors):
            if rank in e.participant_ids:
                return i, e
        return None

    def is_context(self, executor_id: int) -> bool:
        return executor_id < len(self.context_executors)

    def dtype_for(self, ex: ExecutorSpec, checkpoint_dtype: str | None = None) -> str:
        """`model.dtype`, or for `auto`: on a GPU the checkpoint's own 16-bit dtype (bfloat16 when it
        has none, or is float32); on CPU float32, the exactness reference (CPU half precision is slow)."""
        if self.model.dtype != "auto":
            return self.model.dtype
        if not ex.on_gpu:
            return "float32"
        return checkpoint_dtype if checkpoint_dtype in ("bfloat16", "float16") else "bfloat16"


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid topology {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling (see configs/README.md for the allowed keys)"
        elif e["type"] == "literal_error":
            msg = f"value {e.get('input')!r} is not allowed: {msg}"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_topology(data: Any, source: str = "<dict>") -> Topology:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid topology {source}: the top level must be a mapping, "
                          f"got {type(data).__name__}")
    try:
        return Topology.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_topology(path: str | Path) -> Topology:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    return parse_topology(data, repr(str(path)))


def validate_against_model(topo: Topology, num_heads: int, num_kv_heads: int, num_layers: int,
                           intermediate_size: int) -> None:
    """TP and PP must split the model; checked before any weights load."""
    for name, ex in topo._named():
        tp, pp = ex.tensor_parallel_size, ex.pipeline_parallel_size
        if num_heads % tp:
            raise ConfigError(f"{name}.tensor_parallel_size={tp} does not divide the model's {num_heads} "
                              f"attention heads; allowed: a divisor of {num_heads}")
        if not (num_kv_heads % tp == 0 or tp % num_kv_heads == 0):
            raise ConfigError(f"{name}.tensor_parallel_size={tp} neither divides nor is a multiple of the "
                              f"model's {num_kv_heads} KV heads")
        if intermediate_size % tp:
            raise ConfigError(f"{name}.tensor_parallel_size={tp} does not divide the MLP width "
                              f"{intermediate_size}")
        if pp > num_layers:
            raise ConfigError(f"{name}.pipeline_parallel_size={pp} exceeds the model's {num_layers} layers")
        if ex.layer_split is not None and (sum(ex.layer_split) != num_layers or min(ex.layer_split) < 1):
            raise ConfigError(f"{name}.layer_split={ex.layer_split} must be {pp} positive counts summing to "
                              f"the model's {num_layers} layers")


def check_model(topo: Topology) -> ModelConfig:
    """Read the model's config (no weights) and check the topology against it: every check a rank would
    otherwise hit at start-up, in one process. Returns the ModelConfig; raises ConfigError naming the field.

    `disagg-mpi validate`, `run`, `serve` and launch/mpirun.sh call it before any rank starts, so a
    topology that cannot run fails with one line instead of a traceback per rank."""
    from .model.expert_parallel import check_ep
    from .model.loader import load_model_config
    from .model.parallel import validate_split

    try:
        mc = load_model_config(topo.model.path)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"model.path={topo.model.path!r}: {err}") from None
    validate_against_model(topo, mc.num_heads, mc.num_kv_heads, mc.num_layers, mc.intermediate_size)
    for name, ex in topo._named():  # the model layer's own checks (MoE widths, GQA groups) as well
        try:
            check_ep(ex.tensor_parallel_size, ex.expert_parallel_size, mc.num_experts, mc.moe_intermediate_size)
        except ValueError as err:
            raise ConfigError(f"{name}.{err} (model {topo.model.path!r}, tensor_parallel_size="
                              f"{ex.tensor_parallel_size})") from None
        try:
            validate_split(mc, ex.tensor_parallel_size, ex.pipeline_parallel_size, ex.layer_split,
                           ex.expert_parallel_size)
        except ValueError as err:
            raise ConfigError(f"{name} (tensor_parallel_size={ex.tensor_parallel_size}, "
                              f"pipeline_parallel_size={ex.pipeline_parallel_size}) does not fit "
                              f"{topo.model.path!r}: {err}") from None
    return mc

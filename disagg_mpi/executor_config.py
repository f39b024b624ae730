"""The executor's configuration records, TensorRT-LLM's names (`ExecutorConfig`, `KvCacheConfig`,
`CacheTransceiverConfig`, `CommType`); `disagg_mpi.api` re-exports them. Each transceiver field
is a knob (`knobs.py`): the YAML schema, the environment overrides and the docs table derive
from the fields."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from .knobs import env_overrides, field_knobs, knob


class CommType(enum.Enum):
    MPI = "MPI"
    UCX = "UCX"
    NIXL = "NIXL"


@dataclass
class CacheTransceiverConfig:
    """KV transfer settings: each field is a knob (`knobs.py`), documented once here; the YAML schema,
    the environment overrides and the table in docs/transfer.md are derived from these fields."""

    enable_cache_transceiver: bool = knob(
        False, "build a transceiver on the executor's ranks; required for context and generation executors of "
        "a disaggregated topology. YAML: `true` for every executor of a topology with `context_executors`, "
        "whether or not `cache_transceiver_config` is given (`false` there is refused), and `true` wherever the "
        "section is given; off in an aggregated executor without the section. Python dataclass: `false`")
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
    max_held_fraction: float = knob(
        0.5, "context executor: the share of its KV blocks that contexts held for clients who send the "
        "generation phase themselves (HTTP `context_only`) may use at once, such requests queued or running "
        "included; a new one beyond it is refused (HTTP 429 with `Retry-After`: when the soonest such hold's "
        "lease ends), so orphaned holds can never starve other requests; 1: only the pool bounds them",
        env="DISAGG_MAX_HELD_FRACTION", gt=0, le=1)
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

    direct_handoff: bool = knob(
        True, "requests rank 0 moves from their context to their generation phase (`submit`, `generate`, "
        "HTTP without `disaggregated_params`): rank 0 picks the generation executor at dispatch and parks the "
        "generation phase there; the context leader sends the signed params straight to it (`ContextReady`, "
        "the claim granted with it) instead of through rank 0, whose context answer then only records metrics. "
        "Off: rank 0 routes the generation phase when the context answers, and the generation side claims. "
        "Rank 0 uses it only when every context and generation executor has it on; the seed's manual flow "
        "and client-driven context_only / generation_only requests never use it", env="DISAGG_DIRECT_HANDOFF")

    def with_env_overrides(self) -> CacheTransceiverConfig:
        """This config with every knob whose environment variable is set replaced by its value."""
        return dataclasses.replace(self, **env_overrides(field_knobs(CacheTransceiverConfig)))

    def check_available(self) -> None:
        if self.enable_cache_transceiver and self.comm_type not in (None, CommType.MPI):
            raise ValueError(
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
    prefill_chunk_tokens: int | None = None  # prompt tokens in a step that decodes (None: max_num_tokens)
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    cache_transceiver_config: CacheTransceiverConfig = field(default_factory=CacheTransceiverConfig)
    dtype: str = "float32"
    device: str = "cpu"
    # Weight-only quantization of the decoder's projections and lm_head when the executor loads a model by name:
    # "none" (default, the exactness reference), "int8" or "int4"; CPU only (model/quant.py).
    quantization: str = "none"

"""Every setting a user can turn, each declared once: name, type, default, environment variable, doc.

Two kinds:
- **transceiver knobs**: the fields of `api.CacheTransceiverConfig`, each declared with `knob()`.
  Set in the YAML under `cache_transceiver_config`, each with an environment override that wins
  over the file. The YAML schema (`config.TransceiverSpec`), the overrides
  (`with_env_overrides`) and the docs table (docs/transfer.md) are all derived from the fields.
- **process knobs** (`PROCESS`): environment variables only (engine switches, paths), read with
  `env_value(name)`, which refuses a value it cannot parse and names what is allowed.

`markdown_table()` renders both tables for the docs (scripts/render_knobs.py writes them); a test
checks the docs hold them as rendered.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Knob:
    name: str
    type: type  # bool, int, float or str
    default: Any
    env: str | None
    doc: str
    where: str = "CPU and GPU"
    choices: tuple[str, ...] | None = None
    ge: float | None = None  # lower bound (inclusive)
    gt: float | None = None  # lower bound (exclusive)
    le: float | None = None  # upper bound (inclusive)

    def parse(self, raw: str) -> Any:
        """A value from its environment-variable text; ValueError names the variable and what is allowed."""
        text = raw.strip()
        try:
            if self.type is bool:
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError
                value = text.lower() in _TRUE
            elif self.choices is not None:
                value = text.lower()  # names of choices are matched whatever their case
            else:
                value = self.type(text)
        except ValueError:
            raise ValueError(f"{self.env}={raw!r} is not a {self.type.__name__}"
                             + (": use one of 1/true/yes/on or 0/false/no/off" if self.type is bool else "")) from None
        self.check(value, f"{self.env}={raw!r}")
        return value

    def check(self, value: Any, what: str) -> None:
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{what} is not allowed; allowed: {', '.join(self.choices)}")
        bounds = [(self.ge, lambda b: value >= b, ">="), (self.gt, lambda b: value > b, ">"),
                  (self.le, lambda b: value <= b, "<=")]
        for bound, ok, sign in bounds:
            if bound is not None and not ok(bound):
                raise ValueError(f"{what} is out of range; allowed: {sign} {bound:g}")


def knob(default: Any, doc: str, env: str | None = None, where: str = "CPU and GPU", **limits: Any) -> Any:
    """A dataclass field that is also a knob (its type comes from the annotation)."""
    return dataclasses.field(default=default, metadata={"knob": {"doc": doc, "env": env, "where": where, **limits}})


def field_knobs(cls: type) -> list[Knob]:
    """The knobs declared as fields of a dataclass (`knob()`), in order."""
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("knob")
        if meta is None:
            continue
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        out.append(Knob(f.name, args[0] if args else kind, f.default, **meta))
    return out


def env_overrides(knobs: list[Knob], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """{field name: value} for every knob whose environment variable is set (and not empty)."""
    environ = os.environ if environ is None else environ
    return {k.name: k.parse(environ[k.env]) for k in knobs if k.env and environ.get(k.env, "").strip()}


# Where downloaded models go when DISAGG_MPI_CACHE is unset: model/registry.py, the SLURM script
# `disagg-mpi slurm` renders (slurm.py), launch/slurm.sbatch and the docs all name this one folder.
DEFAULT_MODEL_CACHE = "~/.cache/disagg_mpi/models"

PROCESS: tuple[Knob, ...] = (
    Knob("cuda_graphs", bool, True, "DISAGG_CUDA_GRAPHS",
         "CUDA graphs and the Triton decode kernels for decode-only steps (off: eager torch)", "GPU only"),
    Knob("graph_capture", str, "startup", "DISAGG_GRAPH_CAPTURE",
         "when decode graphs are captured: at start-up, for every batch size the scheduler can reach, "
         "or lazily on each size's first use (a faster start, a stall on first use)", "GPU only",
         choices=("startup", "lazy")),
    Knob("overlap_decode", bool, True, "DISAGG_OVERLAP_DECODE",
         "launch the predicted next decode step before this one's tokens reach the host", "GPU only"),
    Knob("moe_fused", bool, True, "DISAGG_MOE_FUSED",
         "MoE decode steps of a few tokens (tokens x top_k up to 32, every expert on the rank) read their routed "
         "experts in two fused Triton kernels (`model/triton_moe.py`) instead of the grouped GEMMs", "GPU only"),
    Knob("prefill_triton_attn", bool, False, "DISAGG_PREFILL_TRITON_ATTN",
         "a prefill or mixed step's prompt rows attend in one paged Triton kernel a layer "
         "(`model/triton_prefill.py`) instead of torch's SDPA per piece; not yet timed on a GPU", "GPU only"),
    Knob("ring_slots", int, 8, "DISAGG_RING_SLOTS", "slots of a shared staging ring (`shared_staging`)",
         "GPU only", ge=1, le=512),
    Knob("mpi_cuda_aware", bool, True, "DISAGG_MPI_CUDA_AWARE",
         "ask the MPI library whether it is CUDA-aware (`MPIX_Query_cuda_support`); 0 forces no", "GPU only"),
    Knob("max_bypass", int, 32, "DISAGG_MAX_BYPASS",
         "scheduler: requests admitted before a waiting request whose KV blocks do not fit, before the queue "
         "stops behind it (0: first come, first served); in any case, a request that could not fit even once every "
         "running request finished (its blocks are held for hand-offs) never stops the queue", ge=0),
    Knob("max_bypass_seconds", float, 10.0, "DISAGG_MAX_BYPASS_SECONDS",
         "scheduler: how long a waiting request whose KV blocks do not fit lets later ones pass it, at most "
         "(see `DISAGG_MAX_BYPASS`)", ge=0),
    Knob("model_cache", str, "", "DISAGG_MPI_CACHE",
         f"folder of downloaded models (empty: {DEFAULT_MODEL_CACHE}); keep it on shared storage under SLURM"),
    Knob("api_key", str, "", "DISAGG_API_KEY", "`serve`: the key clients must send (empty: none)"),
    Knob("rankmap", str, "", "DISAGG_MPI_RANKMAP",
         "internal: the folder where `disagg-mpi` learns which rank is which process (set by the CLI)"),
    Knob("last_words", str, "", "DISAGG_MPI_LAST_WORDS",
         "internal: the Unix socket where `disagg-mpi serve` keeps in-flight clients' connections, to end "
         "them if the job dies (set by the CLI)"),
    Knob("decode_splits", str, "auto", "DISAGG_DECODE_SPLITS",
         "split each context of a small decode batch over several programs of the fused decode kernel "
         "(flash-decoding: `model/decode_tiles.py: decode_splits`); off: one program per sequence and KV head",
         "GPU only", choices=("auto", "off")),
    Knob("ipc_ordered_join", bool, True, "DISAGG_IPC_ORDERED_JOIN",
         "a generation leader's one-sided CUDA IPC pull joins the batch as soon as its copy is queued: the "
         "model's stream waits for the copy, the host does not (`transfer/ipc_path.py`); 0: the request joins "
         "once the host has seen the copy complete (between two steps)", "GPU with CUDA IPC"),
    Knob("handoff_during_steps", bool, True, "DISAGG_HANDOFF_DURING_STEPS",
         "a one-rank executor leader handles other leaders' messages (a ContextReady notice, claims), "
         "transfers and responses while a graph decode step runs on the GPU, instead of after it "
         "(`runtime/worker.py: _between_steps`; KV hand-off p50 3.5 -> 0.8 ms at 8 req/s on one H200)", "GPU only"),
    Knob("cpu_packed_gemm", bool, True, "DISAGG_CPU_PACKED_GEMM",
         "CPU executors run the decoder's projections through oneDNN with weights prepacked at start-up "
         "(model/cpu_gemm.py: 1.1-3x MKL's sgemm per GEMM); 0 keeps torch's F.linear", "CPU only"),
    Knob("warm_up", str, "auto", "DISAGG_WARM_UP",
         "run every kind of step (the largest prefill, mixed steps, a chunked prefill, decodes, the sampler's "
         "paths) once before an executor reports ready, so that no compile, plan or allocator growth lands on "
         "a client; auto: on GPU executors only", choices=("auto", "on", "off")),
    Knob("step_log", str, "", "DISAGG_STEP_LOG",
         "a folder where each executor's leader appends one JSON line per step (wall time, duration, "
         "sequences, tokens, the longest prefill chunk): where a serving stall happened and on what shape"),
    Knob("fault_stall_pull", bool, False, "DISAGG_FAULT_STALL_PULL",
         "tests only: the generation side claims a context but never pulls (fault injection)"),
)
_BY_ENV = {k.env: k for k in PROCESS}


def env_value(env: str, environ: dict[str, str] | None = None) -> Any:
    """A process knob's value: its environment variable, parsed, or its default."""
    k = _BY_ENV[env]
    raw = (os.environ if environ is None else environ).get(env, "")
    return k.parse(raw) if raw.strip() else k.default


def all_env_names(*configs: type) -> set[str]:
    """Every DISAGG_* variable of the process knobs and of these dataclasses' knobs."""
    return {k.env for k in (*PROCESS, *(k for c in configs for k in field_knobs(c))) if k.env}


def _default_text(k: Knob) -> str:
    if k.type is bool:
        return f"`{str(k.default).lower()}`"
    return "unset" if k.default is None else f"`{k.default if k.default != '' else '(empty)'}`"


def markdown_table(knobs: list[Knob] | tuple[Knob, ...], field_column: bool = True) -> str:
    names = (["field"] if field_column else []) + ["environment variable", "default", "what it does", "CPU / GPU"]
    rows = ["| " + " | ".join(names) + " |", "| " + " | ".join(["---"] * len(names)) + " |"]
    for k in knobs:
        limits = ", ".join(f"{s} {v:g}" for s, v in ((">=", k.ge), (">", k.gt), ("<=", k.le)) if v is not None)
        what = k.doc + (f" (allowed: {', '.join(k.choices)})" if k.choices else "") + (f" ({limits})" if limits else "")
        cells = ([f"`{k.name}`"] if field_column else []) + [f"`{k.env}`" if k.env else "-", _default_text(k), what,
                                                             k.where]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


_BEGIN, _END = "<!-- knobs: generated by `python scripts/render_knobs.py docs/transfer.md` -->", "<!-- /knobs -->"


def docs_section(transceiver: type) -> str:
    """The generated part of docs/transfer.md: both tables (`transceiver`: api.CacheTransceiverConfig)."""
    return (f"{_BEGIN}\n\n" + markdown_table(field_knobs(transceiver))
            + "\nProcess-wide switches, read from the environment of every rank:\n\n"
            + markdown_table(PROCESS, field_column=False) + f"\n{_END}")


def with_docs_section(text: str, transceiver: type) -> str:
    """`text` with its generated section replaced by the current one."""
    head, _, rest = text.partition(_BEGIN)
    _, _, tail = rest.partition(_END)
    return head + docs_section(transceiver) + tail

"""Runs one step of the model on one rank: build tensors, forward, sample.

Every rank of an executor runs the same `execute` with the same `StepInputs`
(SPMD): TP ranks meet in the model's all-reduce, PP stages hand hidden states
down the pipeline, and the last stage samples. The runner knows nothing about
requests; it sees flat lists of token ids and block tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..api import TokenLogprobs
from ..model import cpu_gemm, triton_kernels
from ..model.context import AttentionMetadata, forward_context
from .cuda_graphs import (
    DecodeGraphs,
    DecodeInputs,
    Launch,
    capture_at_startup,
    capture_sizes,
    fast_path_enabled,
    is_decode_only,
    packed_len,
    unpack_views,
)
from .grammar_masks import apply_masks
from .logprobs import prompt_logprobs, start_logprobs, token_logprobs
from .overlap import is_predicted, overlap_enabled
from .sampler import sample
from .scheduler import StepInputs
from .sequence import SamplingParams


@dataclass
class StepPlan:
    """One step as the leader sends it: the flat batch plus how to sample."""

    inputs: StepInputs
    sampling: list[SamplingParams]  # per sampled seq (the request's own record, as the engine resolved it)
    keys: list[tuple[int, int]]  # (seed, output position) per sampled seq
    # prompt + output ids per sampled seq whose params need them (penalties), else None
    histories: list[list[int] | None] = field(default_factory=list)
    # Per sampled seq: how many top alternatives its logprobs list (logprobs.NOT_ASKED: none);
    # empty when no row asks, so a step without logprobs sends and computes nothing more.
    logprobs: list[int] = field(default_factory=list)
    # Request.num_prompt_logprobs: the flat rows of this step whose logits score the next prompt token
    # (`prompt_targets`), with each row's k; empty unless a prefill chunk of the step asked.
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)
    prompt_ks: list[int] = field(default_factory=list)
    # Guided decoding: the grammar's bitmask [len(mask_rows), ceil(V / 32)] int32 of the sampled rows
    # mask_rows (indices into `sampling`), filled by the leader (grammar.py); None without grammars
    mask_rows: list[int] = field(default_factory=list)
    masks: torch.Tensor | None = field(default=None, compare=False)
    # The predicted next decode step, to launch behind this one (overlap.py); leader only,
    # not sent to other ranks (overlap runs on one-rank executors).
    next_inputs: StepInputs | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": asdict(self.inputs), "sampling": [s.to_wire() for s in self.sampling],
                "keys": self.keys, "histories": self.histories, "logprobs": self.logprobs,
                "mask_rows": self.mask_rows, "masks": None if self.masks is None else self.masks.numpy().tobytes(),
                "prompt": [self.prompt_rows, self.prompt_targets, self.prompt_ks] if self.prompt_rows else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepPlan:
        rows, raw = list(d.get("mask_rows") or []), d.get("masks")
        masks = None if raw is None else torch.frombuffer(bytearray(raw), dtype=torch.int32).view(len(rows), -1)
        prompt_rows, targets, ks = d.get("prompt") or ([], [], [])
        return cls(StepInputs(**d["inputs"]), [SamplingParams.from_wire(w) for w in d["sampling"]],
                   [tuple(k) for k in d["keys"]], list(d.get("histories") or []),
                   logprobs=list(d.get("logprobs") or []), mask_rows=rows, masks=masks,
                   prompt_rows=list(prompt_rows), prompt_targets=list(targets), prompt_ks=list(ks))


@dataclass
class Sampled:
    """What a step gives its leader: a token per sampled seq and, where the plan asked, its logprobs."""

    tokens: list[int]
    logprobs: list[TokenLogprobs | None] | None = None  # None: no row asked
    prompt_logprobs: list[TokenLogprobs] | None = None  # per StepPlan.prompt_rows, where any


def sample_step(logits: torch.Tensor, plan: StepPlan) -> Sampled:
    """Sample the plan's rows from the model's `logits` (with the grammar masks of the rows that have
    one); logprobs (of these unadjusted logits) for the rows that asked."""
    tokens = sample(logits, plan.sampling, plan.keys, plan.histories, plan.mask_rows, plan.masks)
    lps = token_logprobs(logits, tokens, plan.logprobs) if plan.logprobs else None
    return Sampled(tokens, lps)


@dataclass
class ParallelInfo:
    """Where this rank sits in its executor; `comm` is the executor communicator."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_stage: int = 0
    pp_size: int = 1
    comm: Any = None  # mpi4py communicator over the executor's ranks (None in process)

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp_size + tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_stage == self.pp_size - 1

    @property
    def is_leader(self) -> bool:
        return self.pp_stage == 0 and self.tp_rank == 0

    @property
    def is_sampler(self) -> bool:
        return self.is_last_stage and self.tp_rank == 0


_HIDDEN_TAG = 11
_TOKENS_TAG = 12


class ModelRunner:
    """`fast_decode` (default: on CUDA unless DISAGG_CUDA_GRAPHS=0) runs decode-only steps on the
    Triton kernels with device-side indices; `cuda_graphs` (default: with fast_decode on one
    rank) replays them from CUDA graphs captured per padded batch size; `overlap` (default: with
    graphs unless DISAGG_OVERLAP_DECODE=0) launches a predicted next decode step before reading
    this one's tokens (overlap.py)."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", par: ParallelInfo | None = None,
                 fast_decode: bool | None = None, cuda_graphs: bool | None = None,
                 overlap: bool | None = None):
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        self.par = par or ParallelInfo()
        self.hidden_size = model.config.hidden_size
        self.dtype = next(model.parameters()).dtype
        supported = (triton_kernels.available(self.device)
                     and getattr(model, "supports_fast_decode", lambda: False)())
        if fast_decode is None:
            fast_decode = self.device.type == "cuda" and fast_path_enabled()
        self.fast_decode = bool(fast_decode and supported)
        single = self.par.tp_size == 1 and self.par.pp_size == 1
        if cuda_graphs is None:
            cuda_graphs = fast_path_enabled()
        use_graphs = cuda_graphs and self.fast_decode and single and self.device.type == "cuda"
        if self.fast_decode and not getattr(model, "_projections_fused", False):
            model.fuse_projections()
            model._projections_fused = True
        # Prefill / mixed steps use the Triton norms / SwiGLU too (torch attention).
        model._fast_kernels = self.fast_decode
        # oneDNN prepacked projections (model/cpu_gemm.py); not under the Triton fast path (the
        # interpreter on CPU), whose fused GEMMs read the dense weights that packing frees.
        if (not self.fast_decode and cpu_gemm.available(self.device, self.dtype)
                and hasattr(model, "pack_for_cpu") and not getattr(model, "_cpu_packed", False)):
            model.pack_for_cpu()
            model._cpu_packed = True
            cpu_gemm.return_freed_memory()
        # After packing: the dense weights' memory is back with the system before the pool comes
        # (else a rank's peak RSS holds both, 107 MiB for SmolLM2).
        self.kv_pool = model.allocate_kv_pool(num_blocks, block_size, device=self.device)
        cfg = model.config
        width = min(num_blocks, -(-cfg.max_position_embeddings // block_size))
        self.graphs = DecodeGraphs(model, self.kv_pool, block_size, width) if use_graphs else None
        self._decode_inputs: DecodeInputs | None = None
        # Overlapped decode (overlap.py): the launched next step, its prediction and input ids.
        self.chains_decode = self.graphs is not None and (overlap_enabled() if overlap is None else overlap)
        self._chained: tuple[StepInputs, Launch, list[int]] | None = None
        self.overlap_stats = {"launched": 0, "used": 0, "dropped": 0}
        # Called while a graph decode step runs on the GPU, instead of blocking (a leader's hand-off
        # messages: runtime/worker.py); None: block.
        self.meanwhile: Callable[[], object] | None = None

    def capture_decode_graphs(self, max_batch_size: int) -> int:
        """Capture now (at start-up) the decode graphs of every batch size a scheduler of
        `max_batch_size` can reach; returns how many were captured. Nothing without graphs, or
        with DISAGG_GRAPH_CAPTURE=lazy (each is then captured on its first use)."""
        if self.graphs is None or not capture_at_startup():
            return 0
        return self.graphs.capture_all(capture_sizes(max_batch_size, self.graphs.sizes))

    @property
    def chain_pending(self) -> bool:
        """A step launched ahead (overlap.py) waits for the engine's next call."""
        return self._chained is not None

    def _take_chained(self, inp: StepInputs) -> Launch | None:
        """The launched step if `inp` is the one predicted for it, else None (it is dropped)."""
        if self._chained is None:
            return None
        predicted, launch, ids = self._chained
        self._chained = None
        if is_predicted(predicted, inp, ids):
            self.overlap_stats["used"] += 1
            return launch
        self.overlap_stats["dropped"] += 1
        return None

    def _execute_graph(self, plan: StepPlan, launch: Launch | None) -> Sampled:
        """A decode step from CUDA graphs (one rank: it is the leader and the sampler)."""
        inp = plan.inputs
        if launch is None:
            launch = self.graphs.launch(inp)
        if not inp.sample_indices:
            return Sampled([])
        params = plan.sampling
        logits, greedy = launch.logits, launch.tokens
        if list(inp.sample_indices) != list(range(launch.b)):
            rows = self._tensor(inp.sample_indices)
            logits, greedy = logits[rows], greedy[rows]
        elif len(params) == launch.b and all(p.masked_greedy for p in params):
            # Greedy rows: the tokens are taken on the device (the graph's argmax, or the argmax of
            # the logits a grammar masked), so the next step can be queued behind them before the
            # host sees them; a grammar's masks for that step are then filled on the host while it
            # runs on the GPU (the engine's next _run). Logprobs are computed from the logits and
            # on their way to the host before the next step overwrites them.
            if plan.mask_rows:
                greedy = apply_masks(logits, plan.mask_rows, plan.masks).argmax(dim=-1)
                launch = self.graphs.fetch(greedy)
            lps = start_logprobs(logits, greedy, plan.logprobs) if plan.logprobs else None
            nxt = plan.next_inputs
            queued = None
            if (self.chains_decode and nxt is not None and len(nxt.input_ids) == launch.b
                    and self.graphs.can_run(nxt)):
                queued = self.graphs.launch(nxt, ids_from=greedy)
                self.overlap_stats["launched"] += 1
            # the one host sync (this step's tokens: their event, while `meanwhile` runs)
            tokens = launch.wait(self.meanwhile)
            if queued is not None:
                self._chained = (nxt, queued, tokens)
            return Sampled(tokens, None if lps is None else lps.result())
        if len(params) == len(greedy) and all(p.plain_greedy for p in params) and not plan.logprobs:
            return Sampled(greedy.tolist())
        return sample_step(logits, plan)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _decode_metadata(self, inp: StepInputs):
        """(ids, positions, DecodeMetadata) on device from one packed copy (eager fast path)."""
        b = len(inp.input_ids)
        width = max(1, max((len(t) for t in inp.block_tables), default=1))
        if self._decode_inputs is None or not self._decode_inputs.fits(b, width):
            self._decode_inputs = DecodeInputs(2 * packed_len(b, width), self.device)
        self._decode_inputs.upload(inp, b)
        return unpack_views(self._decode_inputs.dev, b, self.block_size)

    def _metadata(self, inp: StepInputs) -> AttentionMetadata:
        width = max((len(t) for t in inp.block_tables), default=0)
        if width and all(len(t) == width for t in inp.block_tables):
            tables = torch.tensor(inp.block_tables, dtype=torch.long)
        else:
            tables = torch.full((len(inp.block_tables), max(width, 1)), -1, dtype=torch.long)
            for i, t in enumerate(inp.block_tables):
                tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return AttentionMetadata(
            # Host copy: StepIndex checks it for padding without a device sync.
            slot_mapping=torch.tensor(inp.slot_mapping, dtype=torch.long),
            query_start_loc=list(inp.query_start_loc),
            context_lens=list(inp.context_lens),
            block_tables=tables.to(self.device),
            block_size=self.block_size,
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> Sampled | None:
        """Run the step; the leader gets the sampled tokens (and logprobs), other ranks None."""
        par = self.par
        inp = plan.inputs
        if inp.block_copies:  # parallel sampling: forked sequences' own last prompt blocks (scheduler.fork)
            src, dst = zip(*inp.block_copies)  # (a gathered copy first: a block may be both a source and a target)
            self.kv_pool.index_copy_(0, self._tensor(list(dst)), self.kv_pool.index_select(0, self._tensor(list(src))))
        n = len(inp.input_ids)
        decode = self.fast_decode and is_decode_only(inp)
        chained = self._take_chained(inp)
        if decode and self.graphs is not None and not plan.prompt_rows and (chained is not None or self.graphs.can_run(inp)):
            return self._execute_graph(plan, chained)
        if decode:
            ids, positions, meta = self._decode_metadata(inp)
        else:
            ids, positions, meta = None, self._tensor(inp.positions), self._metadata(inp)
        hidden = None
        if not par.is_first_stage:
            hidden = torch.empty(n, self.hidden_size, dtype=self.dtype, device=self.device)
            _recv_tensor(par.comm, hidden, par.rank_of(par.pp_stage - 1, par.tp_rank))
        with forward_context(meta):
            if not par.is_first_stage:
                ids = None
            elif ids is None:
                ids = self._tensor(inp.input_ids)
            hidden = self.model(ids, positions, self.kv_pool, hidden_states=hidden)
        if not par.is_last_stage:
            _send_tensor(par.comm, hidden.contiguous(), par.rank_of(par.pp_stage + 1, par.tp_rank))
            tokens = None
        else:
            tokens = self._sample(hidden, plan) if par.is_sampler else None
        if par.pp_size > 1:  # the last stage hands the tokens back to the leader
            if par.is_sampler and not par.is_leader:
                par.comm.send(tokens, dest=0, tag=_TOKENS_TAG)
            elif par.is_leader:
                tokens = par.comm.recv(source=par.rank_of(par.pp_size - 1, 0), tag=_TOKENS_TAG)
        return tokens if par.is_leader else None

    def _sample(self, hidden: torch.Tensor, plan: StepPlan) -> Sampled:
        """The sampler rank's share of a step: the sampled rows' tokens, and the prompt rows' logprobs
        where asked (their logits only: a step without prompt rows makes none)."""
        inp = plan.inputs
        out = Sampled([])
        if inp.sample_indices:
            if list(inp.sample_indices) == list(range(len(inp.input_ids))):
                logits = self.model.compute_logits(hidden)
            else:
                logits = self.model.compute_logits(hidden[self._tensor(inp.sample_indices)])
            out = sample_step(logits, plan)
        if plan.prompt_rows:
            out.prompt_logprobs = prompt_logprobs(self.model.compute_logits, hidden, plan.prompt_rows,
                                                  plan.prompt_targets, plan.prompt_ks)
        return out


def _send_tensor(comm: Any, t: torch.Tensor, dest: int) -> None:
    if t.is_cuda:  # plain MPI is not CUDA-aware: stage through host memory
        t = t.cpu()
    comm.Send(_as_buffer(t), dest=dest, tag=_HIDDEN_TAG)


def _recv_tensor(comm: Any, out: torch.Tensor, source: int) -> None:
    host = out if not out.is_cuda else torch.empty_like(out, device="cpu")
    comm.Recv(_as_buffer(host), source=source, tag=_HIDDEN_TAG)
    if host is not out:
        out.copy_(host)


def _as_buffer(t: torch.Tensor) -> Any:
    """A byte view that MPI moves as-is (bf16 has no MPI datatype)."""
    return t.view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy()

"""Runs one step of the model on one rank: build tensors, forward, sample.

Every rank of an executor runs the same `execute` with the same `StepInputs`
(SPMD): TP ranks meet in the model's all-reduce, PP stages hand hidden states
down the pipeline, and the last stage samples. The runner knows nothing about
requests; it sees flat lists of token ids and block tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..model.context import AttentionMetadata, forward_context
from .sampler import sample
from .scheduler import StepInputs
from .sequence import SamplingParams


@dataclass
class StepPlan:
    """One step as the leader sends it: the flat batch plus how to sample."""

    inputs: StepInputs
    sampling: list[tuple[float, int, float, int]]  # (temperature, top_k, top_p, seed) per sampled seq
    keys: list[tuple[int, int]]  # (seed, output position) per sampled seq

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": asdict(self.inputs), "sampling": self.sampling, "keys": self.keys}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepPlan:
        return cls(StepInputs(**d["inputs"]), [tuple(x) for x in d["sampling"]],
                   [tuple(k) for k in d["keys"]])


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
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int,
                 device: torch.device | str = "cpu", par: ParallelInfo | None = None):
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        self.par = par or ParallelInfo()
        self.kv_pool = model.allocate_kv_pool(num_blocks, block_size, device=self.device)
        self.hidden_size = model.config.hidden_size
        self.dtype = next(model.parameters()).dtype

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _metadata(self, inp: StepInputs) -> AttentionMetadata:
        width = max((len(t) for t in inp.block_tables), default=0)
        tables = torch.full((len(inp.block_tables), max(width, 1)), -1, dtype=torch.long)
        for i, t in enumerate(inp.block_tables):
            tables[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return AttentionMetadata(
            slot_mapping=self._tensor(inp.slot_mapping),
            query_start_loc=list(inp.query_start_loc),
            context_lens=list(inp.context_lens),
            block_tables=tables.to(self.device),
            block_size=self.block_size,
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[int] | None:
        """Run the step; the leader gets the sampled tokens, other ranks None."""
        par = self.par
        inp = plan.inputs
        n = len(inp.input_ids)
        positions = self._tensor(inp.positions)
        hidden = None
        if not par.is_first_stage:
            hidden = torch.empty(n, self.hidden_size, dtype=self.dtype, device=self.device)
            _recv_tensor(par.comm, hidden, par.rank_of(par.pp_stage - 1, par.tp_rank))
        with forward_context(self._metadata(inp)):
            ids = self._tensor(inp.input_ids) if par.is_first_stage else None
            hidden = self.model(ids, positions, self.kv_pool, hidden_states=hidden)
        if not par.is_last_stage:
            _send_tensor(par.comm, hidden.contiguous(), par.rank_of(par.pp_stage + 1, par.tp_rank))
            tokens = None
        elif par.is_sampler and inp.sample_indices:
            logits = self.model.compute_logits(hidden[self._tensor(inp.sample_indices)])
            params = [SamplingParams(t, k, p, s) for t, k, p, s in plan.sampling]
            tokens = sample(logits, params, plan.keys)
        else:
            tokens = [] if par.is_sampler else None
        if par.pp_size > 1:  # the last stage hands the tokens back to the leader
            if par.is_sampler and not par.is_leader:
                par.comm.send(tokens, dest=0, tag=_TOKENS_TAG)
            elif par.is_leader:
                tokens = par.comm.recv(source=par.rank_of(par.pp_size - 1, 0), tag=_TOKENS_TAG)
        return tokens if par.is_leader else None


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

"""Mixture-of-experts FFN (Mixtral, Qwen3-MoE, Qwen2-MoE), as transformers computes it.

Router: logits = gate(x); softmax in fp32; top-k; renormalized over the k when
`norm_topk_prob` (always for Mixtral). Each expert is a SwiGLU MLP; Qwen2-MoE adds
a shared expert, weighted by sigmoid(shared_expert_gate(x)). Tensor
parallelism shards every expert's FFN columns like a dense MLP (the router is
replicated), so one all-reduce after the experts sums the ranks' partials.
Expert parallelism (expert_parallel.py) gives a rank only the experts of its
range (`shard.expert_range`), whole or split tp/ep ways; the others' ids are
skipped (loop) or sort last and add nothing (grouped), and the same all-reduce
sums the ranks' contributions.

The experts are stored stacked, as transformers 5 does (`experts.gate_up_proj`
[E_local, 2F, H], gate rows first, and `experts.down_proj` [E_local, H, F]): the
rank's experts [start, start + E_local) of `expert_range` (all of them without
expert parallelism). Two ways through them:
- the loop (CPU, and any dtype/GPU without a grouped kernel): only the experts some
  token picked, in ascending order, as transformers does, so fp32 sums add up in the same
  order; it reads the chosen ids on the host.
- the grouped GEMMs of moe_grouped.py (CUDA, bf16, Hopper+): no host sync, so an MoE
  model takes the CUDA-graph decode path (`LlamaModel.supports_fast_decode`).
- where the grouped GEMMs run, a few tokens (decode batches up to triton_moe.FUSED_MAX_PAIRS /
  top_k) with every expert on this rank take two fused Triton kernels instead (triton_moe.py),
  and a renormalized router's top-k and softmax are one Triton kernel (triton_moe.route_topk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disagg_mpi.model import triton_kernels as tk
from disagg_mpi.model.moe_grouped import grouped_experts, grouped_mm_ok
from disagg_mpi.model.parallel import ShardSpec
from disagg_mpi.model.triton_moe import fused_experts, fused_ok, route_topk


class Expert(nn.Module):
    """One SwiGLU MLP (Qwen2-MoE's shared expert)."""

    def __init__(self, hidden: int, ffn_local: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn_local, bias=False)
        self.up_proj = nn.Linear(hidden, ffn_local, bias=False)
        self.down_proj = nn.Linear(ffn_local, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StackedExperts(nn.Module):
    """The rank's routed experts as two stacked weights (transformers 5's names and layout)."""

    def __init__(self, num_local: int, hidden: int, ffn_local: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_local, 2 * ffn_local, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_local, hidden, ffn_local))

    def loop(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Sum over the local experts some token picked, ascending (reads `ids` on the host)."""
        out = torch.zeros_like(x)
        local = ids - start
        for e in torch.unique(local).tolist():
            if not 0 <= e < self.gate_up_proj.shape[0]:
                continue   # another rank's expert
            tok, slot = torch.where(local == e)
            g, u = F.linear(x[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(g) * u, self.down_proj[e]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k] fp32, expert ids [N, k]) from router logits [N, E]."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def route_renormalized(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`route(..., normalize=True)` in two kernels: the top-k of the logits (softmax keeps their
    order), then a softmax over those k alone (exp(l_i) / sum of the k exps is the renormalized
    probability), in the logits' dtype (torch accumulates a bf16 softmax in fp32 and rounds once, as
    Qwen3-MoE's cast of the fp32 weights does). The grouped path's: a decode step is launch-bound."""
    vals, ids = torch.topk(logits, top_k, dim=-1)
    return torch.softmax(vals, dim=-1), ids


class SparseMoE(nn.Module):
    def __init__(self, cfg, ffn_local: int, shard: ShardSpec, expert_range: tuple[int, int] | None = None):
        super().__init__()
        self.shard, self.top_k, self.normalize = shard, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.expert_range = expert_range or shard.expert_range(cfg.num_experts)   # (0, E) unless EP
        self.num_experts = cfg.num_experts
        # Qwen3-MoE rounds the routing weights to the model dtype; Mixtral keeps them in fp32.
        self.round_weights = cfg.architecture != "mixtral"
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)   # routes over all experts
        e0, e1 = self.expert_range
        self.experts = StackedExperts(e1 - e0, cfg.hidden_size, ffn_local)
        if cfg.shared_expert_intermediate_size:   # Qwen2-MoE; TP splits it like the others
            self.shared_expert = Expert(cfg.hidden_size, cfg.shared_expert_intermediate_size // shard.tp_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)   # replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ex, start = self.experts, self.expert_range[0]
        all_local = (start, ex.gate_up_proj.shape[0]) == (0, self.num_experts)
        grouped = grouped_mm_ok(x.device, x.dtype)
        fused = grouped and fused_ok(x, self.top_k, all_local)   # few tokens: two kernels (triton_moe.py)
        if grouped and self.normalize:
            logits = self.gate(x)
            fast = tk.available(x.device) and logits.stride(-1) == 1
            weights, ids = route_topk(logits, self.top_k) if fast else route_renormalized(logits, self.top_k)
        else:
            weights, ids = route(self.gate(x), self.top_k, self.normalize)
        if self.round_weights and not grouped:   # (the grouped combine rounds them to x's dtype itself)
            weights = weights.to(x.dtype)
        if fused:
            out = fused_experts(x, weights, ids, ex.gate_up_proj, ex.down_proj)
        elif grouped:
            silu_mul = tk.silu_mul if tk.available(x.device) else None
            out = grouped_experts(x, weights, ids, ex.gate_up_proj, ex.down_proj, start, self.num_experts,
                                  silu_mul)
        else:
            out = ex.loop(x, weights, ids, start)
        if hasattr(self, "shared_expert"):   # sigmoid gate of the whole x: the same on every TP rank
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.shard.tp_size > 1:
            out = self.shard.all_reduce(out)
        return out

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The fast path's MLP call (LlamaModel._forward_fast): the same forward."""
        return self.forward(x)

    def fuse(self) -> None:
        """Nothing to fuse: gate and up are stacked already."""

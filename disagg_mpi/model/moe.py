"""Mixture-of-experts FFN (Mixtral, Qwen3-MoE, Qwen2-MoE), as transformers computes it.

Router: logits = gate(x); softmax in fp32; top-k; renormalized over the k when
`norm_topk_prob` (always for Mixtral). Each expert is a SwiGLU MLP; Qwen2-MoE adds
a shared expert, weighted by sigmoid(shared_expert_gate(x)). Tensor
parallelism shards every expert's FFN columns like a dense MLP (the router is
replicated), so one all-reduce after the expert loop sums the ranks' partials.
Expert parallelism (expert_parallel.py) gives a rank only the experts of its
range (`shard.expert_range`), whole or split tp/ep ways; the loop skips the
others, and the same all-reduce sums the ranks' contributions.

The loop visits only the experts some token picked, in ascending order (as
transformers does, so fp32 sums add up in the same order). It reads the chosen
ids on the host: fine on CPU, and why an MoE model never takes the CUDA-graph
decode path (`LlamaModel.supports_fast_decode`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from disagg_mpi.model.parallel import ShardSpec


class Expert(nn.Module):
    def __init__(self, hidden: int, ffn_local: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn_local, bias=False)
        self.up_proj = nn.Linear(hidden, ffn_local, bias=False)
        self.down_proj = nn.Linear(ffn_local, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k] fp32, expert ids [N, k]) from router logits [N, E]."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoE(nn.Module):
    def __init__(self, cfg, ffn_local: int, shard: ShardSpec):
        super().__init__()
        self.shard, self.top_k, self.normalize = shard, cfg.num_experts_per_tok, cfg.norm_topk_prob
        # Qwen3-MoE rounds the routing weights to the model dtype; Mixtral keeps them in fp32.
        self.round_weights = cfg.architecture != "mixtral"
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        # Only this rank's experts: experts[i] is global expert expert_range[0] + i.
        self.expert_range = e0, e1 = shard.expert_range(cfg.num_experts)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, ffn_local) for _ in range(e0, e1))
        if cfg.shared_expert_intermediate_size:   # Qwen2-MoE; TP splits it like the others
            self.shared_expert = Expert(cfg.hidden_size, cfg.shared_expert_intermediate_size // shard.tp_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)   # replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.normalize)
        if self.round_weights:
            weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        e0, e1 = self.expert_range
        for e in torch.unique(ids).tolist():
            if not e0 <= e < e1:   # another EP rank's expert
                continue
            tok, slot = torch.where(ids == e)
            y = self.experts[e - e0](x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        if hasattr(self, "shared_expert"):   # sigmoid gate of the whole x: the same on every TP rank
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.shard.tp_size > 1:
            out = self.shard.all_reduce(out)
        return out

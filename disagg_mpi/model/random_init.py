"""Seeded random weights (for presets without a checkpoint, e.g. Llama-3.1-8B shapes on a GPU).

Each tensor comes from its own generator seeded by (seed, name), generated in
full and then sliced, so every TP/PP layout sees the same global weights.
"""
from __future__ import annotations

import zlib

import torch

from disagg_mpi.model.config import ModelConfig
from disagg_mpi.model.weights import Fetch, slice_tensor

STD = 0.02


def full_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    if ".experts." in name or ".block_sparse_moe." in name:
        f = cfg.moe_intermediate_size
    if ".shared_expert." in name:
        f = cfg.shared_expert_intermediate_size
    if name.endswith("shared_expert_gate.weight"):
        return (1, h)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (cfg.vocab_size, h)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return (d,)
    if name.endswith("norm.weight"):
        return (h,)
    last = name.split(".")[-2]
    if last == "gate":   # an MoE router
        return (cfg.num_experts, h)
    last = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(last, last)   # Mixtral names
    rows = {"q_proj": cfg.num_heads * d, "k_proj": cfg.num_kv_heads * d, "v_proj": cfg.num_kv_heads * d,
            "o_proj": h, "gate_proj": f, "up_proj": f, "down_proj": h}[last]
    if name.endswith(".bias"):
        return (rows,)
    cols = {"o_proj": cfg.num_heads * d, "down_proj": f}.get(last, h)
    return (rows, cols)


def random_fetch(cfg: ModelConfig, seed: int, dtype: torch.dtype, device: str | torch.device) -> Fetch:
    device = torch.device(device)

    def fetch(name: str, dim: int | None, start: int, end: int) -> torch.Tensor:
        shape = full_shape(cfg, name)
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype, device=device)
        g = torch.Generator(device=device)
        g.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        t = torch.randn(shape, generator=g, dtype=dtype, device=device).mul_(STD)
        return slice_tensor(t, dim, start, end)

    return fetch

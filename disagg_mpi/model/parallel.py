"""Tensor/pipeline/expert parallel layout: which heads, columns, experts and layers a rank holds.

Pure functions only; the model and loaders use them to slice weights (expert ranges:
expert_parallel.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from disagg_mpi.model.expert_parallel import check_ep, expert_ffn_range, expert_range

if TYPE_CHECKING:
    import torch


@dataclass
class ShardSpec:
    tp_rank: int = 0
    tp_size: int = 1
    layer_start: int = 0
    layer_end: int | None = None     # None: up to the last layer
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # sums over the TP group
    ep_size: int = 1   # expert parallelism inside the TP group (expert_parallel.py); 1: experts TP-split

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """Global experts [start, end) this rank holds."""
        return expert_range(self.tp_rank, self.tp_size, self.ep_size, num_experts)

    def expert_ffn_range(self, moe_ffn: int) -> tuple[int, int]:
        """FFN columns [start, end) of each of its experts this rank holds."""
        return expert_ffn_range(self.tp_rank, self.tp_size, self.ep_size, moe_ffn)

    def resolved_layer_end(self, num_layers: int) -> int:
        return num_layers if self.layer_end is None else self.layer_end

    def is_first_stage(self) -> bool:
        return self.layer_start == 0

    def is_last_stage(self, num_layers: int) -> bool:
        return self.resolved_layer_end(num_layers) == num_layers


def _check_tp_kv(num_kv_heads: int, tp: int) -> None:
    if tp < 1:
        raise ValueError(f"tp size must be >= 1, got {tp}")
    if num_kv_heads % tp != 0 and tp % num_kv_heads != 0:
        raise ValueError(
            f"tp={tp} does not fit num_kv_heads={num_kv_heads}: tp must divide the KV heads or "
            f"be a multiple of them (allowed: {allowed_tp(num_kv_heads)} ...)")


def allowed_tp(num_kv_heads: int, num_heads: int | None = None, limit: int = 64) -> list[int]:
    out = []
    for t in range(1, limit + 1):
        if num_kv_heads % t and t % num_kv_heads:
            continue
        if num_heads is not None and num_heads % t:
            continue
        out.append(t)
    return out


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    _check_tp_kv(num_kv_heads, tp)
    return max(1, num_kv_heads // tp)


def kv_head_range(tp_rank: int, tp: int, num_kv_heads: int) -> tuple[int, int]:
    """Global KV heads [start, end) of a TP rank; replicated when tp > num_kv_heads."""
    _check_tp_kv(num_kv_heads, tp)
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp={tp}")
    if tp > num_kv_heads:
        h = tp_rank // (tp // num_kv_heads)
        return h, h + 1
    n = num_kv_heads // tp
    return tp_rank * n, (tp_rank + 1) * n


def q_head_range(tp_rank: int, tp: int, num_heads: int) -> tuple[int, int]:
    if tp < 1 or num_heads % tp != 0:
        raise ValueError(f"num_heads={num_heads} is not divisible by tp={tp}")
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp={tp}")
    n = num_heads // tp
    return tp_rank * n, (tp_rank + 1) * n


def check_gqa_consistent(tp_rank: int, tp: int, num_heads: int, num_kv_heads: int) -> None:
    """Each local query head must use a KV head this rank holds (q head h -> kv h // group)."""
    qs, qe = q_head_range(tp_rank, tp, num_heads)
    ks, ke = kv_head_range(tp_rank, tp, num_kv_heads)
    group = num_heads // num_kv_heads
    for h in range(qs, qe):
        if not ks <= h // group < ke:
            raise ValueError(
                f"tp={tp} splits GQA groups: rank {tp_rank} holds q head {h} but not its KV head "
                f"{h // group} (holds {ks}..{ke - 1}); heads={num_heads}, kv_heads={num_kv_heads}")


def even_layer_split(num_layers: int, pp: int) -> list[int]:
    """Layers per stage, as even as possible; earlier stages take the remainder."""
    if pp < 1 or pp > num_layers:
        raise ValueError(f"pp={pp} must be between 1 and num_layers={num_layers}")
    base, rem = divmod(num_layers, pp)
    return [base + (1 if i < rem else 0) for i in range(pp)]


def layer_range(stage: int, split: Sequence[int]) -> tuple[int, int]:
    if not 0 <= stage < len(split):
        raise ValueError(f"stage {stage} out of range for {len(split)} stages")
    start = sum(split[:stage])
    return start, start + split[stage]


def validate_split(config, tp: int, pp: int, layer_split: Sequence[int] | None = None,
                   ep: int = 1) -> list[int]:
    """Check that (tp, pp, layer_split, ep) fits the model; returns the layer split used."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tp and pp must be >= 1 (got tp={tp}, pp={pp})")
    if config.num_heads % tp:
        raise ValueError(f"tp={tp} must divide num_heads={config.num_heads}; allowed tp: "
                         f"{allowed_tp(config.num_kv_heads, config.num_heads)}")
    if config.num_kv_heads % tp and tp % config.num_kv_heads:
        raise ValueError(f"tp={tp} must divide num_kv_heads={config.num_kv_heads} or be a multiple "
                         f"of it; allowed tp: {allowed_tp(config.num_kv_heads, config.num_heads)}")
    if config.intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide intermediate_size={config.intermediate_size}")
    num_experts = getattr(config, "num_experts", 0)
    check_ep(tp, ep, num_experts, getattr(config, "moe_intermediate_size", 0))
    if num_experts and ep == 1 and config.moe_intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide moe_intermediate_size={config.moe_intermediate_size} "
                         "(every expert's FFN is split across the TP ranks)")
    if getattr(config, "shared_expert_intermediate_size", 0) % tp:
        raise ValueError(f"tp={tp} must divide shared_expert_intermediate_size="
                         f"{config.shared_expert_intermediate_size}")
    for r in range(tp):
        check_gqa_consistent(r, tp, config.num_heads, config.num_kv_heads)
    if layer_split is None:
        if pp > config.num_layers:
            raise ValueError(f"pp={pp} exceeds num_layers={config.num_layers}; allowed pp: 1..{config.num_layers}")
        return even_layer_split(config.num_layers, pp)
    split = list(layer_split)
    if len(split) != pp:
        raise ValueError(f"layer_split {split} has {len(split)} stages but pp={pp}")
    if any(n < 1 for n in split) or sum(split) != config.num_layers:
        raise ValueError(f"layer_split {split} must be positive and sum to num_layers={config.num_layers}")
    return split

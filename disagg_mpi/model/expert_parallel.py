"""Expert parallelism: which experts, and which of their FFN columns, a TP rank holds.

EP reuses the ranks of an executor's TP group (`expert_parallel_size` = ep divides
`tensor_parallel_size` = tp). Attention stays tensor-parallel over all tp ranks. The experts
are cut into ep contiguous ranges; the tp ranks into ep contiguous groups of tp/ep ranks; group
g holds range g, each expert of it whole when ep == tp and split tp/ep ways by FFN columns
otherwise (as TP splits a dense MLP). The router and Qwen2-MoE's shared expert stay as TP has
them (replicated, and split tp ways).

Each rank computes its own experts' contributions for every token of the step (the hidden
states are already replicated across the TP ranks, since attention is TP) and the MoE block's
one all-reduce sums them: the gather/scatter form. An all-to-all dispatch would move the tokens
every rank already has, then need a second exchange to combine; it pays off when the attention is
data-parallel (each rank a different batch) and the TP group spans nodes, neither of which holds
here. So EP costs the same one all-reduce per MoE layer as TP and changes only what each rank
computes: whole experts (fewer, larger GEMMs, and only the experts that tokens picked on that
rank) instead of a slice of every expert.

Pure functions, no torch: rank 0 and `disagg-mpi validate` use them to check and describe a layout.
"""
from __future__ import annotations

from collections.abc import Sequence


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def allowed_ep(tp: int, num_experts: int, moe_ffn: int | None = None) -> list[int]:
    """The expert_parallel_size values an executor of TP `tp` can take for a model of
    `num_experts` experts (each `moe_ffn` wide): ep must divide tp and the expert count, and tp/ep
    must divide the expert width (each expert is split tp/ep ways)."""
    return [e for e in _divisors(tp)
            if num_experts % e == 0 and (moe_ffn is None or moe_ffn % (tp // e) == 0)]


def check_ep(tp: int, ep: int, num_experts: int, moe_ffn: int) -> None:
    """Raise ValueError naming the value and what is allowed when (tp, ep) cannot split the experts."""
    if ep < 1:
        raise ValueError(f"expert_parallel_size={ep} must be >= 1")
    if ep == 1:
        return
    if num_experts == 0:
        raise ValueError(f"expert_parallel_size={ep} needs a mixture-of-experts model, but this model is "
                         "dense (no experts); allowed: 1")
    allowed = allowed_ep(tp, num_experts, moe_ffn)
    if tp % ep:
        raise ValueError(f"expert_parallel_size={ep} does not divide tensor_parallel_size={tp} (EP splits "
                         f"the experts over the TP ranks); allowed: {allowed}")
    if num_experts % ep:
        raise ValueError(f"expert_parallel_size={ep} does not divide the model's {num_experts} experts "
                         f"(every rank group holds as many); allowed: {allowed}")
    if moe_ffn % (tp // ep):
        raise ValueError(f"expert_parallel_size={ep} leaves each expert split tp/ep = {tp // ep} ways, which "
                         f"does not divide its FFN width {moe_ffn}; allowed: {allowed}")


def expert_range(tp_rank: int, tp: int, ep: int, num_experts: int) -> tuple[int, int]:
    """Global experts [start, end) that TP rank `tp_rank` holds (all of them when ep == 1)."""
    if not 0 <= tp_rank < tp:
        raise ValueError(f"tp_rank {tp_rank} out of range for tp={tp}")
    if ep == 1:
        return 0, num_experts
    n = num_experts // ep
    g = tp_rank // (tp // ep)
    return g * n, (g + 1) * n


def expert_ffn_range(tp_rank: int, tp: int, ep: int, moe_ffn: int) -> tuple[int, int]:
    """FFN columns [start, end) of each of its experts that TP rank `tp_rank` holds."""
    ways = tp // ep
    width = moe_ffn // ways
    j = tp_rank % ways
    return j * width, (j + 1) * width


def describe_layout(tp: int, ep: int, num_experts: int, moe_ffn: int,
                    stage_ranks: Sequence[Sequence[int]]) -> str:
    """One line for `disagg-mpi validate`: which world ranks hold which experts.
    `stage_ranks[s][r]`: the world rank of TP rank r in pipeline stage s."""
    ways = tp // ep
    parts = []
    for g in range(ep):
        e0, e1 = expert_range(g * ways, tp, ep, num_experts)
        ranks = [stage[r] for stage in stage_ranks for r in range(g * ways, (g + 1) * ways)]
        which = f"expert {e0}" if e1 - e0 == 1 else f"experts {e0}-{e1 - 1}"
        parts.append(f"{which} on rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}")
    how = "each expert whole" if ways == 1 else f"each expert's FFN ({moe_ffn}) split {ways} ways"
    return f"EP={ep} over TP={tp}: " + "; ".join(parts) + f" ({how})"

"""The routed experts as two grouped GEMMs, with no host synchronization (CUDA-graph capturable).

Every (token, slot) pair of the router's top-k becomes one row; the rows are sorted by their
expert, and each expert's rows form one group of `torch._grouped_mm` (one CUTLASS launch for
all experts: gate+up, then down). Group boundaries are found on the device
(`searchsorted` over the sorted ids), never read on the host, so the same code runs inside a
captured decode step at any routing.

Expert parallelism: the stacked weights hold only this rank's experts [start, start + E_local);
a pair routed to another rank's expert gets the sentinel id E_local, sorts after every local
group and lies past the last offset: the GEMMs skip it (its output rows are left unwritten) and
`combine` zeroes it, so the rank's sum covers its own experts only (an all-reduce adds the rest).

On CUDA the kernel exists for bf16 on Hopper/Blackwell only; for other dtypes or devices torch
falls back to a loop that copies the offsets to the host (`grouped_mm_ok` says which). On CPU
torch's kernel runs for every float dtype: tests check this module's math there.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F


def grouped_mm_ok(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the grouped path runs without a host sync: CUDA, bf16, compute capability 9 or 10
    (torch's CUTLASS grouped kernel; elsewhere `_grouped_mm` falls back to a host loop)."""
    device = torch.device(device)
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return _capability_major(device.index) in (9, 10)


@lru_cache(maxsize=16)
def _capability_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm   # public name from torch 2.10
    return fn(a, b, offs=offs)


class ExpertSort(NamedTuple):
    perm: torch.Tensor    # [N*k] the (token, slot) pair of each sorted row, as token * k + slot
    token: torch.Tensor   # [N*k] the token of each sorted row
    offs: torch.Tensor    # [E_local] int32: end row of each expert's group (cumulative counts)
    local: torch.Tensor   # [N*k] the sorted local expert ids (E_local: another rank's expert)


def sort_by_expert(ids: torch.Tensor, start: int, num_local: int, all_local: bool = False) -> ExpertSort:
    """Rows of the (token, slot) pairs of `ids` [N, k] (global expert ids) grouped by local expert
    `ids - start`; pairs outside [0, num_local) get the sentinel num_local and sort last
    (`all_local`: the rank holds every expert, nothing to mask)."""
    k = ids.shape[1]
    local = ids.reshape(-1)
    if not all_local:
        local = local - start
        local = torch.where((local >= 0) & (local < num_local), local, num_local)
    local, perm = torch.sort(local, stable=True)   # stable: within an expert, tokens in order
    offs = torch.searchsorted(local, _bounds(local.device, local.dtype, num_local), out_int32=True)
    return ExpertSort(perm, perm // k, offs, local)


@lru_cache(maxsize=16)
def _bounds(device: torch.device, dtype: torch.dtype, num_local: int) -> torch.Tensor:
    """1..E_local: searchsorted of e + 1 counts the rows of experts <= e. Made once (a decode step
    is launch-bound: every kernel saved counts), in the warm-up before any graph capture."""
    return torch.arange(1, num_local + 1, device=device, dtype=dtype)


def expert_ffn(x: torch.Tensor, s: ExpertSort, gate_up: torch.Tensor, down: torch.Tensor,
               silu_mul=None) -> torch.Tensor:
    """SwiGLU of every sorted row through its expert: [N*k, H] (rows of non-local pairs unset).
    `gate_up` [E_local, 2F, H] (gate rows first), `down` [E_local, H, F], as nn.Linear weights."""
    xs = x[s.token]
    gu = _grouped_mm(xs, gate_up.transpose(1, 2), s.offs)   # [N*k, 2F]
    g, u = gu.chunk(2, dim=-1)
    h = silu_mul(g, u) if silu_mul is not None else F.silu(g) * u
    return _grouped_mm(h.contiguous(), down.transpose(1, 2), s.offs)   # [N*k, H]


def combine(y: torch.Tensor, s: ExpertSort, weights: torch.Tensor, num_local: int,
            all_local: bool) -> torch.Tensor:
    """Each token's routing-weighted sum of its k rows of `y` (sorted order) -> [N, H] in y's dtype.
    The weights round to y's dtype (Mixtral's stay fp32 in transformers: a bf16-rounding apart); the
    k products add in fp32 then round once (transformers adds into the output dtype)."""
    n, k = weights.shape
    rows = torch.empty_like(y)
    rows[s.perm] = y   # back to (token, slot) order
    if not all_local:   # rows of other ranks' experts were never written: may hold NaN
        mask = torch.empty_like(s.local)
        mask[s.perm] = s.local
        rows = torch.where((mask < num_local)[:, None], rows, 0)
    # [n, 1, k] @ [n, k, H]: the weighted sum in one batched GEMM (fp32 accumulation inside)
    return torch.bmm(weights.to(y.dtype).view(n, 1, k), rows.view(n, k, -1)).view(n, -1)


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, start: int = 0, num_experts: int | None = None,
                    silu_mul=None) -> torch.Tensor:
    """The routed experts' output [N, H] for routing (`weights` [N, k], global `ids` [N, k]) over
    the rank's experts [start, start + E_local) of the stacked weights, of `num_experts` in all
    (None: the rank holds them all); no host sync."""
    num_local = gate_up.shape[0]
    all_local = start == 0 and num_experts in (None, num_local)
    s = sort_by_expert(ids, start, num_local, all_local)
    y = expert_ffn(x, s, gate_up, down, silu_mul)
    return combine(y, s, weights, num_local, all_local)

"""Routed experts for a few tokens (a decode step of a small batch) in two Triton kernels, CUDA only.

At batch 1 a decode step is bound by reading the weights of the k routed experts; the grouped path
(moe_grouped.py) spends about ten small kernels per layer on it (sort, searchsorted, gather, two
grouped GEMMs over mostly empty groups, silu, scatter, bmm), and their launches and tails cost more
than the bytes. Here each (token, slot) pair reads its expert's rows straight from the stacked
weights, by the expert id on the device (no sort, no host sync: CUDA-graph capturable):

- `_gate_up_kernel`: program (pair, block of F): gate and up rows of the pair's expert times the
  token's hidden state, then SwiGLU -> h [pairs, F].
- `_down_kernel`: program (pair, block of H): the expert's down rows times the pair's h -> y
  [pairs, H]; one batched GEMM then weights and sums each token's k rows (as `combine` does).

Roundings follow the grouped path: the GEMM outputs (gate, up, down) round to the model dtype,
SwiGLU rounds as `silu_mul` does, the routing weights round to the model dtype and the k weighted
products add in fp32 and round once (combine's bmm). Every pair reads its expert's weights itself,
so a token pair routed to the same expert reads them twice: the path is for few pairs
(`FUSED_MAX_PAIRS`). `TRITON_INTERPRET=1` runs it on CPU tensors (tests only).
"""
from __future__ import annotations

import torch

from ..knobs import env_value
from .triton_attn import HAVE_TRITON, available, p2

FUSED_MAX_PAIRS = 32   # tokens x top_k up to which the fused path runs (batch 4 of a top-8 model)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gate_up_kernel(x_ptr, ids_ptr, w_ptr, h_ptr, x_stride,
                        TOP_K: tl.constexpr, H: tl.constexpr, F: tl.constexpr,
                        BLOCK_F: tl.constexpr, BLOCK_H: tl.constexpr):
        pair = tl.program_id(0).to(tl.int64)
        f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        fm = f < F
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        x_row = x_ptr + (pair // TOP_K) * x_stride
        w_gate = w_ptr + expert * (2 * F * H) + f[:, None] * H
        w_up = w_gate + F * H
        acc_g = tl.zeros([BLOCK_F], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_F], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            hm = hs < H
            x = tl.load(x_row + hs, mask=hm, other=0.0).to(tl.float32)
            m = fm[:, None] & hm[None, :]
            acc_g += tl.sum(tl.load(w_gate + hs[None, :], mask=m, other=0.0).to(tl.float32) * x[None, :], axis=1)
            acc_u += tl.sum(tl.load(w_up + hs[None, :], mask=m, other=0.0).to(tl.float32) * x[None, :], axis=1)
        DT = h_ptr.dtype.element_ty
        g = acc_g.to(DT).to(tl.float32)
        u = acc_u.to(DT).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(DT).to(tl.float32)
        tl.store(h_ptr + pair * F + f, (s * u).to(DT), mask=fm)

    @triton.jit
    def _down_kernel(h_ptr, ids_ptr, w_ptr, y_ptr, H: tl.constexpr, F: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr):
        pair = tl.program_id(0).to(tl.int64)
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = hs < H
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        w_rows = w_ptr + expert * (H * F) + hs[:, None] * F
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            fs = f0 + tl.arange(0, BLOCK_F)
            fm = fs < F
            hv = tl.load(h_ptr + pair * F + fs, mask=fm, other=0.0).to(tl.float32)
            w = tl.load(w_rows + fs[None, :], mask=hm[:, None] & fm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * hv[None, :], axis=1)
        tl.store(y_ptr + pair * H + hs, acc.to(y_ptr.dtype.element_ty), mask=hm)

    @triton.jit
    def _route_kernel(logits_ptr, w_ptr, ids_ptr, stride, E: tl.constexpr, BLOCK_E: tl.constexpr,
                      TOP_K: tl.constexpr, BLOCK_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        v = tl.load(logits_ptr + row * stride + e, mask=e < E, other=float("-inf")).to(tl.float32)
        ks = tl.arange(0, BLOCK_K)
        top_v = tl.full([BLOCK_K], float("-inf"), tl.float32)
        top_i = tl.zeros([BLOCK_K], dtype=tl.int64)
        for j in tl.static_range(TOP_K):   # k rounds of max + argmax: descending, as torch.topk sorts
            m = tl.max(v, axis=0)
            i = tl.argmax(v, axis=0)
            top_v = tl.where(ks == j, m, top_v)
            top_i = tl.where(ks == j, i.to(tl.int64), top_i)
            v = tl.where(e == i, float("-inf"), v)
        p = tl.exp(top_v - tl.max(top_v, axis=0))   # (the slots past TOP_K hold -inf: 0)
        p = p / tl.sum(p, axis=0)
        km = ks < TOP_K
        tl.store(w_ptr + row * TOP_K + ks, p.to(w_ptr.dtype.element_ty), mask=km)
        tl.store(ids_ptr + row * TOP_K + ks, top_i, mask=km)


def fused_ok(x: torch.Tensor, top_k: int, all_local: bool) -> bool:
    """Whether `fused_experts` takes these tokens: CUDA (or the interpreter), every expert on this
    rank, at most FUSED_MAX_PAIRS (token, slot) pairs, and DISAGG_MOE_FUSED on."""
    return (all_local and available(x.device) and x.shape[0] * top_k <= FUSED_MAX_PAIRS
            and env_value("DISAGG_MOE_FUSED"))


def route_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.route_renormalized in one kernel (weights [N, k] in the logits' dtype, ids [N, k] int64,
    both in descending order): the top-k of each row's logits by k rounds of argmax, then a softmax
    over those k in fp32, rounded once. torch's top-k sorts (two kernels) and its softmax is a third:
    about 10 us a layer of a batch-1 decode step (an H100 profile of qwen3-30b-a3b)."""
    n, num_e = logits.shape
    if logits.stride(-1) != 1 or not 0 < top_k <= num_e:
        raise ValueError(f"route_topk: logits {tuple(logits.shape)} must have contiguous rows and "
                         f"top_k={top_k} must be in [1, {num_e}]")
    weights = torch.empty(n, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(n, top_k, dtype=torch.int64, device=logits.device)
    if n:
        _route_kernel[(n,)](logits, weights, ids, logits.stride(0), E=num_e, BLOCK_E=p2(num_e), TOP_K=top_k,
                            BLOCK_K=p2(top_k), num_warps=1 if num_e <= 256 else 4)
    return weights, ids


# Tiles: gate+up (BLOCK_F, BLOCK_H, warps), down (BLOCK_H, BLOCK_F, warps): the fastest of
# scripts/probe_moe.py's set at batch 1, 2 and 4 of qwen3-30b-a3b, timed in a CUDA graph on an H100
# (35, 57 and 100 us a layer against 38, 68 and 110 us for the first choice, (16, 512, 8, 16, 256, 4);
# docs/bench/gpu-h100-s13/moe_tiles_graph.json).
TILES = (8, 256, 4, 8, 256, 4)


def fused_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, tiles: tuple[int, ...] = TILES) -> torch.Tensor:
    """The routed experts' output [N, H] in x's dtype for routing `weights` [N, k] and expert `ids`
    [N, k] over the stacked `gate_up` [E, 2F, H] (gate rows first) and `down` [E, H, F]."""
    n, k = ids.shape
    _, two_f, hidden = gate_up.shape
    ffn = two_f // 2
    if x.stride(-1) != 1 or not gate_up.is_contiguous() or not down.is_contiguous():
        raise ValueError("fused_experts: x rows and the stacked weights must be contiguous")
    gu_f, gu_h, gu_warps, d_h, d_f, d_warps = tiles
    ids = ids.reshape(-1).contiguous()
    h = torch.empty(n * k, ffn, dtype=x.dtype, device=x.device)
    _gate_up_kernel[(n * k, triton.cdiv(ffn, gu_f))](
        x, ids, gate_up, h, x.stride(0), TOP_K=k, H=hidden, F=ffn, BLOCK_F=gu_f,
        BLOCK_H=min(gu_h, p2(hidden)), num_warps=gu_warps)
    y = torch.empty(n * k, hidden, dtype=x.dtype, device=x.device)
    _down_kernel[(n * k, triton.cdiv(hidden, d_h))](
        h, ids, down, y, H=hidden, F=ffn, BLOCK_H=d_h, BLOCK_F=min(d_f, p2(ffn)), num_warps=d_warps)
    # combine (moe_grouped.py): weights rounded to x's dtype, the k products added in fp32, one rounding
    return torch.bmm(weights.to(x.dtype).view(n, 1, k), y.view(n, k, hidden)).view(n, hidden)

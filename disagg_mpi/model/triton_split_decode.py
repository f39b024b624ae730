"""The fused decode kernel with each context split over several programs (flash-decoding).

`triton_kernels.rope_write_decode_attention` runs one program per (sequence, KV head). At small
batches that leaves most SMs idle (`decode_tiles.decode_splits` says when), so this launch runs
S programs per (sequence, KV head), each over a contiguous part of the cached context:

- every program ropes its query group (cheap, recomputed rather than shared); the first stores
  the new k, v at the token's slot, and no program reads that slot back;
- each program writes its partial online softmax (max, sum, unnormalised output, fp32) for the
  G real heads of its group; the last one also folds in the new token from registers;
- a second kernel, one program per (sequence, KV head), combines the S partials:
  out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s with M = max_s m_s.

S is fixed per batch size, so a CUDA graph captured for a batch holds for every context length
(splits past a short context stay empty: max -inf, sum 0). Equal to the unsplit kernel up to
float rounding (the sums add up in another order).
"""
from __future__ import annotations

import math

import torch

from .decode_tiles import split_tile
from .triton_attn import HAVE_TRITON, interpreting, p2, pool_strides

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_attn import attend_cached, fold_new_token, rope_new_token

    @triton.jit
    def _split_decode_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, pool_ptr, tab_ptr,
                             tab_stride_ptr, ctx_ptr, acc_ptr, ml_ptr, q_stride, k_stride, v_stride,
                             cs_stride, scale, layer_off, s_blk, s_kv, s_h,
                             NKV: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                             BS: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                             INTERP: tl.constexpr):
        seq = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        ctx = tl.load(ctx_ptr + seq).to(tl.int32)
        tstride = tl.load(tab_stride_ptr).to(tl.int64)
        d = tl.arange(0, D)
        g = tl.arange(0, G_P)
        q, k_new, v_new = rope_new_token(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, pool_ptr, seq,
                                             kvh, q_stride, k_stride, v_stride, cs_stride, layer_off, s_blk,
                                             s_kv, s_h, tl.where(sp == 0, D, 0), G, G_P, D, BS)
        n = tl.maximum(ctx - 1, 0)                  # cached tokens (the new one is in registers)
        per = tl.cdiv(tl.cdiv(n, S), BLOCK_N) * BLOCK_N
        lo = sp * per
        hi = tl.minimum(lo + per, n)
        m_i, l_i, acc = attend_cached(q, lo, hi, pool_ptr, tab_ptr, seq, tstride, scale, layer_off, s_blk,
                                          s_kv, s_h, kvh, d, G_P, D, BS, BLOCK_N, IEEE, INTERP)
        if sp == S - 1:
            m_i, l_i, acc = fold_new_token(q, k_new, v_new, m_i, l_i, acc, ctx > 0, scale)
        row = (seq * NKV + kvh) * S + sp            # this program's partial, G real heads of G_P
        gm = g < G
        tl.store(acc_ptr + (row * G + g)[:, None] * D + d[None, :], acc, mask=gm[:, None])
        tl.store(ml_ptr + (row * 2) * G + g, m_i, mask=gm)
        tl.store(ml_ptr + (row * 2 + 1) * G + g, l_i, mask=gm)

    @triton.jit
    def _split_combine_kernel(acc_ptr, ml_ptr, o_ptr, NQ: tl.constexpr, NKV: tl.constexpr, G: tl.constexpr,
                              G_P: tl.constexpr, D: tl.constexpr, S: tl.constexpr):
        seq = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        g = tl.arange(0, G_P)
        d = tl.arange(0, D)
        gm = g < G
        first = (seq * NKV + kvh) * S
        big = tl.full([G_P], float("-inf"), tl.float32)
        for i in tl.static_range(S):
            big = tl.maximum(big, tl.load(ml_ptr + ((first + i) * 2) * G + g, mask=gm, other=float("-inf")))
        big = tl.where(big == float("-inf"), 0.0, big)
        tot = tl.zeros([G_P], tl.float32)
        out = tl.zeros([G_P, D], tl.float32)
        for i in tl.static_range(S):
            m = tl.load(ml_ptr + ((first + i) * 2) * G + g, mask=gm, other=float("-inf"))
            w = tl.exp(m - big)                     # 0 for an empty split (m = -inf)
            tot += w * tl.load(ml_ptr + ((first + i) * 2 + 1) * G + g, mask=gm, other=0.0)
            a = tl.load(acc_ptr + ((first + i) * G + g)[:, None] * D + d[None, :], mask=gm[:, None], other=0.0)
            out += w[:, None] * a
        tot = tl.where(tot == 0.0, 1.0, tot)        # ctx == 0 (padding row): zeros, not NaN
        o = out / tot[:, None]
        tl.store(o_ptr + seq * (NQ * D) + (kvh * G + g)[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=gm[:, None])


def split_rope_write_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                      sin: torch.Tensor, pool: torch.Tensor, layer: int, slots: torch.Tensor,
                                      tables: torch.Tensor, table_stride: torch.Tensor, ctx: torch.Tensor,
                                      n_q: int, n_kv: int, d: int, splits: int,
                                      tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`triton_kernels.rope_write_decode_attention` over `splits` parts of each context, then a
    combine (same arguments, checked by the caller; `tile` overrides `split_tile`)."""
    b = q.shape[0]
    out = torch.empty(b, n_q, d, dtype=q.dtype, device=q.device)
    if not b:
        return out
    g = n_q // n_kv
    acc = torch.empty(b * n_kv * splits * g, d, dtype=torch.float32, device=q.device)
    ml = torch.empty(b * n_kv * splits * 2 * g, dtype=torch.float32, device=q.device)
    layer_off, s_blk, s_kv, s_h = pool_strides(pool, layer)
    block_n, warps, stages = tile or split_tile(d, pool.element_size())
    consts = {"G": g, "G_P": max(16, p2(g)), "D": d}
    _split_decode_kernel[(b, n_kv, splits)](q, k, v, cos, sin, slots, pool, tables, table_stride,
              ctx, acc, ml, q.stride(0), k.stride(0), v.stride(0), cos.stride(0), 1.0 / math.sqrt(d),
              layer_off, s_blk, s_kv, s_h, NKV=n_kv, BS=pool.shape[4], S=splits, BLOCK_N=block_n,
              IEEE=q.dtype == torch.float32, INTERP=interpreting(), num_warps=warps, num_stages=stages,
              **consts)
    _split_combine_kernel[(b, n_kv)](acc, ml, out, NQ=n_q, NKV=n_kv, S=splits, num_warps=4, **consts)
    return out

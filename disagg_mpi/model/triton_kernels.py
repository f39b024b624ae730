"""Triton kernels of the decode fast path (one new token per sequence), CUDA only.

Each kernel reads its indices from device tensors, so a decode step needs no
host sync and no per-sequence Python, and the whole forward can be captured
in a CUDA graph:

- `rope_write_kv`: RoPE on q and k, then k, v stored at their slots of the
  paged pool (slot < 0 is a no-op: padding rows of a graph batch).
- `paged_decode_attention`: each (sequence, KV head) program walks its block
  table in place (GQA: the head's query group shares the loads) with an online
  softmax; context length and table row stride are read on device.
- `rope_write_decode_attention`: the two above in one kernel (what the model's
  decode step uses): each (sequence, KV head) program ropes its query group and
  its head's new k, stores k, v at the token's slot, and attends over the first
  ctx - 1 cached tokens plus the new one taken from registers (it never reads
  back what it wrote: no read-after-write across programs or within one).
  Equal to the two kernels up to float rounding (the new token's softmax term
  is folded in last instead of inside its tile).
- `add_rmsnorm`: residual add + RMSNorm in one pass; `silu_mul`: SwiGLU; `qk_rmsnorm`: Qwen3's
  per-head q and k norms in one kernel.

Roundings mimic the torch eager path (products and sums rounded to the model
dtype where torch rounds), so bf16 results stay close to it. `TRITON_INTERPRET=1`
runs them on CPU tensors (tests only).
"""
from __future__ import annotations

import math

import torch

from .decode_tiles import decode_splits, decode_tile
from .triton_attn import HAVE_TRITON, available, interpreting, p2, pool_strides  # noqa: F401
from .triton_split_decode import split_rope_write_decode_attention

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_attn import attend_cached, fold_new_token, rope_new_token

    @triton.jit
    def _rmsnorm_kernel(x_ptr, d_ptr, w_ptr, res_ptr, y_ptr, x_stride, d_stride, eps,
                        H: tl.constexpr, BLOCK: tl.constexpr, HAS_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < H
        x = tl.load(x_ptr + row * x_stride + cols, mask=m, other=0.0)
        if HAS_D:
            d = tl.load(d_ptr + row * d_stride + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * H + cols, x, mask=m)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / H
        y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        y = (w.to(tl.float32) * y.to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + row * H + cols, y, mask=m)

    @triton.jit
    def _norm_head(src, w_ptr, dst, eps, D: tl.constexpr, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(src + cols, mask=m, other=0.0)
        xf = x.to(tl.float32)
        y = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        tl.store(dst + cols, (w.to(tl.float32) * y.to(tl.float32)).to(dst.dtype.element_ty), mask=m)

    @triton.jit
    def _qk_norm_kernel(q_ptr, k_ptr, wq_ptr, wk_ptr, qo_ptr, ko_ptr, q_stride, k_stride, eps,
                        NQ: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        if h < NQ:
            _norm_head(q_ptr + t * q_stride + h * D, wq_ptr, qo_ptr + (t * NQ + h) * D, eps, D, BLOCK)
        else:
            g = h - NQ
            _norm_head(k_ptr + t * k_stride + g * D, wk_ptr, ko_ptr + (t * NKV + g) * D, eps, D, BLOCK)

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, g_stride, u_stride, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < F
        g = tl.load(g_ptr + row * g_stride + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + cols, mask=m, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(o_ptr.dtype.element_ty)
        y = (s.to(tl.float32) * u).to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + row * F + cols, y, mask=m)

    @triton.jit
    def _rope_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, qo_ptr, ko_ptr, vo_ptr, pool_ptr,
                           q_stride, k_stride, v_stride, cs_stride, layer_off, s_blk, s_kv, s_h,
                           NQ: tl.constexpr, NKV: tl.constexpr, NQ_P: tl.constexpr,
                           NKV_P: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, STORE_K: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        DT = qo_ptr.dtype.element_ty
        d = tl.arange(0, D)
        HALF: tl.constexpr = D // 2
        rd = (d + HALF) % D
        sign = tl.where(d < HALF, -1.0, 1.0)
        c = tl.load(cos_ptr + row * cs_stride + d).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + row * cs_stride + d).to(tl.float32)[None, :]
        # q: q * cos + rotate_half(q) * sin, each product rounded like torch does
        hq = tl.arange(0, NQ_P)[:, None]
        mq = hq < NQ
        qa = tl.load(q_ptr + row * q_stride + hq * D + d[None, :], mask=mq, other=0.0).to(tl.float32)
        qb = tl.load(q_ptr + row * q_stride + hq * D + rd[None, :], mask=mq, other=0.0).to(tl.float32)
        qr = ((qa * c).to(DT).to(tl.float32) + (qb * sign[None, :] * s).to(DT).to(tl.float32)).to(DT)
        tl.store(qo_ptr + row * (NQ * D) + hq * D + d[None, :], qr, mask=mq)
        # k (roped) and v into the pool at this token's slot
        hk = tl.arange(0, NKV_P)[:, None]
        mk = hk < NKV
        ka = tl.load(k_ptr + row * k_stride + hk * D + d[None, :], mask=mk, other=0.0).to(tl.float32)
        kb = tl.load(k_ptr + row * k_stride + hk * D + rd[None, :], mask=mk, other=0.0).to(tl.float32)
        kr = ((ka * c).to(DT).to(tl.float32) + (kb * sign[None, :] * s).to(DT).to(tl.float32)).to(DT)
        v = tl.load(v_ptr + row * v_stride + hk * D + d[None, :], mask=mk, other=0.0)
        if STORE_K:   # roped k and a contiguous v for a prefill's attention, which reads them directly
            tl.store(ko_ptr + row * (NKV * D) + hk * D + d[None, :], kr, mask=mk)
            tl.store(vo_ptr + row * (NKV * D) + hk * D + d[None, :], v, mask=mk)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        ok = slot >= 0
        slot = tl.maximum(slot, 0)
        base = (slot // BS) * s_blk + layer_off + (slot % BS) * D
        wm = hk < tl.where(ok, NKV, 0)      # mk & ok (the interpreter rejects tensor & scalar masks)
        PT = pool_ptr.dtype.element_ty
        tl.store(pool_ptr + base + hk * s_h + d[None, :], kr.to(PT), mask=wm)
        tl.store(pool_ptr + base + s_kv + hk * s_h + d[None, :], v.to(PT), mask=wm)

    @triton.jit
    def _paged_decode_kernel(q_ptr, pool_ptr, tab_ptr, tab_stride_ptr, ctx_ptr, o_ptr, scale,
                             layer_off, s_blk, s_kv, s_h,
                             NQ: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                             BS: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                             INTERP: tl.constexpr):
        seq = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        ctx = tl.load(ctx_ptr + seq).to(tl.int32)
        tstride = tl.load(tab_stride_ptr).to(tl.int64)
        g = tl.arange(0, G_P)
        d = tl.arange(0, D)
        gm = (g < G)[:, None]
        qoff = seq * (NQ * D) + (kvh * G + g)[:, None] * D + d[None, :]
        q = tl.load(q_ptr + qoff, mask=gm, other=0.0)
        _m_i, l_i, acc = attend_cached(q, 0, ctx, pool_ptr, tab_ptr, seq, tstride, scale, layer_off, s_blk, s_kv,
                                       s_h, kvh, d, G_P, D, BS, BLOCK_N, IEEE, INTERP)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)     # ctx == 0 (padding row): zeros, not NaN
        out = acc / l_i[:, None]
        tl.store(o_ptr + qoff, out.to(o_ptr.dtype.element_ty), mask=gm)

    @triton.jit
    def _rope_decode_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, pool_ptr, tab_ptr,
                            tab_stride_ptr, ctx_ptr, o_ptr, q_stride, k_stride, v_stride, cs_stride,
                            scale, layer_off, s_blk, s_kv, s_h,
                            NQ: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                            BS: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                            INTERP: tl.constexpr):
        # _rope_write_kernel + _paged_decode_kernel for one (sequence, KV head), same roundings.
        seq = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1)
        ctx = tl.load(ctx_ptr + seq).to(tl.int32)
        tstride = tl.load(tab_stride_ptr).to(tl.int64)
        d = tl.arange(0, D)
        g = tl.arange(0, G_P)
        q, k_new, v_new = rope_new_token(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, pool_ptr, seq, kvh,
                                          q_stride, k_stride, v_stride, cs_stride, layer_off, s_blk, s_kv,
                                          s_h, D, G, G_P, D, BS)
        # attention over the first ctx - 1 tokens from the pool (the same BLOCK_N tiles as
        # _paged_decode_kernel), then the new token (position ctx - 1) from registers: the
        # program never reads what it (or another program) stores in this step.
        m_i, l_i, acc = attend_cached(q, 0, ctx - 1, pool_ptr, tab_ptr, seq, tstride, scale, layer_off, s_blk,
                                       s_kv, s_h, kvh, d, G_P, D, BS, BLOCK_N, IEEE, INTERP)
        m_i, l_i, acc = fold_new_token(q, k_new, v_new, m_i, l_i, acc, ctx > 0, scale)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)     # ctx == 0 (padding row): zeros, not NaN
        out = acc / l_i[:, None]
        qh = (kvh * G + g)[:, None] * D
        tl.store(o_ptr + seq * (NQ * D) + qh + d[None, :], out.to(o_ptr.dtype.element_ty), mask=(g < G)[:, None])


def _warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rmsnorm(x + delta) * weight) for x, delta [N, H]; delta None: no add."""
    n, h = x.shape
    y = torch.empty_like(x)
    res = torch.empty_like(x) if delta is not None else x
    if n:
        block = p2(h)
        _rmsnorm_kernel[(n,)](x, delta if delta is not None else x, weight, res, y,
                              x.stride(0), (delta if delta is not None else x).stride(0), eps,
                              H=h, BLOCK=block, HAS_D=delta is not None, num_warps=_warps(block))
    return res, y


def qk_rmsnorm(q: torch.Tensor, k: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float,
               d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorms of q [N, n_q * d] and k [N, n_kv * d] (row-strided views, e.g. of
    one qkv GEMM's output) in one kernel: contiguous [N, n_q * d] and [N, n_kv * d], each head's row
    as add_rmsnorm(row, None, w, eps) computes it (two launches and two strided copies before)."""
    n = q.shape[0]
    n_q, n_kv = q.shape[1] // d, k.shape[1] // d
    if q.stride(-1) != 1 or k.stride(-1) != 1 or q.shape[1] != n_q * d or k.shape[1] != n_kv * d:
        raise ValueError(f"qk_rmsnorm: q {tuple(q.shape)} and k {tuple(k.shape)} must be rows of whole "
                         f"heads of {d} with contiguous columns")
    qo = torch.empty(n, n_q * d, dtype=q.dtype, device=q.device)
    ko = torch.empty(n, n_kv * d, dtype=k.dtype, device=k.device)
    if n:
        _qk_norm_kernel[(n, n_q + n_kv)](q, k, wq, wk, qo, ko, q.stride(0), k.stride(0), eps, NQ=n_q, NKV=n_kv,
                                         D=d, BLOCK=p2(d), num_warps=_warps(p2(d)))
    return qo, ko


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for row-strided views g, u [N, F] (e.g. halves of one gate_up GEMM)."""
    n, f = g.shape
    out = torch.empty(n, f, dtype=g.dtype, device=g.device)
    if n:
        block = min(1024, p2(f))
        _silu_mul_kernel[(n, triton.cdiv(f, block))](g, u, out, g.stride(0), u.stride(0), f,
                                                     BLOCK=block, num_warps=4)
    return out


def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, pool: torch.Tensor, layer: int, slots: torch.Tensor,
                  n_q: int, n_kv: int, d: int) -> torch.Tensor:
    """RoPE q, k [N, heads*d] (row-strided views), store k, v at `slots` (< 0: skipped).

    cos, sin: [N, 1, d] (or [N, d]) in the model dtype. Returns roped q [N, n_q, d].
    """
    return _rope_write(q, k, v, cos, sin, pool, layer, slots, n_q, n_kv, d, store_kv=False)[0]


def rope_write_kv_all(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, pool: torch.Tensor, layer: int, slots: torch.Tensor,
                      n_q: int, n_kv: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rope_write_kv that also returns the roped k and v [N, n_kv, d], contiguous: a prefill or mixed
    step's RoPE and KV write in one kernel (torch took ten kernels for the RoPE and two index_puts a
    layer); v is stored beside its pool copy so the attention reads k and v alike, not the qkv
    GEMM's strided view."""
    return _rope_write(q, k, v, cos, sin, pool, layer, slots, n_q, n_kv, d, store_kv=True)


def _rope_write(q, k, v, cos, sin, pool, layer, slots, n_q, n_kv, d, store_kv):
    n = q.shape[0]
    qo = torch.empty(n, n_q, d, dtype=q.dtype, device=q.device)
    ko = torch.empty(n, n_kv, d, dtype=k.dtype, device=k.device) if store_kv else qo
    vo = torch.empty(n, n_kv, d, dtype=v.dtype, device=v.device) if store_kv else qo
    if n:
        layer_off, s_blk, s_kv, s_h = pool_strides(pool, layer)
        _rope_write_kernel[(n,)](q, k, v, cos, sin, slots, qo, ko, vo, pool,
                                 q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
                                 layer_off, s_blk, s_kv, s_h,
                                 NQ=n_q, NKV=n_kv, NQ_P=p2(n_q), NKV_P=p2(n_kv), D=d,
                                 BS=pool.shape[4], STORE_K=store_kv, num_warps=4)
    return qo, ko, vo


def paged_decode_attention(q: torch.Tensor, pool: torch.Tensor, layer: int, tables: torch.Tensor,
                           table_stride: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Attention of one query token per sequence, q [B, Hq, D], over its paged cache.

    tables: flat int64, row i at tables[i * table_stride[0]:]; ctx [B] tokens in the cache
    (the new one included; 0 = padding row, output zeros). Returns [B, Hq, D].
    """
    b, n_q, d = q.shape
    n_kv = pool.shape[3]
    out = torch.empty_like(q)
    if b:
        layer_off, s_blk, s_kv, s_h = pool_strides(pool, layer)
        g = n_q // n_kv
        _paged_decode_kernel[(b, n_kv)](q, pool, tables, table_stride, ctx, out, 1.0 / math.sqrt(d),
                                        layer_off, s_blk, s_kv, s_h,
                                        NQ=n_q, G=g, G_P=max(16, p2(g)), D=d, BS=pool.shape[4],
                                        BLOCK_N=64, IEEE=q.dtype == torch.float32,
                                        INTERP=interpreting(), num_warps=4)
    return out


def rope_write_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, pool: torch.Tensor, layer: int, slots: torch.Tensor,
                                tables: torch.Tensor, table_stride: torch.Tensor, ctx: torch.Tensor,
                                n_q: int, n_kv: int, d: int,
                                tile: tuple[int, int, int] | None = None, splits: int | None = None) -> torch.Tensor:
    """`rope_write_kv` then `paged_decode_attention` in one kernel (one token per sequence).

    q, k, v [B, heads*d] (row-strided views, e.g. of one qkv GEMM); cos, sin [B, 1, d] or
    [B, d]; slots [B] (< 0: padding row, nothing stored); tables, table_stride, ctx as in
    `paged_decode_attention` (ctx counts the new token, which must sit at position ctx - 1,
    i.e. at `slots`). The new k, v are stored in the pool and used from registers, never
    read back. Returns the attention output [B, n_q, d] in q's dtype. `tile` (tokens per
    tile, warps, pipeline stages) overrides `decode_tile` (scripts/probe_limits.py sweeps it).
    `splits`: parts each context is split over (flash-decoding, `triton_split_decode`); None:
    `decode_splits` picks by batch size (1 whenever `tile` is given), 1: one program per head.
    """
    b = q.shape[0]
    if b:
        if n_kv != pool.shape[3] or n_q % n_kv:
            raise ValueError(f"{n_q} q heads / {n_kv} kv heads do not fit a pool of {pool.shape[3]} kv heads")
        if any(t.stride(-1) != 1 for t in (q, k, v, cos, sin)) or sin.stride(0) != cos.stride(0):
            raise ValueError("q, k, v, cos, sin must be contiguous in their last dim (cos, sin alike)")
        if splits is None:
            splits = 1 if tile is not None else decode_splits(b, n_kv, q.device)
        if splits > 1:
            return split_rope_write_decode_attention(q, k, v, cos, sin, pool, layer, slots, tables, table_stride,
                                                     ctx, n_q, n_kv, d, splits)
    out = torch.empty(b, n_q, d, dtype=q.dtype, device=q.device)
    if b:
        layer_off, s_blk, s_kv, s_h = pool_strides(pool, layer)
        g = n_q // n_kv
        block_n, warps, stages = tile or decode_tile(b, n_kv, d, q.device, pool.element_size())
        _rope_decode_kernel[(b, n_kv)](q, k, v, cos, sin, slots, pool, tables, table_stride, ctx, out,
                                       q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
                                       1.0 / math.sqrt(d), layer_off, s_blk, s_kv, s_h,
                                       NQ=n_q, G=g, G_P=max(16, p2(g)), D=d, BS=pool.shape[4],
                                       BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
                                       INTERP=interpreting(), num_warps=warps, num_stages=stages)
    return out

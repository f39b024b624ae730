"""Parts shared by the Triton decode kernels (`triton_kernels`, `triton_split_decode`): the
import guard, the paged pool's strides, and the jit helpers of paged decode attention (a tile of
the online softmax, a walk over a range of cached tokens, the new token's RoPE and KV store and
its softmax term).
"""
from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    triton = None
    tl = None
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | str) -> bool:
    """Kernels usable for tensors on `device` (CUDA, or CPU under the Triton interpreter)."""
    if not HAVE_TRITON:
        return False
    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and interpreting())


def p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pool_strides(pool: torch.Tensor, layer: int) -> tuple[int, int, int, int]:
    if not pool.is_contiguous():
        raise ValueError("the KV pool must be contiguous")
    s = pool.stride()
    return layer * s[1], s[0], s[2], s[3]


if HAVE_TRITON:

    @triton.jit
    def attn_block(start, q, m_i, l_i, acc, pool_ptr, tab_ptr, seq, tstride, ctx, scale, layer_off,
                    s_blk, s_kv, s_h, kvh, d, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                    IEEE: tl.constexpr, INTERP: tl.constexpr):
        t = start + tl.arange(0, BLOCK_N)
        tm = t < ctx
        blk = tl.load(tab_ptr + seq * tstride + t // BS, mask=tm, other=0).to(tl.int64)
        base = blk * s_blk + layer_off + kvh * s_h + (t % BS) * D
        k = tl.load(pool_ptr + base[:, None] + d[None, :], mask=tm[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        elif INTERP:  # the interpreter's dot multiplies bf16 bit patterns: widen (exact products)
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(tm[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(pool_ptr + base[:, None] + s_kv + d[None, :], mask=tm[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        elif INTERP:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        return m_new, l_i, acc

    @triton.jit
    def attend_cached(q, lo, hi, pool_ptr, tab_ptr, seq, tstride, scale, layer_off, s_blk, s_kv, s_h, kvh, d,
                       G_P: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                       IEEE: tl.constexpr, INTERP: tl.constexpr):
        """Online softmax of a query group over cached tokens [lo, hi): (running max, sum, acc)."""
        m_i = tl.full([G_P], float("-inf"), tl.float32)
        l_i = tl.zeros([G_P], tl.float32)
        acc = tl.zeros([G_P, D], tl.float32)
        if INTERP:  # the interpreter cannot take a loaded bound in range()
            start = lo
            while start < hi:
                m_i, l_i, acc = attn_block(start, q, m_i, l_i, acc, pool_ptr, tab_ptr, seq, tstride, hi,
                                            scale, layer_off, s_blk, s_kv, s_h, kvh, d, D, BS, BLOCK_N, IEEE, INTERP)
                start += BLOCK_N
        else:
            for start in range(lo, hi, BLOCK_N):
                m_i, l_i, acc = attn_block(start, q, m_i, l_i, acc, pool_ptr, tab_ptr, seq, tstride, hi,
                                            scale, layer_off, s_blk, s_kv, s_h, kvh, d, D, BS, BLOCK_N, IEEE, INTERP)
        return m_i, l_i, acc

    @triton.jit
    def rope_new_token(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, pool_ptr, seq, kvh, q_stride,
                        k_stride, v_stride, cs_stride, layer_off, s_blk, s_kv, s_h, wlim,
                        G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
        """One (sequence, KV head)'s roped query group [G_P, D] (model dtype), its roped new k and
        its v [D] (pool dtype); k, v are stored at the token's slot unless the slot is < 0
        (padding) or wlim is 0 (another program of a split launch stores them)."""
        DT = q_ptr.dtype.element_ty
        PT = pool_ptr.dtype.element_ty
        d = tl.arange(0, D)
        HALF: tl.constexpr = D // 2
        rd = (d + HALF) % D
        sign = tl.where(d < HALF, -1.0, 1.0)
        c = tl.load(cos_ptr + seq * cs_stride + d).to(tl.float32)
        s = tl.load(sin_ptr + seq * cs_stride + d).to(tl.float32)
        g = tl.arange(0, G_P)
        gm = (g < G)[:, None]
        qh = (kvh * G + g)[:, None] * D
        qa = tl.load(q_ptr + seq * q_stride + qh + d[None, :], mask=gm, other=0.0).to(tl.float32)
        qb = tl.load(q_ptr + seq * q_stride + qh + rd[None, :], mask=gm, other=0.0).to(tl.float32)
        q = ((qa * c[None, :]).to(DT).to(tl.float32)
             + (qb * sign[None, :] * s[None, :]).to(DT).to(tl.float32)).to(DT)
        ka = tl.load(k_ptr + seq * k_stride + kvh * D + d).to(tl.float32)
        kb = tl.load(k_ptr + seq * k_stride + kvh * D + rd).to(tl.float32)
        k_new = ((ka * c).to(DT).to(tl.float32) + (kb * sign * s).to(DT).to(tl.float32)).to(DT).to(PT)
        v_new = tl.load(v_ptr + seq * v_stride + kvh * D + d).to(PT)
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        ok = slot >= 0
        slot = tl.maximum(slot, 0)
        base = (slot // BS) * s_blk + layer_off + kvh * s_h + (slot % BS) * D
        wm = d < tl.where(ok, wlim, 0)      # all of d, or none (padding row, or not this program)
        tl.store(pool_ptr + base + d, k_new, mask=wm)
        tl.store(pool_ptr + base + s_kv + d, v_new, mask=wm)
        return q, k_new, v_new

    @triton.jit
    def fold_new_token(q, k_new, v_new, m_i, l_i, acc, valid, scale):
        """One more online-softmax step for the new token (none where not valid: padding row)."""
        s_n = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        s_n = tl.where(valid, s_n, float("-inf"))
        m_new = tl.maximum(m_i, s_n)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s_n - m_new)
        l_i = l_i * alpha + p
        # p rounded to the cache dtype before the product, as in attn_block's p @ v
        acc = acc * alpha[:, None] + p.to(v_new.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
        return m_new, l_i, acc

"""Paged causal attention for a step's prompt rows in one Triton kernel (CUDA; opt-in).

A prefill or mixed step's prompt pieces (fresh prompts, chunk continuations) are attended by
torch's SDPA one group or sequence at a time (attention.py: `PrefillPlan`): a gather of each
continuation's cache, a mask, an SDPA call and a scatter per piece and layer, and cuDNN plans
every new (queries, keys) shape on its first use (0.07-1 s on an H100). Here one launch a layer
covers them all, reading the keys and values in place from the paged pool (this step's tokens
are already written there: `rope_write_kv_all`):

- program (tile, KV head): BLOCK_M query tokens of one sequence times the head's G query heads,
  flattened to BLOCK_M * G rows; an online softmax over the sequence's pool blocks up to the
  tile's last position, a block (BS tokens) at a time, as FlashAttention does;
- query j of a piece of n new tokens of a sequence with ctx tokens sits at position ctx - n + j
  and sees keys 0 .. ctx - n + j.

The tiles are made once a step on the host (`tiles`) and serve every layer. Decodes keep the
paged decode kernel (triton_kernels.py). `DISAGG_PREFILL_TRITON_ATTN=1` turns it on; it has not
been timed on a GPU yet. `TRITON_INTERPRET=1` runs it on CPU tensors (tests only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..knobs import env_value
from .triton_attn import HAVE_TRITON, available, interpreting, p2, pool_strides

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, INTERP: tl.constexpr):
        if IEEE:     # fp32: no TF32 rounding of the inputs
            return tl.dot(a, b, input_precision="ieee")
        elif INTERP:  # the interpreter's dot multiplies bf16 bit patterns: widen (exact products)
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            return tl.dot(a, b)

    @triton.jit
    def _key_block(kb, q, m_i, l_i, acc, pool_ptr, tab_ptr, seq, tab_stride, pos, valid, scale, layer_off,
                   s_blk, s_kv, s_h, kvh, d, D: tl.constexpr, BS: tl.constexpr, IEEE: tl.constexpr,
                   INTERP: tl.constexpr):
        """One pool block (BS keys) of the online softmax."""
        j = tl.arange(0, BS)
        blk = tl.load(tab_ptr + seq * tab_stride + kb).to(tl.int64)
        base = blk * s_blk + layer_off + kvh * s_h
        k = tl.load(pool_ptr + base + j[:, None] * D + d[None, :]).to(q.dtype)
        v = tl.load(pool_ptr + base + s_kv + j[:, None] * D + d[None, :]).to(q.dtype)
        s = _dot(q, tl.trans(k), IEEE, INTERP) * scale
        seen = ((kb * BS + j)[None, :] <= pos[:, None]) & valid[:, None]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # (a row that saw nothing yet)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v, IEEE, INTERP)
        return m_new, l_i, acc

    @triton.jit
    def _prefill_attn_kernel(q_ptr, pool_ptr, o_ptr, tab_ptr, tile_seq_ptr, tile_tok_ptr, q0_ptr, n_ptr,
                             ctx_ptr, tab_stride, scale, layer_off, s_blk, s_kv, s_h,
                             NQ: tl.constexpr, G: tl.constexpr, G_P: tl.constexpr, D: tl.constexpr,
                             BS: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
                             INTERP: tl.constexpr):
        t = tl.program_id(0)
        kvh = tl.program_id(1)
        seq = tl.load(tile_seq_ptr + t).to(tl.int64)
        first = tl.load(tile_tok_ptr + t)           # the tile's first new token of its sequence
        q0 = tl.load(q0_ptr + seq)
        n = tl.load(n_ptr + seq)
        ctx = tl.load(ctx_ptr + seq)
        m = tl.arange(0, BLOCK_M * G_P)              # row m: token first + m // G_P, head m % G_P
        tok = first + m // G_P
        g = m % G_P
        valid = (tok < n) & (g < G)
        pos = ctx - n + tok                          # the query's position
        d = tl.arange(0, D)
        qrow = ((q0 + tok).to(tl.int64) * NQ + kvh * G + g) * D
        q = tl.load(q_ptr + qrow[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        m_i = tl.full([BLOCK_M * G_P], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M * G_P], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M * G_P, D], dtype=tl.float32)
        last = ctx - n + tl.minimum(first + BLOCK_M, n)   # keys below it are seen by some row
        if INTERP:  # the interpreter cannot take a loaded bound in range()
            kb = 0
            while kb * BS < last:
                m_i, l_i, acc = _key_block(kb, q, m_i, l_i, acc, pool_ptr, tab_ptr, seq, tab_stride, pos, valid,
                                           scale, layer_off, s_blk, s_kv, s_h, kvh, d, D, BS, IEEE, INTERP)
                kb += 1
        else:
            for kb in range(0, tl.cdiv(last, BS)):
                m_i, l_i, acc = _key_block(kb, q, m_i, l_i, acc, pool_ptr, tab_ptr, seq, tab_stride, pos, valid,
                                           scale, layer_off, s_blk, s_kv, s_h, kvh, d, D, BS, IEEE, INTERP)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + qrow[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=valid[:, None])


def enabled() -> bool:
    return env_value("DISAGG_PREFILL_TRITON_ATTN")


def usable(device: torch.device, head_dim: int, block_size: int, window: int | None) -> bool:
    """The kernel's limits: CUDA (or the interpreter), full attention, a power-of-two head_dim and
    block size of at least 16 (tl.dot's smallest tile)."""
    return (available(device) and window is None and head_dim >= 16 and p2(head_dim) == head_dim
            and block_size >= 16 and p2(block_size) == block_size)


@dataclass
class PrefillTiles:
    """A step's prompt pieces as kernel tiles, on the device: made once, used by every layer."""
    tile_seq: torch.Tensor    # [T] the sequence (index into the step) of each tile
    tile_tok: torch.Tensor    # [T] the tile's first new token within its piece
    q0: torch.Tensor          # [B] each sequence's first row of the step
    n: torch.Tensor           # [B] its new tokens
    ctx: torch.Tensor         # [B] its context length (cached + new)
    block_m: int


def block_m(group: int) -> int:
    """Query tokens a tile holds: 64 rows (tokens x the group's heads, padded to a power of two)."""
    return max(1, 64 // p2(group))


def tiles(seqs: list[int], qsl: list[int], lens: list[int], group: int, device: torch.device) -> PrefillTiles:
    """The tiles of sequences `seqs` of a step (query_start_loc `qsl`, context lengths `lens`)."""
    bm = block_m(group)
    tile_seq, tile_tok = [], []
    for i in seqs:
        for first in range(0, qsl[i + 1] - qsl[i], bm):
            tile_seq.append(i)
            tile_tok.append(first)
    counts = [qsl[i + 1] - qsl[i] for i in range(len(lens))]

    def up(values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.int32)
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

    return PrefillTiles(up(tile_seq), up(tile_tok), up(qsl[:-1]), up(counts), up(lens), bm)


def prefill_attention(q: torch.Tensor, pool: torch.Tensor, layer: int, tables: torch.Tensor,
                      t: PrefillTiles, out: torch.Tensor) -> None:
    """Write into `out` [N, Hq, D] the causal attention of the tiles' query rows of q [N, Hq, D]
    over their sequences' cached keys and values in `pool` (block table rows `tables` [B, W])."""
    n_tiles = t.tile_seq.shape[0]
    if not n_tiles:
        return
    _, _, _, n_kv, bs, d = pool.shape
    n_q = q.shape[1]
    if not (q.is_contiguous() and out.is_contiguous() and tables.stride(1) == 1):
        raise ValueError("prefill_attention: q, out and the block tables' rows must be contiguous")
    layer_off, s_blk, s_kv, s_h = pool_strides(pool, layer)
    group = n_q // n_kv
    _prefill_attn_kernel[(n_tiles, n_kv)](
        q, pool, out, tables, t.tile_seq, t.tile_tok, t.q0, t.n, t.ctx, tables.stride(0), d ** -0.5,
        layer_off, s_blk, s_kv, s_h, NQ=n_q, G=group, G_P=p2(group), D=d, BS=bs, BLOCK_M=t.block_m,
        IEEE=q.dtype == torch.float32, INTERP=interpreting(), num_warps=4)

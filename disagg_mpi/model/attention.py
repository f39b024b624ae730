"""Paged KV cache writes and attention over a flat batch of tokens.

Pool layout of one rank: [num_blocks, num_local_layers, 2, kv_heads, block_size, head_dim].
A token's slot is block_id * block_size + offset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from disagg_mpi.model.context import AttentionMetadata


def write_kv(pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k, v [N, kv_heads, head_dim] at their slots; slots < 0 (padding) are skipped."""
    bs = pool.shape[4]
    slots = slot_mapping.to(pool.device)
    if bool((slots < 0).any()):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    blk, off = slots // bs, slots % bs
    # Advanced indices split by a slice put the token dim first: [N, kv_heads, head_dim].
    pool[blk, layer, 0, :, off] = k.to(pool.dtype)
    pool[blk, layer, 1, :, off] = v.to(pool.dtype)


def _gather_seq(pool: torch.Tensor, layer: int, blocks: torch.Tensor, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [kv_heads, ctx, head_dim] of one sequence from its block table row."""
    kv = pool[blocks, layer]                       # [nb, 2, H, bs, D]
    nb, _, h, bs, d = kv.shape
    kv = kv.permute(1, 2, 0, 3, 4).reshape(2, h, nb * bs, d)[:, :, :ctx]
    return kv[0], kv[1]


def paged_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    pool: torch.Tensor, layer: int, meta: AttentionMetadata) -> torch.Tensor:
    """Causal attention of the step's queries q [N, Hq, D] over each sequence's cache.

    Must run after write_kv for this layer. Returns [N, Hq, D].
    """
    if meta.is_decode_only and meta.num_seqs > 1:
        return _decode_batched(q, pool, layer, meta)
    out = torch.empty_like(q)
    bs = meta.block_size
    qsl = meta.query_start_loc
    tables = meta.block_tables
    for i, ctx in enumerate(meta.context_lens):
        s, e = qsl[i], qsl[i + 1]
        n = e - s
        if n == 0:
            continue
        if n == ctx:
            # Fresh prefill: the cache holds exactly the tokens just computed.
            k, v = k_new[s:e].transpose(0, 1), v_new[s:e].transpose(0, 1)
        else:
            nb = (ctx + bs - 1) // bs
            blocks = tables[i, :nb].to(pool.device)
            k, v = _gather_seq(pool, layer, blocks, ctx)
            k, v = k.to(q.dtype), v.to(q.dtype)
        qi = q[s:e].transpose(0, 1).unsqueeze(0)   # [1, Hq, n, D]
        if n == ctx:
            o = F.scaled_dot_product_attention(qi, k.unsqueeze(0), v.unsqueeze(0),
                                               is_causal=True, enable_gqa=True)
        elif n == 1:
            o = F.scaled_dot_product_attention(qi, k.unsqueeze(0), v.unsqueeze(0), enable_gqa=True)
        else:
            # New query j sits at position ctx - n + j and sees keys 0..ctx - n + j
            # (SDPA's is_causal aligns top-left, which is wrong when n < ctx).
            qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(qi, k.unsqueeze(0), v.unsqueeze(0),
                                               attn_mask=mask, enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    return out


def _decode_batched(q: torch.Tensor, pool: torch.Tensor, layer: int,
                    meta: AttentionMetadata) -> torch.Tensor:
    """One new token per sequence: gather all caches into a padded [B, H, T, D] at once."""
    bs = meta.block_size
    b = meta.num_seqs
    ctx = torch.tensor(meta.context_lens, device=pool.device)
    nb = (max(meta.context_lens) + bs - 1) // bs
    tables = meta.block_tables[:, :nb].to(pool.device).clamp(min=0)  # -1 pads read block 0, masked
    kv = pool[tables, layer]                                          # [B, nb, 2, H, bs, D]
    h, d = kv.shape[3], kv.shape[5]
    kv = kv.permute(2, 0, 3, 1, 4, 5).reshape(2, b, h, nb * bs, d).to(q.dtype)
    mask = (torch.arange(nb * bs, device=pool.device)[None, :] < ctx[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kv[0], kv[1], attn_mask=mask, enable_gqa=True)
    return o[:, :, 0]

"""Paged KV cache writes and attention over a flat batch of tokens.

Pool layout of one rank: [num_blocks, num_local_layers, 2, kv_heads, block_size, head_dim].
A token's slot is block_id * block_size + offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from disagg_mpi.model.context import AttentionMetadata


@dataclass
class DecodeMetadata(AttentionMetadata):
    """A decode-only step (one new token per sequence) whose indices live on the device.

    Used on CUDA with the Triton kernels (`model/triton_attention.py`), eagerly or
    inside a captured CUDA graph. `slot_mapping` [B] may hold -1 (padding row: no
    write); `block_tables` is flat: row i starts at i * table_stride[0];
    `context_lens_t` [B] (0 = padding row). `context_lens` / `query_start_loc`
    only carry the batch size here; their values are not read by the fast path.
    """
    context_lens_t: torch.Tensor | None = None
    table_stride: torch.Tensor | None = None


@dataclass
class StepIndex:
    """Device-side indices of one step, built once per forward rather than once per layer
    (each host->device copy or `.any()` per layer would stall a GPU)."""
    meta: AttentionMetadata
    blk: torch.Tensor            # [N'] block of each written token
    off: torch.Tensor            # [N'] offset inside the block
    keep: torch.Tensor | None    # [N] bool, None when no slot is padding (-1)
    tables: torch.Tensor         # [B, max_blocks] on device
    ctx: torch.Tensor | None     # [B] context lengths on device (decode path only)
    slots: torch.Tensor | None = None        # [N] raw slots on device (fast path: < 0 = skip)
    table_stride: torch.Tensor | None = None  # [1] row stride of the flat `tables` (fast path)
    fast: bool = False           # decode-only step for the Triton kernels (see DecodeMetadata)

    @classmethod
    def build(cls, meta: AttentionMetadata, device: torch.device) -> StepIndex:
        if isinstance(meta, DecodeMetadata):
            # Everything already on device: no host work, safe inside CUDA graph capture.
            return cls(meta, None, None, None, meta.block_tables, meta.context_lens_t,
                       slots=meta.slot_mapping, table_stride=meta.table_stride, fast=True)
        slots = meta.slot_mapping
        keep = None
        # Check for padding on the host copy when there is one (free), else on device once.
        if bool((slots < 0).any()):
            keep = (slots >= 0).to(device)
            slots = slots[slots >= 0]
        slots = slots.to(device, non_blocking=True)
        bs = meta.block_size
        decode = meta.is_decode_only and meta.num_seqs > 1
        ctx = torch.tensor(meta.context_lens, device=device) if decode else None
        return cls(meta, slots // bs, slots % bs, keep,
                   meta.block_tables.to(device, non_blocking=True), ctx)


def write_kv(pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, idx: StepIndex) -> None:
    """Store k, v [N, kv_heads, head_dim] at their slots; padding slots (-1) are skipped."""
    if idx.keep is not None:
        k, v = k[idx.keep], v[idx.keep]
    # Advanced indices split by a slice put the token dim first: [N, kv_heads, head_dim].
    pool[idx.blk, layer, 0, :, idx.off] = k.to(pool.dtype)
    pool[idx.blk, layer, 1, :, idx.off] = v.to(pool.dtype)


def _gather_seq(pool: torch.Tensor, layer: int, blocks: torch.Tensor, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [kv_heads, ctx, head_dim] of one sequence from its block table row."""
    kv = pool[blocks, layer]                       # [nb, 2, H, bs, D]
    nb, _, h, bs, d = kv.shape
    kv = kv.permute(1, 2, 0, 3, 4).reshape(2, h, nb * bs, d)[:, :, :ctx]
    return kv[0], kv[1]


def paged_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    pool: torch.Tensor, layer: int, idx: StepIndex) -> torch.Tensor:
    """Causal attention of the step's queries q [N, Hq, D] over each sequence's cache.

    Must run after write_kv for this layer. Returns [N, Hq, D].
    """
    meta = idx.meta
    if idx.ctx is not None:
        return _decode_batched(q, pool, layer, idx)
    out = torch.empty_like(q)
    bs = meta.block_size
    qsl = meta.query_start_loc
    for i, ctx in enumerate(meta.context_lens):
        s, e = qsl[i], qsl[i + 1]
        n = e - s
        if n == 0:
            continue
        if n == ctx:
            # Fresh prefill: the cache holds exactly the tokens just computed.
            k, v = k_new[s:e].transpose(0, 1), v_new[s:e].transpose(0, 1)
        else:
            k, v = _gather_seq(pool, layer, idx.tables[i, :(ctx + bs - 1) // bs], ctx)
            k, v = k.to(q.dtype), v.to(q.dtype)
        qi, k, v = q[s:e].transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # [1, H, T, D]
        if n == ctx:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, enable_gqa=True)
        elif n == 1:
            o = F.scaled_dot_product_attention(qi, k, v, enable_gqa=True)
        else:
            # New query j sits at position ctx - n + j and sees keys 0..ctx - n + j
            # (SDPA's is_causal aligns top-left, which is wrong when n < ctx).
            qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    return out


def _decode_batched(q: torch.Tensor, pool: torch.Tensor, layer: int, idx: StepIndex) -> torch.Tensor:
    """One new token per sequence: gather all caches into a padded [B, H, T, D] at once."""
    meta = idx.meta
    bs, b = meta.block_size, meta.num_seqs
    nb = (max(meta.context_lens) + bs - 1) // bs
    tables = idx.tables[:, :nb].clamp(min=0)      # -1 pads read block 0; masked out below
    kv = pool[tables, layer]                      # [B, nb, 2, H, bs, D]
    h, d = kv.shape[3], kv.shape[5]
    kv = kv.permute(2, 0, 3, 1, 4, 5).reshape(2, b, h, nb * bs, d).to(q.dtype)
    mask = (torch.arange(nb * bs, device=pool.device)[None, :] < idx.ctx[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kv[0], kv[1], attn_mask=mask, enable_gqa=True)
    return o[:, :, 0]

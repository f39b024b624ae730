"""The tensor side of guided decoding (grammar.py): a step's bitmasks, filled on the leader and
applied where the step is sampled."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

from ..transfer.chunks import device_ids
from .grammar import GrammarState, mask_width


def fill_masks(states: Sequence[GrammarState], outputs: Sequence[Sequence[int]], vocab: int) -> torch.Tensor:
    """[len(states), mask_width(vocab)] int32: each state brought up to its output, then its mask."""
    # numpy's zeros: torch.zeros of this size (64K words at batch 16 of a 128K vocabulary) wakes every
    # OpenMP thread, which then spin (on a 16-core GPU host, guided runs used 15 CPU-s per second)
    masks = torch.from_numpy(np.zeros((len(states), mask_width(vocab)), dtype=np.int32))
    for k, (state, out) in enumerate(zip(states, outputs, strict=True)):
        state.follow(out)
        state.fill(masks[k])
    return masks


def unpack(masks: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bitmasks [R, W] int32 -> allowed [R, vocab] bool (bit t % 32 of word t // 32)."""
    if masks.device.type == "cpu" and sys.byteorder == "little":
        # The words' bytes in memory order, bits least significant first, are token order: numpy's
        # unpackbits does it in C, 30x faster than the shift-and-mask below (0.3 vs 9 ms, 8 x 49152).
        bits = np.unpackbits(masks.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :vocab].view(np.bool_))
    shifts = torch.arange(32, dtype=torch.int32, device=masks.device)
    bits = (masks[:, :, None] >> shifts) & 1  # (an arithmetic shift of the sign bit is fine: & 1)
    return bits.reshape(masks.shape[0], -1)[:, :vocab].bool()


def apply_masks(logits: torch.Tensor, rows: Sequence[int], masks: torch.Tensor | None) -> torch.Tensor:
    """`logits` [B, V] with the tokens that row rows[k]'s mask forbids set to -inf (a new tensor; the
    input may be a CUDA graph's output buffer). Unchanged when no row has a mask."""
    if masks is None or not rows:
        return logits
    index = device_ids(list(rows), logits.device)  # (no stream sync: a step may be queued behind)
    if logits.device.type == "cuda":  # the packed words go up (8x fewer bytes than bools, no host unpack)
        pinned = torch.empty(masks.shape, dtype=masks.dtype, pin_memory=True)
        pinned.numpy()[...] = masks.numpy()   # (numpy's copy: one thread, as in fill_masks)
        masks = pinned.to(logits.device, non_blocking=True)
    allowed = unpack(masks, logits.shape[1]).to(logits.device)
    out = logits.float().clone()
    out.index_copy_(0, index, out.index_select(0, index).masked_fill_(allowed.logical_not_(), float("-inf")))
    return out

"""Per-step attention metadata, passed to the model out of band (nano-vllm style).

The model's forward signature stays (ids, positions, pool); the engine sets the
batch layout here so layers deep inside the module can read it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # [N] int64: block_id * block_size + offset of each new token
    query_start_loc: list[int]      # [B+1] cumulative new-token counts
    context_lens: list[int]         # [B] cached tokens per sequence after this step (new included)
    block_tables: torch.Tensor      # [B, max_blocks] int64, -1 padded
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def is_decode_only(self) -> bool:
        q = self.query_start_loc
        return all(q[i + 1] - q[i] == 1 for i in range(len(q) - 1))


_CTX: AttentionMetadata | None = None


def set_forward_context(meta: AttentionMetadata | None) -> None:
    global _CTX
    _CTX = meta


def get_forward_context() -> AttentionMetadata:
    if _CTX is None:
        raise RuntimeError("no forward context: wrap the model call in forward_context(meta)")
    return _CTX


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    global _CTX
    prev = _CTX
    _CTX = meta
    try:
        yield meta
    finally:
        _CTX = prev

"""Minimal greedy generation over the paged pool: a reference driver for tests and smoke runs.

Not the engine (no scheduler); blocks are interleaved across sequences on
purpose so block tables are never trivially contiguous.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from disagg_mpi.model.context import AttentionMetadata, forward_context

ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (ids, positions) -> logits [N, V]


def model_forward_fn(model, pool: torch.Tensor) -> ForwardFn:
    def fn(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model.compute_logits(model(ids, positions, pool))
    return fn


def blocks_needed(prompts: list[list[int]], max_new_tokens: int, block_size: int) -> int:
    longest = max(len(p) for p in prompts) + max_new_tokens
    return len(prompts) * ((longest + block_size - 1) // block_size)


def greedy_generate(forward: ForwardFn, prompts: list[list[int]], max_new_tokens: int,
                    block_size: int, prefill_chunk: int | None = None,
                    device: str | torch.device = "cpu") -> list[list[int]]:
    """Greedy decode all prompts together; returns the new tokens of each."""
    b = len(prompts)
    per_seq = blocks_needed(prompts, max_new_tokens, block_size) // b
    tables = torch.tensor([[j * b + i for j in range(per_seq)] for i in range(b)], dtype=torch.int64)
    seqs = [list(p) for p in prompts]
    done = [0] * b                       # tokens already in the cache per sequence
    out: list[list[int]] = [[] for _ in range(b)]
    while any(len(o) < max_new_tokens for o in out):
        ids, pos, slots, qsl, ctx, last = [], [], [], [0], [], []
        for i, s in enumerate(seqs):
            n = len(s) - done[i]
            if prefill_chunk and n > prefill_chunk:
                n = prefill_chunk
            for p in range(done[i], done[i] + n):
                ids.append(s[p])
                pos.append(p)
                slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
            done[i] += n
            qsl.append(qsl[-1] + n)
            ctx.append(done[i])
            last.append(done[i] == len(s))      # this step reaches the sequence's end: sample
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, device=device), query_start_loc=qsl,
                                 context_lens=ctx, block_tables=tables.to(device), block_size=block_size)
        with forward_context(meta):
            logits = forward(torch.tensor(ids, device=device), torch.tensor(pos, device=device))
        for i in range(b):
            if last[i] and len(out[i]) < max_new_tokens:
                tok = int(logits[qsl[i + 1] - 1].argmax())
                out[i].append(tok)
                seqs[i].append(tok)
    return out

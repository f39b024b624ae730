"""Logits adjustments before sampling: logit_bias, min_tokens, repetition / frequency / presence.

In vLLM's order (bias and min_tokens first, then the penalties). Each row's adjustment is a
function of its parameters, its output position and its token history (prompt + output) only,
so the context executor (first token) and the generation executor (the rest) compute the same
logits as one aggregated executor. Rows without adjustments are left untouched; the loop runs
over the rows that have some, and each row's work is a few vectorized ops over the vocabulary.

Formulas:
- repetition (transformers' RepetitionPenaltyLogitsProcessor): for each token in prompt + output,
  logit < 0 -> logit * penalty, else logit / penalty.
- frequency and presence (OpenAI): logit - count * frequency - (count > 0) * presence, count over
  the output tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sequence import SamplingParams


def adjust_logits(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int],
                  histories: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """`logits` [B, V] with each row's adjustments applied (a new float32 tensor if any applies).

    positions[i]: the output position sampled (tokens generated so far); histories[i]: prompt +
    output ids of row i, needed where `params[i].needs_history`.
    """
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    logits = logits.float().clone()
    for i in rows:
        p = params[i]
        history = histories[i] if p.needs_history else None
        if p.needs_history and history is None:
            raise ValueError(f"row {i}: penalties need the token history (StepPlan.histories)")
        adjust_row(logits[i], p, positions[i], history)
    return logits


def adjust_row(row: torch.Tensor, p: SamplingParams, position: int, history: Sequence[int] | None) -> None:
    """Adjust one row [V] in place."""
    device, vocab = row.device, row.shape[0]
    if p.logit_bias:
        ids = torch.tensor([i for i, _ in p.logit_bias], dtype=torch.long, device=device)
        bias = torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype, device=device)
        row.index_add_(0, ids, bias)
    if p.min_tokens_mask and position < p.min_tokens:
        row[torch.tensor(p.min_tokens_mask, dtype=torch.long, device=device)] = float("-inf")
    if history is None:
        return
    ids = torch.tensor(list(history), dtype=torch.long, device=device)
    if p.repetition_penalty != 1.0:
        seen = ids.unique()
        vals = row[seen]
        row[seen] = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        out = ids[len(ids) - position:] if position else ids[:0]
        counts = torch.bincount(out, minlength=vocab).to(row.dtype)
        row -= counts * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty

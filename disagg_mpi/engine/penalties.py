"""Logits adjustments before sampling: logit_bias, min_tokens, repetition / frequency / presence.

In vLLM's order (bias and min_tokens first, then the penalties). Each row's adjustment is a
function of its parameters, its output position and its token history (prompt + output) only,
so the context executor (first token) and the generation executor (the rest) compute the same
logits as one aggregated executor. Rows without adjustments are left untouched; the rows that
have some are adjusted together (scatters over a [rows, vocab] block), with no Python loop over
rows or vocabulary in tensor code.

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
    output ids of row i, needed where `params[i].needs_history`. The rows with adjustments are
    gathered and adjusted together: a fixed number of tensor ops per step, whatever the batch.
    """
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return logits
    logits = logits.float().clone()
    device = logits.device
    index = torch.tensor(rows, dtype=torch.long, device=device)
    sub = logits.index_select(0, index)
    _bias_and_min_tokens(sub, [params[i] for i in rows], [positions[i] for i in rows])
    pen = [k for k, i in enumerate(rows) if params[i].needs_history]
    if pen:
        missing = [rows[k] for k in pen if histories[rows[k]] is None]
        if missing:
            raise ValueError(f"rows {missing}: penalties need the token history (StepPlan.histories)")
        hist = [histories[rows[k]] for k in pen]
        outs = [list(h)[len(h) - positions[rows[k]]:] if positions[rows[k]] else [] for k, h in zip(pen, hist)]
        pen_index = torch.tensor(pen, dtype=torch.long, device=device)
        sub.index_copy_(0, pen_index, _penalize(sub.index_select(0, pen_index), [params[rows[k]] for k in pen],
                                                hist, outs))
    logits.index_copy_(0, index, sub)
    return logits


def _bias_and_min_tokens(sub: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> None:
    """logit_bias added, and min_tokens' tokens masked below their position, in place over all rows at once."""
    bias = [(k, t, b) for k, p in enumerate(params) for t, b in p.logit_bias]
    if bias:
        r, t, b = zip(*bias)
        sub.index_put_((_long(r, sub), _long(t, sub)), torch.tensor(b, dtype=sub.dtype, device=sub.device),
                       accumulate=True)
    masked = [(k, t) for k, (p, pos) in enumerate(zip(params, positions)) if pos < p.min_tokens
              for t in p.min_tokens_mask]
    if masked:
        r, t = zip(*masked)
        sub[_long(r, sub), _long(t, sub)] = float("-inf")


def _penalize(vals: torch.Tensor, params: list[SamplingParams], histories: list[Sequence[int]],
              outputs: list[list[int]]) -> torch.Tensor:
    """Repetition, frequency and presence penalties of rows [R, V]; token lists are padded with a
    spare column V that is dropped after the scatter."""
    r, vocab = vals.shape
    dev, dt = vals.device, vals.dtype
    seen = torch.zeros(r, vocab + 1, dtype=torch.bool, device=dev).scatter_(1, _padded(histories, vocab, dev), True)
    out = _padded(outputs, vocab, dev)
    counts = torch.zeros(r, vocab + 1, dtype=dt, device=dev).scatter_add_(1, out, torch.ones(out.shape, dtype=dt,
                                                                                             device=dev))
    seen, counts = seen[:, :vocab], counts[:, :vocab]
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=dt, device=dev)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=dt, device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], dtype=dt, device=dev)[:, None]
    vals = torch.where(seen, torch.where(vals < 0, vals * rep, vals / rep), vals)
    return vals - (counts * freq + (counts > 0).to(dt) * pres)


def _padded(lists: list[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(x) for x in lists))
    return torch.tensor([list(x) + [pad] * (width - len(x)) for x in lists], dtype=torch.long, device=device)


def _long(values: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=like.device)

"""Token sampling: greedy, temperature, top-k, top-p, min-p, keyed randomness (penalties and
logit_bias are applied before, in penalties.py).

The only randomness of a row is one uniform number derived from the row's key
(seed, output position) by an integer hash, and the draw is an inverse-CDF
lookup over that row alone. So a token depends on neither the batch it was
sampled in nor the rank that sampled it (context and generation executors
agree on the first token's successors), and no generator state is carried.
"""

from __future__ import annotations

import torch

from disagg_mpi.engine.grammar_masks import apply_masks
from disagg_mpi.engine.penalties import adjust_logits
from disagg_mpi.engine.sequence import SamplingParams

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # Public-domain SplitMix64 finalizer: a cheap, well-mixed 64-bit hash that
    # is the same in every process (unlike hash() on str) and every version.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key_uniform(key: tuple[int, int]) -> float:
    """A uniform number in [0, 1) that depends only on (seed, position)."""
    seed, position = key
    h = _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))
    return (h >> 11) * 2.0**-53  # top 53 bits: every double in [0, 1) this way is exact


def sample(logits: torch.Tensor, params: list[SamplingParams], keys: list[tuple[int, int]],
           histories: list[list[int] | None] | None = None, mask_rows: list[int] | None = None,
           masks: torch.Tensor | None = None) -> list[int]:
    """One token per row of `logits` [B, V] (float32).

    `histories[i]`: prompt + output ids of row i, where its params have penalties; the output
    position is keys[i][1]. `masks[k]`: the grammar's bitmask of row mask_rows[k] (grammar.py),
    applied after the penalties so that no bias brings a forbidden token back.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(keys):
        raise ValueError(
            f"sample: logits {tuple(logits.shape)}, {len(params)} params and "
            f"{len(keys)} keys must agree on the batch size"
        )
    if not params:
        return []
    logits = adjust_logits(logits, params, [k[1] for k in keys], histories or [None] * len(params))
    logits = apply_masks(logits, mask_rows or [], masks)
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        tokens[rows] = _sample_rows(logits[rows], [params[i] for i in rows], [keys[i] for i in rows])
    return tokens.tolist()  # the one host sync


# Sorted candidates a row's draw is first tried on. Sorting the whole vocabulary per row cost ~4 ms
# on one core (SmolLM2's 49,152: 126 of the 164 ms of a 32-row seeded sampling step); nearly every
# draw lands within the first few hundred ranks. A row whose draw or cut-off falls beyond them (or
# whose candidates end inside a tie) is drawn again over the whole sorted row, by the same formulas.
CANDIDATES = 1024


def _sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], keys: list[tuple[int, int]]
) -> torch.Tensor:
    device, vocab = logits.device, logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float64)
    min_p = torch.tensor([p.min_p for p in params], device=device, dtype=torch.float64)
    uniform = torch.tensor([key_uniform(k) for k in keys], device=device, dtype=torch.float64)

    # Shifted so each row's largest logit is 0 (softmax does not change): a temperature so small that
    # logits / temperature overflows (a request sent 1e-309, 0 in float32) then tends to greedy
    # (0 / tiny = 0, the rest -inf) instead of inf / inf = nan and an index out of range.
    tiny = torch.finfo(torch.float32).tiny
    logits = logits.float()
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature.float().clamp_min(tiny)[:, None]
    # The softmax normalizer of a row without top-k: over the unsorted row, the same for both passes.
    z_all = scaled.double().exp().sum(dim=-1)
    if vocab > CANDIDATES + 1:
        values, order = _stable_top(scaled, CANDIDATES + 1)
        tied = values[:, CANDIDATES - 1] == values[:, CANDIDATES]   # the cut would split a tie
        picked, ok = _draw(values[:, :CANDIDATES], top_k, top_p, min_p, uniform, z_all, vocab)
        ok &= ~tied
        if bool(ok.all()):
            return order.gather(-1, picked[:, None]).squeeze(-1)
        tokens = order.gather(-1, picked[:, None]).squeeze(-1)
        redo = (~ok).nonzero().squeeze(-1)
        tokens[redo] = _sample_full(scaled[redo], top_k[redo], top_p[redo], min_p[redo], uniform[redo], z_all[redo])
        return tokens
    return _sample_full(scaled, top_k, top_p, min_p, uniform, z_all)


def _sample_full(scaled, top_k, top_p, min_p, uniform, z_all) -> torch.Tensor:
    # Sort once (stable, so equal logits keep a fixed order); top-k and top-p are then masks on
    # ranks, and the draw walks the sorted order.
    values, order = scaled.sort(dim=-1, descending=True, stable=True)
    picked, _ = _draw(values, top_k, top_p, min_p, uniform, z_all, scaled.shape[-1])
    return order.gather(-1, picked[:, None]).squeeze(-1)


def _stable_top(scaled: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k (values, indices) of each row in the order of a stable descending sort (equal values by
    ascending index), without sorting the row: topk, then the k candidates re-sorted stably."""
    idx = scaled.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    vals = scaled.gather(-1, idx)
    vals, perm = vals.sort(dim=-1, descending=True, stable=True)
    return vals, idx.gather(-1, perm)


def _draw(values, top_k, top_p, min_p, uniform, z_all, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawn rank of each row over its sorted `values` [B, L] (a prefix of the sorted row, or all of
    it), and whether that rank is final: the row's kept tokens and its draw fall within the L ranks
    (always so when L is the vocabulary). Every quantity a rank < L gets is the same whatever L is
    (elementwise, or a running sum in float64), so a draw found on a prefix is the full sort's draw."""
    _b, n = values.shape
    ranks = torch.arange(n, device=values.device)[None, :]
    e = values.double().exp()
    # top-k: its normalizer is the running sum up to rank top_k - 1 (needs top_k <= L).
    k_in = (top_k <= n) | (top_k >= vocab)
    z = torch.where(top_k < vocab, e.cumsum(dim=-1).gather(-1, (top_k.clamp(max=n) - 1)[:, None]).squeeze(-1), z_all)
    probs = (e / z[:, None]).masked_fill(ranks >= top_k[:, None], 0.0)
    ok = k_in | (n >= vocab)
    if bool((min_p > 0).any()):
        # min-p: drop tokens less likely than min_p times the most likely one (rank 0, always kept);
        # top-p then sees the renormalized min-p distribution (vLLM's order).
        probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)
        kept = probs.cumsum(dim=-1)[:, -1:]
        ok &= (min_p == 0) | (probs[:, -1] == 0) | (n >= vocab)   # its kept mass is all in the L ranks
        probs = torch.where((min_p > 0)[:, None], probs / kept, probs)
    # Nucleus: keep a token while the mass *before* it is below top_p, i.e. the
    # smallest prefix reaching top_p; rank 0 is always kept.
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((mass_before >= top_p[:, None]) & (ranks > 0), 0.0)
    cdf = probs.cumsum(dim=-1)
    # Rows that truncate draw within their kept mass; the others within the whole distribution (1).
    truncated = (top_k < vocab) | (min_p > 0) | (top_p < 1)
    total = torch.where(truncated, cdf[:, -1], torch.ones_like(uniform))
    target = uniform * total
    # right=True: first rank whose cdf exceeds target, so a zero-probability
    # rank (flat cdf) is never chosen. Kept ranks are a prefix of the sorted
    # order, so clamping to the last kept one guards rounding at the very end.
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1
    picked = torch.minimum(torch.searchsorted(cdf, target[:, None], right=True), last_kept).squeeze(-1)
    # Final when the L ranks are the whole row, or the kept ranks end inside them (a truncating row's
    # total is their sum), or an untruncated row's draw lands inside them.
    inside = (probs[:, -1] == 0) | (n >= vocab)
    ok &= torch.where(truncated, inside, inside | (target < cdf[:, -1]))
    return picked, ok

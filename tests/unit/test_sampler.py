"""Sampler: greedy, keyed determinism, top-k / top-p, rough distribution checks."""

from __future__ import annotations

import math

import pytest
import torch

from disagg_mpi.engine import sampler
from disagg_mpi.engine.sampler import key_uniform, sample
from disagg_mpi.engine.sequence import SamplingParams

N = 4000  # draws for distribution checks: all in one batch, well under a second


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs))


def draw_many(logits_row: list[float], params: SamplingParams, n: int = N) -> list[int]:
    logits = torch.tensor([logits_row] * n)
    return sample(logits, [params] * n, [(seed, 3) for seed in range(n)])


def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy] * 6, [(0, 0)] * 6) == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    keys = [(s, s) for s in range(8)]
    argmax = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(top_k=1, seed=1)] * 8, keys) == argmax
    # top_p tiny takes the sampling path (not greedy) and must still give argmax.
    tiny = SamplingParams(temperature=1.5, top_p=1e-6)
    assert not tiny.greedy
    assert sample(logits, [tiny] * 8, keys) == argmax


def test_same_key_same_token_regardless_of_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 1000, generator=gen)
    logits[4] = logits[0]
    params = [SamplingParams(temperature=1.0, top_k=50, top_p=0.9)] * 5
    keys = [(11, 0), (11, 1), (12, 0), (13, 7), (11, 0)]
    batch = sample(logits, params, keys)
    alone = [sample(logits[i : i + 1], params[i : i + 1], keys[i : i + 1])[0] for i in range(5)]
    assert batch == alone
    assert batch == sample(logits, params, keys)  # no hidden generator state
    assert batch[0] == batch[4]  # same row, same key
    # Mixed with greedy rows and reversed order: still the same tokens.
    mixed = sample(
        torch.cat([logits.flip(0), logits[:1]]),
        params[::-1] + [SamplingParams(temperature=0)],
        keys[::-1] + [(0, 0)],
    )
    assert mixed[:5] == batch[::-1] and mixed[5] == logits[0].argmax().item()


def test_different_keys_vary():
    tokens = draw_many([0.0] * 16, SamplingParams(), n=200)
    assert len(set(tokens)) == 16


def test_temperature_distribution():
    logits = [0.0, 1.0, 2.0, 0.5]
    for temperature in (0.7, 1.0, 2.0):
        tokens = draw_many(logits, SamplingParams(temperature=temperature))
        probs = torch.tensor(logits).div(temperature).softmax(-1).tolist()
        counts = [tokens.count(t) for t in range(4)]
        # 3 degrees of freedom: 16.3 is the 0.1% tail. Keys are fixed, so no flakes.
        assert chi_square(counts, probs) < 16.3, (temperature, counts, probs)


def test_top_k_restricts_and_renormalizes():
    logits = [0.0, 3.0, 1.0, 2.5, -1.0]
    tokens = draw_many(logits, SamplingParams(top_k=2))
    assert set(tokens) == {1, 3}
    kept = torch.tensor([3.0, 2.5]).softmax(-1).tolist()
    assert chi_square([tokens.count(1), tokens.count(3)], kept) < 10.8  # 1 dof, 0.1%


def test_top_p_keeps_smallest_nucleus():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs]
    # 0.5 < 0.7, so the 0.3 token is needed; 0.5 + 0.3 >= 0.7, so nothing more.
    tokens = draw_many(logits, SamplingParams(top_p=0.7))
    assert set(tokens) == {0, 1}
    assert chi_square([tokens.count(0), tokens.count(1)], [0.5 / 0.8, 0.3 / 0.8]) < 10.8
    # Exactly reaching top_p with the first token keeps one token.
    assert set(draw_many(logits, SamplingParams(top_p=0.5), n=300)) == {0}


def test_key_uniform_is_spread_over_unit_interval():
    us = [key_uniform((s, p)) for s in range(50) for p in range(40)]
    assert all(0.0 <= u < 1.0 for u in us)
    deciles = [sum(1 for u in us if i / 10 <= u < (i + 1) / 10) for i in range(10)]
    assert chi_square(deciles, [0.1] * 10) < 27.9  # 9 dof, 0.1%
    assert key_uniform((1, 2)) != key_uniform((2, 1))


def test_batch_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="batch size"):
        sample(torch.zeros(2, 4), [SamplingParams()], [(0, 0)])
    assert sample(torch.zeros(0, 4), [], []) == []


@pytest.mark.parametrize("temperature", [2.2e-309, 1e-40, 1e-30, 1e-7])
def test_a_tiny_temperature_tends_to_greedy(temperature):
    """logits / temperature overflowed (1e-309 is 0 in float32): softmax of inf / inf gave nan and an
    index outside the vocabulary, which crashed the step (found by the HTTP fuzz test)."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    got = sample(logits, [SamplingParams(temperature, 0, 1.0, 3)] * 5, [(3, i) for i in range(5)])
    assert got == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [1e39, 1e300])
def test_a_huge_temperature_samples_inside_the_vocabulary(temperature):
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    got = sample(logits, [SamplingParams(temperature, 0, 1.0, 3)] * 5, [(3, i) for i in range(5)])
    assert all(0 <= t < 50 for t in got)


# ---- the draw on a sorted prefix (sampler.CANDIDATES) equals the draw on the whole sorted row ----

def _draws(monkeypatch, candidates, logits, params, keys):
    monkeypatch.setattr(sampler, "CANDIDATES", candidates)
    return sample(logits, params, keys)


@pytest.mark.parametrize("seed", range(4))
def test_prefix_draw_equals_full_sort_draw(monkeypatch, seed):
    """Rows whose draw lands within the first CANDIDATES ranks and rows that fall back to the full sort
    both give the full sort's token, for every truncation (top-k inside / beyond the prefix, top-p,
    min-p, none) and with ties (repeated logits)."""
    g = torch.Generator().manual_seed(seed)
    b, vocab = 96, 300
    logits = torch.randn(b, vocab, generator=g) * torch.rand(b, 1, generator=g) * 6
    logits[: b // 4] = logits[: b // 4].round()          # many equal logits: ties at the cut
    grid = [{}, {"top_k": 5}, {"top_k": 40}, {"top_p": 0.5}, {"top_p": 0.97}, {"min_p": 0.05},
            {"min_p": 0.001, "top_p": 0.9}, {"top_k": 12, "top_p": 0.8}]
    params = [SamplingParams(temperature=[0.3, 1.0, 2.5][i % 3], seed=i, **grid[i % len(grid)]) for i in range(b)]
    keys = [(1000 + i, i % 7) for i in range(b)]
    full = _draws(monkeypatch, 10**9, logits, params, keys)
    calls = []
    real = sampler._sample_full
    monkeypatch.setattr(sampler, "_sample_full", lambda s, *a: calls.append(len(s)) or real(s, *a))
    assert _draws(monkeypatch, 16, logits, params, keys) == full
    assert calls and calls[0] < b          # some rows were final on the prefix, some fell back


def test_prefix_draw_is_taken_on_a_real_vocabulary(monkeypatch):
    """A SmolLM2-sized row at an ordinary temperature is drawn on the prefix: no full sort."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 49152, generator=g) * 4
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=i) for i in range(8)]
    keys = [(i, 3) for i in range(8)]
    monkeypatch.setattr(sampler, "_sample_full", lambda *a: pytest.fail("fell back to the full sort"))
    assert len(sample(logits, params, keys)) == 8

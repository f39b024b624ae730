"""Guided decoding's masks on the GPU: the packed words go up and are unpacked there
(grammar_masks.py), with the same result as the host unpack."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from disagg_mpi.engine.grammar_masks import apply_masks
from tests.unit.test_grammar import _bits


def test_masks_applied_on_the_gpu_equal_the_host_path():
    vocab = 128_256   # not a multiple of 32 words' worth of padding: the tail bits must be cut
    allowed = [[0, 31, 32, 4_000, vocab - 1], [5], list(range(0, vocab, 97))]
    masks = _bits(allowed, vocab)
    logits = torch.randn(4, vocab)
    host = apply_masks(logits, [3, 0, 1], masks)
    gpu = apply_masks(logits.cuda(), [3, 0, 1], masks).cpu()
    assert torch.equal(host, gpu)
    assert torch.isfinite(gpu[3]).nonzero().flatten().tolist() == allowed[0]
    assert torch.equal(gpu[2], logits[2])

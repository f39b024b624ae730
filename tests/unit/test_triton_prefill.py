"""The paged prefill attention kernel (model/triton_prefill.py, DISAGG_PREFILL_TRITON_ATTN=1) against
a float64 reference, through paged_attention: fresh prompts, chunk continuations and decodes in one
step. On CUDA, or on CPU under the Triton interpreter (`TRITON_INTERPRET=1`)."""
from __future__ import annotations

import pytest
import torch

from disagg_mpi.model import triton_prefill
from tests.unit import test_attention as ta
from tests.unit.triton_device import DEVICE, pytestmark  # noqa: F401 (skips without triton)

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.fixture
def kernel(monkeypatch):
    """The kernel on, and its launches counted (it runs as it is)."""
    monkeypatch.setenv("DISAGG_PREFILL_TRITON_ATTN", "1")
    monkeypatch.setattr(ta, "BS", 16)   # tl.dot's smallest tile: pool blocks of 16
    calls = []
    real = triton_prefill.prefill_attention

    def counted(*args):
        calls.append(args[4].tile_seq.shape[0])
        return real(*args)

    monkeypatch.setattr(triton_prefill, "prefill_attention", counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2), (9, 3), (4, 4)], ids=["gqa4", "gqa3", "mha"])
def test_mixed_step_equals_the_reference(kernel, heads, dtype):
    # (cached, new): fresh prompts of 40 and 6 (40 spans tiles), continuations (5 + 3, 20 + 17),
    # decodes (10 + 1, 33 + 1) and an idle sequence (7 + 0)
    specs = [(0, 40), (10, 1), (5, 3), (0, 6), (7, 0), (20, 17), (33, 1)]
    out, ref = ta._step(specs, *heads, dtype, d=32, device=DEVICE)
    assert kernel and kernel[0] >= 6, kernel   # one launch, every prompt piece's tiles
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


def test_off_by_default_and_not_for_a_sliding_window():
    assert not triton_prefill.enabled()
    assert triton_prefill.usable(torch.device(DEVICE), 128, 32, None)
    assert not triton_prefill.usable(torch.device(DEVICE), 128, 32, 4096)   # window: torch's SDPA
    assert not triton_prefill.usable(torch.device(DEVICE), 96, 32, None)    # head_dim not a power of 2
    assert not triton_prefill.usable(torch.device(DEVICE), 128, 8, None)    # blocks below tl.dot's 16


def test_tiles_cover_each_piece_once():
    t = triton_prefill.tiles([0, 2], [0, 40, 41, 44], [40, 11, 8], group=4, device=torch.device("cpu"))
    assert t.block_m == 16
    assert list(zip(t.tile_seq.tolist(), t.tile_tok.tolist())) == [(0, 0), (0, 16), (0, 32), (2, 0)]
    assert t.q0.tolist() == [0, 40, 41] and t.n.tolist() == [40, 1, 3] and t.ctx.tolist() == [40, 11, 8]

"""The fused few-token expert kernels (model/triton_moe.py) against the grouped path (moe_grouped.py),
and the one-kernel router against torch's top-k and softmax.

Runs on CUDA, or on CPU under the Triton interpreter:
`TRITON_INTERPRET=1 python -m pytest -q tests/unit/test_triton_moe.py`.
Skips when triton is not installed (CI) or when neither is available.
"""
from __future__ import annotations

import pytest
import torch

from disagg_mpi.model.moe import route_renormalized
from disagg_mpi.model.moe_grouped import grouped_experts
from disagg_mpi.model.triton_moe import FUSED_MAX_PAIRS, fused_experts, fused_ok, route_topk
from tests.unit.triton_device import DEVICE, pytestmark  # noqa: F401 (skips without triton)


def _case(n, k, num_e, hidden, ffn, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g).to(dtype)
    gate_up = (torch.randn(num_e, 2 * ffn, hidden, generator=g) / hidden ** 0.5).to(dtype)
    down = (torch.randn(num_e, hidden, ffn, generator=g) / ffn ** 0.5).to(dtype)
    ids = torch.stack([torch.randperm(num_e, generator=g)[:k] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, k, generator=g), dim=-1)
    return [t.to(DEVICE) for t in (x, weights, ids, gate_up, down)]


# F and H not multiples of the blocks (masked tails), k = 1, 2, 8, two tokens on one expert
@pytest.mark.parametrize("n,k,num_e,hidden,ffn", [(1, 8, 16, 96, 40), (3, 2, 4, 64, 48), (2, 1, 3, 300, 20),
                                                  (4, 8, 8, 128, 64)])
def test_fused_experts_equal_the_grouped_path(n, k, num_e, hidden, ffn):
    x, weights, ids, gate_up, down = _case(n, k, num_e, hidden, ffn, torch.float32)
    ref = grouped_experts(x, weights, ids, gate_up, down)
    got = fused_experts(x, weights, ids, gate_up, down)
    assert got.shape == ref.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_fused_experts_bf16_rounds_like_the_grouped_path():
    x, weights, ids, gate_up, down = _case(2, 8, 16, 256, 96, torch.bfloat16, seed=1)
    ref = grouped_experts(x, weights, ids, gate_up, down).float()
    got = fused_experts(x, weights, ids, gate_up, down).float()
    # the same roundings: within a few bf16 ulps of the output (sums in another order)
    assert (got - ref).abs().max().item() <= 0.02 * ref.abs().max().item()


def test_fused_path_only_for_few_local_pairs(monkeypatch):
    x = torch.zeros(FUSED_MAX_PAIRS // 8, 4, device=DEVICE)
    assert fused_ok(x, 8, all_local=True)
    monkeypatch.setenv("DISAGG_MOE_FUSED", "0")       # the knob keeps the grouped path
    assert not fused_ok(x, 8, all_local=True)
    monkeypatch.delenv("DISAGG_MOE_FUSED")
    assert not fused_ok(x, 8, all_local=False)        # expert parallel: other ranks' experts
    assert not fused_ok(torch.zeros(FUSED_MAX_PAIRS // 8 + 1, 4, device=DEVICE), 8, all_local=True)


# E not a power of two (masked tail), k = 1, 2, 8
@pytest.mark.parametrize("n,num_e,k", [(1, 128, 8), (5, 60, 2), (3, 8, 1), (2, 16, 16)])
def test_route_topk_equals_topk_then_softmax(n, num_e, k):
    g = torch.Generator().manual_seed(n + num_e + k)
    logits = torch.randn(n, num_e, generator=g).to(DEVICE)
    ref_w, ref_i = route_renormalized(logits, k)
    w, i = route_topk(logits, k)
    assert i.dtype == torch.int64 and w.dtype == logits.dtype
    assert torch.equal(i, ref_i)   # (random fp32 logits: no ties)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def test_route_topk_bf16_rounds_once_like_torch():
    g = torch.Generator().manual_seed(3)
    # distinct values, exact in bf16: the ids must agree exactly, the weights to the bf16 rounding
    logits = torch.stack([torch.randperm(128, generator=g) for _ in range(4)]).float().div(16).bfloat16().to(DEVICE)
    ref_w, ref_i = route_renormalized(logits, 8)
    w, i = route_topk(logits, 8)
    assert torch.equal(i, ref_i)
    assert (w.float() - ref_w.float()).abs().max().item() <= 2 ** -8


def test_route_topk_refuses_a_k_outside_the_experts():
    with pytest.raises(ValueError, match="top_k=9 must be in"):
        route_topk(torch.zeros(1, 8, device=DEVICE), 9)

"""MoE on CUDA: the grouped expert GEMMs (model/moe_grouped.py) against the expert loop in bf16,
inside a CUDA graph, and a small random Qwen3-MoE's greedy tokens against transformers on the GPU.

Run alone: `python -m pytest -q tests/gpu/test_moe_gpu.py` (skips without CUDA; no MPI needed).
"""
from __future__ import annotations

import pytest
import torch

from disagg_mpi.model import load_model
from disagg_mpi.model.moe import StackedExperts, route
from disagg_mpi.model.moe_grouped import grouped_experts, grouped_mm_ok

pytest.importorskip("transformers")
needs_grouped = pytest.mark.skipif(not torch.cuda.is_available() or not grouped_mm_ok("cuda", torch.bfloat16),
                                   reason="needs torch's grouped GEMM kernel (CUDA bf16, compute capability 9/10)")

HIDDEN, FFN, EXPERTS, TOP_K = 256, 128, 16, 4


def _experts(num, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    ex = StackedExperts(num, HIDDEN, FFN).to(device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for p in (ex.gate_up_proj, ex.down_proj):
            p.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.05)
    return ex


def _routing(n, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, HIDDEN, generator=g, device="cuda").to(torch.bfloat16)
    weights, ids = route(torch.randn(n, EXPERTS, generator=g, device="cuda"), TOP_K, normalize=True)
    return x, weights.to(torch.bfloat16), ids


@needs_grouped
@pytest.mark.parametrize("n", [1, 3, 64, 300])
@pytest.mark.parametrize("start,num_local", [(0, EXPERTS), (4, 8)])
def test_grouped_matches_loop_bf16(n, start, num_local):
    """Two grouped GEMMs give the per-expert loop's output in bf16 (within bf16 rounding), for all
    experts and for an expert-parallel rank's range of them."""
    ex = _experts(num_local)
    x, weights, ids = _routing(n)
    with torch.no_grad():
        want = ex.loop(x, weights, ids, start).float()
        got = grouped_experts(x, weights, ids, ex.gate_up_proj, ex.down_proj, start, EXPERTS).float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


@needs_grouped
def test_grouped_runs_in_a_cuda_graph():
    """No host sync: the grouped path captures into a CUDA graph, and a replay on new routing
    (other experts hit, other group sizes) gives the eager result."""
    ex = _experts(EXPERTS)
    x, weights, ids = _routing(8)
    with torch.no_grad():
        grouped_experts(x, weights, ids, ex.gate_up_proj, ex.down_proj)   # warm-up outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = grouped_experts(x, weights, ids, ex.gate_up_proj, ex.down_proj)
        graph.replay()
        first = out.float().clone()
        x2, w2, ids2 = _routing(8, seed=7)
        assert not torch.equal(ids2, ids)
        x.copy_(x2)
        weights.copy_(w2)
        ids.copy_(ids2)
        graph.replay()
        torch.cuda.synchronize()
        want = grouped_experts(x2, w2, ids2, ex.gate_up_proj, ex.down_proj).float()
    tol = 1e-2 * want.abs().max().item()
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=1e-2)
    assert (first - want).abs().max().item() > 10 * tol   # the replay really followed the new routing


# ---- a small Qwen3-MoE against transformers on the GPU -------------------------------------------

PROMPTS = [[5, 17, 300, 42, 7, 99, 100, 3, 250], [11, 12, 13], list(range(20, 60)), [7] * 23]
NEW = 16


def _hf_logits(folder, seqs):
    """transformers (fp32, on the GPU) logits of every position of each sequence."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to("cuda").eval()
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s], device="cuda")
            out.append(hf(ids, attention_mask=torch.ones_like(ids)).logits[0].float())
    return out


def _hf_greedy(folder, prompts, new):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to("cuda").eval()
    hf.generation_config.eos_token_id = None
    res = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, pad_token_id=0)
        res.append(out[0, len(p):].tolist())
    return res


def test_qwen3_moe_fp32_greedy_equals_transformers_on_gpu():
    """fp32 on the GPU (the expert loop, eager steps): transformers' greedy tokens exactly."""
    from tests.gpu.test_decode_graphs import generate
    from tests.hf_folder import family_checkpoint

    folder = family_checkpoint("qwen3-moe")
    model = load_model(str(folder), dtype=torch.float32, device="cuda")
    assert not model.supports_fast_decode()   # fp32: no grouped kernel, so no graph either
    new = 12   # as the CPU tests decode these prompts: no near-tie within fp32 noise there
    ours, _ = generate(model, "eager", PROMPTS, new)
    assert ours == _hf_greedy(folder, PROMPTS, new)


@needs_grouped
def test_qwen3_moe_bf16_graphs_follow_transformers_on_gpu():
    """bf16 with the grouped GEMMs inside CUDA graphs: at every step, the token we chose is
    transformers' (fp32) greedy choice up to bf16 rounding: its logit, fed our sequence, lies within
    0.25 of the maximum (logits span about +-7 here; the bf16 engine's largest deficit on CPU was
    0.09). A wrong routing, offset or combine moves whole tokens, far beyond that."""
    from tests.gpu.test_decode_graphs import generate
    from tests.hf_folder import family_checkpoint

    folder = family_checkpoint("qwen3-moe")
    model = load_model(str(folder), dtype=torch.bfloat16, device="cuda")
    assert model.supports_fast_decode()
    ours, graphs = generate(model, "graphs", PROMPTS, NEW, dtype="bfloat16")
    assert graphs, "no CUDA graph replayed"
    logits = _hf_logits(folder, [p + t for p, t in zip(PROMPTS, ours)])
    exact = 0
    for p, t, lg in zip(PROMPTS, ours, logits):
        step = lg[len(p) - 1:-1]
        chosen = step.gather(1, torch.tensor(t, device="cuda")[:, None])[:, 0]
        deficit = step.max(dim=-1).values - chosen
        assert deficit.max().item() <= 0.25, (p, t, deficit.tolist())
        exact += int((step.argmax(-1).cpu() == torch.tensor(t)).sum())
    assert exact >= 0.75 * NEW * len(PROMPTS)


def test_qwen3_qk_norm_in_graphs_fp32_equals_transformers_on_gpu():
    """The fast decode path's Qwen3 q/k norms (Triton, one row per head) in CUDA graphs, fp32, on a
    dense Qwen3: transformers' greedy tokens exactly (the MoE test above runs them in bf16)."""
    from tests.gpu.test_decode_graphs import generate
    from tests.hf_folder import family_checkpoint

    folder = family_checkpoint("qwen3")
    model = load_model(str(folder), dtype=torch.float32, device="cuda")
    assert model.config.qk_norm and model.supports_fast_decode()
    ours, graphs = generate(model, "graphs", PROMPTS, 12)
    assert graphs, "no CUDA graph replayed"
    assert ours == _hf_greedy(folder, PROMPTS, 12)

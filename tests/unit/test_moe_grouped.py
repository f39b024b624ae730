"""The grouped-GEMM expert path (model/moe_grouped.py) on CPU: torch's `_grouped_mm` has a CPU
kernel, so the sort / offsets / combine math the GPU runs is checked here against the expert loop,
and a whole model on it against transformers (fp32). tests/gpu/test_moe_gpu.py runs it on CUDA."""
import pytest
import torch

from disagg_mpi.model import load_model
from disagg_mpi.model import moe as moe_mod
from disagg_mpi.model.moe import StackedExperts, route
from disagg_mpi.model.moe_grouped import grouped_experts, grouped_mm_ok, sort_by_expert

pytest.importorskip("transformers")


def test_sort_by_expert_offsets_on_device():
    ids = torch.tensor([[3, 1], [1, 0], [2, 3]])
    s = sort_by_expert(ids, 0, 4, all_local=True)
    assert s.offs.tolist() == [1, 3, 4, 6] and s.offs.dtype == torch.int32   # counts 1, 2, 1, 2
    assert s.local.tolist() == [0, 1, 1, 2, 3, 3]
    assert s.perm.tolist() == [3, 1, 2, 4, 0, 5] and s.token.tolist() == [1, 0, 1, 2, 0, 2]


def test_sort_by_expert_other_ranks_experts_sort_last():
    """Expert parallelism: the rank holds experts [2, 4); 0 and 1 get the sentinel 2 and lie past the
    last offset, so the grouped GEMMs never read them."""
    ids = torch.tensor([[3, 1], [1, 0], [2, 3]])
    s = sort_by_expert(ids, 2, 2)
    assert s.offs.tolist() == [1, 3]
    assert s.local.tolist() == [0, 1, 1, 2, 2, 2]
    assert s.token[:3].tolist() == [2, 0, 2]


def _experts(num, hidden=16, ffn=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = StackedExperts(num, hidden, ffn)
    with torch.no_grad():
        ex.gate_up_proj.copy_(torch.randn(ex.gate_up_proj.shape, generator=g))
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g))
    return ex


@pytest.mark.parametrize("start,num_local,total", [(0, 8, 8), (2, 3, 8), (5, 3, 8)])
def test_grouped_equals_loop(start, num_local, total):
    """The grouped GEMMs give the loop's sums, for all experts and for a rank's range of them
    (experts of other ranks contribute nothing on either path; empty groups included)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 16, generator=g)
    weights, ids = route(torch.randn(13, total, generator=g), 2, normalize=True)
    full = _experts(total)
    ex = _experts(num_local)
    with torch.no_grad():
        ex.gate_up_proj.copy_(full.gate_up_proj[start:start + num_local])
        ex.down_proj.copy_(full.down_proj[start:start + num_local])
    want = ex.loop(x, weights, ids, start)
    got = grouped_experts(x, weights, ids, ex.gate_up_proj, ex.down_proj, start, total)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.abs().sum() > 0
    if num_local < total:   # the ranks' partial sums add up to the whole
        parts = [grouped_experts(x, weights, ids, full.gate_up_proj[a:b], full.down_proj[a:b], a, total)
                 for a, b in ((0, start), (start, start + num_local), (start + num_local, total)) if b > a]
        torch.testing.assert_close(sum(parts), full.loop(x, weights, ids, 0), atol=1e-4, rtol=1e-5)


def test_grouped_path_only_where_it_needs_no_host_sync():
    assert not grouped_mm_ok("cpu", torch.float32) and not grouped_mm_ok("cpu", torch.bfloat16)


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "qwen2-moe"])
def test_model_on_grouped_path_equals_transformers(monkeypatch, name):
    """A whole model whose MoE layers take the grouped path (forced on CPU) decodes transformers'
    greedy tokens in fp32; the path really ran (counted)."""
    from tests.hf_folder import family_checkpoint
    from tests.oracle import hf_greedy
    from tests.unit.test_model_families import NEW, PROMPTS, executor_tokens

    calls = []

    def counting(*a, **k):
        calls.append(1)
        return grouped_experts(*a, **k)

    monkeypatch.setattr(moe_mod, "grouped_mm_ok", lambda device, dtype: True)
    monkeypatch.setattr(moe_mod, "grouped_experts", counting)
    folder = family_checkpoint(name)
    assert executor_tokens(load_model(str(folder))) == hf_greedy(PROMPTS, NEW, folder, None)
    assert calls


def test_moe_fast_decode_path_equals_transformers(monkeypatch):
    """The CUDA decode path of an MoE model (Triton norms, q/k norm, fused RoPE + attention kernel,
    the grouped experts with the Triton SwiGLU), run on CPU under the Triton interpreter
    (`TRITON_INTERPRET=1`, triton installed; skipped otherwise): transformers' tokens."""
    from disagg_mpi.model import llama as llama_mod
    from tests.unit.test_model_families import assert_fast_path_equals_transformers

    for mod in (moe_mod, llama_mod):
        monkeypatch.setattr(mod, "grouped_mm_ok", lambda device, dtype: True)
    assert_fast_path_equals_transformers(monkeypatch, "qwen3-moe")

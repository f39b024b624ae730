"""oneDNN prepacked projections on CPU (model/cpu_gemm.py) against torch's F.linear and the unpacked model.

Greedy agreement with transformers through the Executor (which packs on CPU) is covered by the
oracle tests (test_executor_oracle.py, test_model_families.py, test_model_llama.py).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from disagg_mpi.model import cpu_gemm, load_model
from disagg_mpi.model.context import AttentionMetadata, forward_context

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [0, 1, 8, 257])
def test_packed_linear_equals_f_linear(dtype, tol, rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 64, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    ref = F.linear(x.float(), w.float(), b.float())
    got = cpu_gemm.linear(x, cpu_gemm.pack(w), b)
    assert got.shape == (rows, 96) and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(cpu_gemm.dense_linear(x, w).float(), F.linear(x.float(), w.float()),
                               atol=tol * 10, rtol=tol)


def _prefill_logits(model, ids):
    n = len(ids)
    pool = model.allocate_kv_pool(4, 16)
    meta = AttentionMetadata(torch.arange(n), [0, n], [n], torch.arange(4)[None, :], 16)
    with forward_context(meta):
        h = model(torch.tensor(ids), torch.arange(n), pool)
    return model.compute_logits(h)


def test_packed_model_equals_unpacked_and_frees_dense_weights():
    """A whole forward with every projection packed gives the unpacked logits (fp32 rounding only),
    and the dense projection weights are gone (the packed copy replaces them, not doubles them)."""
    ids = [5, 17, 300, 42, 7, 99, 100, 3, 250, 11]
    model = load_model("random:tiny", dtype=torch.float32)
    ref = _prefill_logits(model, ids)
    dense = sum(p.numel() for p in model.parameters())
    model.pack_for_cpu()
    got = _prefill_logits(model, ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()
    layer = next(iter(model.model.layers.values()))
    assert layer.self_attn.q_proj.weight.numel() == 0 and layer.mlp.down_proj.weight.numel() == 0
    assert sum(p.numel() for p in model.parameters()) < dense / 2 or model.config.tie_word_embeddings
    # Packing must be what ran: breaking a packed weight changes the output.
    layer.mlp._down_packed = cpu_gemm.pack(torch.zeros(model.config.hidden_size, model.config.intermediate_size))
    assert not torch.allclose(_prefill_logits(model, ids), ref, atol=1e-3)


def test_runner_packs_on_cpu_unless_turned_off(monkeypatch):
    from disagg_mpi.engine.model_runner import ModelRunner

    model = load_model("random:tiny", dtype=torch.float32)
    monkeypatch.setenv("DISAGG_CPU_PACKED_GEMM", "0")
    ModelRunner(model, 8, 16)
    assert not getattr(model, "_cpu_packed", False)
    monkeypatch.setenv("DISAGG_CPU_PACKED_GEMM", "1")
    ModelRunner(model, 8, 16)
    assert model._cpu_packed and hasattr(next(iter(model.model.layers.values())).self_attn, "_qkv_packed")


def _rss_mib() -> float:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_system():
    """Memory freed below a live block stays in the process until malloc_trim gives it back (the
    dense weights after packing)."""
    blocks = [torch.ones(16_000) for _ in range(1500)]   # 64 KB each (heap, not mmap): ~92 MiB
    plug = torch.ones(16_000)   # allocated above them: free() alone cannot shrink the heap
    del blocks
    before = _rss_mib()
    assert cpu_gemm.return_freed_memory()
    assert before - _rss_mib() > 60, (before, _rss_mib())
    del plug

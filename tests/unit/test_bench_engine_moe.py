"""scripts/bench_engine.py on an MoE model: the roofline counts only the experts a step reads, and
transformers' model shares our stacked expert tensors (no second copy of a 61 GB model)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from disagg_mpi.model import LlamaModel, ShardSpec, load_model
from disagg_mpi.model.config import preset

pytest.importorskip("transformers")


def _bench():
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_engine.py"
    spec = importlib.util.spec_from_file_location("bench_engine", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_roofline_bytes_count_the_active_experts_only():
    """30B-A3B at batch 1 reads about 3.3B parameters' worth (its 8 routed experts of 128), at
    batch 64 nearly all 30.5B (about 125.9 experts hit per layer)."""
    b = _bench()
    cfg = preset("qwen3-30b-a3b")
    with torch.device("meta"):
        m = LlamaModel(cfg, ShardSpec())
    embed = cfg.vocab_size * cfg.hidden_size
    one = b.decode_step_bytes(m, 1, 0, torch.bfloat16, active_experts=cfg.num_experts_per_tok) / 2
    assert one + embed == pytest.approx(3.3e9, rel=0.03)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    nine = b.decode_step_bytes(m, 1, 0, torch.bfloat16, active_experts=9) / 2
    assert nine - one == cfg.num_layers * per_expert
    assert b.decode_step_bytes(m, 1, 0, torch.bfloat16) / 2 + embed == pytest.approx(30.5e9, rel=0.01)
    assert b.expected_active_experts(128, 8, 1) == pytest.approx(8)
    assert b.expected_active_experts(128, 8, 64) == pytest.approx(125.9, abs=0.1)


def test_transformers_shares_the_stacked_experts():
    b = _bench()
    model = load_model("random:tiny-moe", seed=3)
    hf = b.build_hf(model, torch.float32)
    ours = model.model.layers["1"].mlp.experts
    theirs = hf.model.layers[1].mlp.experts
    assert theirs.gate_up_proj.data_ptr() == ours.gate_up_proj.data_ptr()
    assert theirs.down_proj.data_ptr() == ours.down_proj.data_ptr()
    ids = torch.tensor([[5, 300, 17, 42, 9]])
    from tests.unit.test_model_llama import prefill_logits

    with torch.no_grad():
        want = hf(ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
    torch.testing.assert_close(prefill_logits(model, ids[0].tolist())[-1], want, atol=1e-4, rtol=1e-4)

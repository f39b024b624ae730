"""Forward pass of random:tiny vs transformers' LlamaForCausalLM from the same folder."""
import json

import pytest
import torch

from disagg_mpi.model import AttentionMetadata, forward_context, load_model, load_model_config
from tests.hf_folder import save_hf_folder
from tests.paged_generate import blocks_needed, greedy_generate, model_forward_fn

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 12, 13], [900, 800, 700, 600, 500, 400]]




@torch.no_grad()
def hf_greedy(hf, prompt, n):
    """Plain greedy loop (HF's generate would stop at, or with min_new_tokens suppress, EOS)."""
    out = hf(torch.tensor([prompt]), use_cache=True)
    toks = []
    for _ in range(n):
        toks.append(int(out.logits[0, -1].argmax()))
        out = hf(torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return toks


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_hf")
    save_hf_folder(load_model("random:tiny", seed=3), folder)
    return folder


@pytest.fixture(scope="module")
def hf_model(tiny_folder):
    m = transformers.LlamaForCausalLM.from_pretrained(str(tiny_folder), torch_dtype=torch.float32)
    return m.eval()


def prefill_logits(model, ids, block_size=4):
    n = len(ids)
    nb = (n + block_size - 1) // block_size
    pool = model.allocate_kv_pool(nb + 2, block_size)
    table = torch.arange(nb + 2).flip(0)[:nb][None]          # reversed block ids
    slots = torch.tensor([int(table[0, p // block_size]) * block_size + p % block_size for p in range(n)])
    meta = AttentionMetadata(slots, [0, n], [n], table, block_size)
    with forward_context(meta):
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), pool))


def test_config_roundtrip(tiny_folder):
    assert load_model_config(str(tiny_folder)) == load_model_config("random:tiny")


def test_prefill_logits_match_hf(tiny_folder, hf_model):
    ours = load_model(str(tiny_folder))
    ids = PROMPTS[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    got = prefill_logits(ours, ids)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_random_load_matches_folder(tiny_folder):
    a, b = load_model("random:tiny", seed=3), load_model(str(tiny_folder))
    ids = PROMPTS[1]
    torch.testing.assert_close(prefill_logits(a, ids), prefill_logits(b, ids), atol=0, rtol=0)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


@pytest.fixture(scope="module")
def hf_tokens(hf_model):
    return [hf_greedy(hf_model, p, 16) for p in PROMPTS]


@pytest.mark.parametrize("chunk", [None, 4])
def test_greedy_decode_matches_hf(tiny_folder, hf_tokens, chunk):
    ours = load_model(str(tiny_folder))
    bs, new = 4, 16
    pool = ours.allocate_kv_pool(blocks_needed(PROMPTS, new, bs), bs)
    got = greedy_generate(model_forward_fn(ours, pool), PROMPTS, new, bs, prefill_chunk=chunk)
    assert got == hf_tokens


def test_bf16_runs():
    m = load_model("random:tiny", dtype=torch.bfloat16)
    logits = prefill_logits(m, PROMPTS[0])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bad_specs():
    with pytest.raises(ValueError, match="unknown preset"):
        load_model("random:nope")
    with pytest.raises(FileNotFoundError, match="accepted"):
        load_model("/nonexistent/folder")
    with pytest.raises(FileNotFoundError):
        load_model("/nonexistent/x.gguf")


def _variant_folder(tmp_path, **changes):
    from disagg_mpi.model import LlamaModel
    from disagg_mpi.model.config import preset
    from disagg_mpi.model.random_init import random_fetch
    from disagg_mpi.model.weights import load_weights
    cfg = preset("tiny").replace(**changes)
    m = LlamaModel.empty(cfg)
    load_weights(m, random_fetch(cfg, 7, torch.float32, "cpu"))
    save_hf_folder(m, tmp_path)
    return cfg


def test_llama3_rope_scaling_matches_hf(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    _variant_folder(tmp_path, rope_scaling=scaling, rope_theta=500000.0)
    ours = load_model(str(tmp_path))
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = list(range(3, 103))       # 100 positions, well past the "original" 32
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(prefill_logits(ours, ids), ref, atol=1e-4, rtol=1e-4)


def test_qkv_bias_and_tied_match_qwen2(tmp_path):
    cfg = _variant_folder(tmp_path, attention_bias=True, tie_word_embeddings=True)
    d = cfg.to_hf_dict()
    d.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
    d.pop("attention_bias")
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours = load_model(str(tmp_path))
    assert ours.config.attention_bias and ours.lm_head.weight is ours.model.embed_tokens.weight
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = PROMPTS[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(prefill_logits(ours, ids), ref, atol=1e-4, rtol=1e-4)


def test_rope_inv_freq_and_config_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from disagg_mpi.model.config import ModelConfig, preset, rope_inv_freq
    cfg = preset("llama-3.1-8b")
    hc = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hc, "cpu")
    assert torch.equal(inv.float(), rope_inv_freq(cfg))
    # A transformers-5 style config.json (rope_parameters) reads back to the same config.
    back = ModelConfig.from_hf_dict(hc.to_dict())
    assert back.rope_theta == cfg.rope_theta and back.rope_scaling["factor"] == 8.0
    assert back.eos_token_ids == cfg.eos_token_ids and back.head_dim == 128

"""Forward pass of random:tiny vs transformers' LlamaForCausalLM from the same folder."""
import json

import pytest
import torch
from safetensors.torch import save_file

from disagg_mpi.model import AttentionMetadata, forward_context, load_model, load_model_config
from disagg_mpi.model.generate import blocks_needed, greedy_generate, model_forward_fn

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 12, 13], [900, 800, 700, 600, 500, 400]]


def save_hf_folder(model, folder):
    cfg = model.config
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def hf_greedy(hf, prompt, n):
    """Plain greedy loop (HF's generate would stop at, or with min_new_tokens suppress, EOS)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


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

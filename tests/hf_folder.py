"""Hugging Face folders for tests: one of our models written out, or a small random checkpoint of
any supported family written by transformers itself (the reference implementation).

`family_checkpoint(name)` builds the checkpoint once per machine (a folder under the
test cache, keyed by its recipe; a file lock and an atomic rename make concurrent
ranks and sessions safe), so unit and multi-rank tests share it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file


def save_hf_folder(model, folder):
    cfg = model.config
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


_SMALL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2}

# name -> (transformers config class, causal-LM class, config kwargs). head_dim 32 != 64 / 4: the
# explicit head_dim path (as Qwen3-0.6B: hidden 1024, 16 heads, head_dim 128).
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SMALL, head_dim=32, tie_word_embeddings=False)),
    "qwen3-tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SMALL, head_dim=32, tie_word_embeddings=True)),
    # Sliding windows of 8 positions: they bind on every test prompt (up to 40 tokens + new ones).
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_SMALL, head_dim=16, sliding_window=8)),
    "qwen3-swa": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SMALL, head_dim=32, use_sliding_window=True,
                                                         sliding_window=8, max_window_layers=0)),
    # Mixture of experts: 4 or 8 experts, 2 active; Qwen3-MoE with a dense layer (mlp_only_layers).
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_SMALL, head_dim=16, num_local_experts=4,
                                                            num_experts_per_tok=2, sliding_window=None)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(_SMALL, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])),
    "qwen3-moe-unnorm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                         dict(_SMALL, head_dim=32, num_experts=8, num_experts_per_tok=2,
                              moe_intermediate_size=32, norm_topk_prob=False, decoder_sparse_step=1,
                              mlp_only_layers=[])),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_SMALL, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, norm_topk_prob=False, decoder_sparse_step=1,
                       mlp_only_layers=[2], qkv_bias=True)),
}

STD = 0.2   # weights' std: large enough that greedy decoding has no near-ties


def _cache_root() -> Path:
    env = os.environ.get("DISAGG_MPI_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "disagg_mpi") / "test_checkpoints"


def family_checkpoint(name: str, seed: int = 0) -> Path:
    """Folder of a small random `name` checkpoint (fp32 safetensors + tokenizer.json) from transformers."""
    import transformers

    cfg_cls, _, kwargs = FAMILIES[name]
    recipe = json.dumps({"name": name, "cls": cfg_cls, "kw": kwargs, "std": STD, "seed": seed,
                         "transformers": transformers.__version__, "version": 1}, sort_keys=True)
    root = _cache_root()
    folder = root / f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    if (folder / "config.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one process builds, the others wait and reuse it
        if not (folder / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
            try:
                _build(name, seed, tmp)
                os.replace(tmp, folder)   # atomic: readers never see a partial folder
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _build(name: str, seed: int, folder: Path) -> None:
    import torch
    import transformers

    cfg_cls, model_cls, kwargs = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):   # not all ones, so a norm read wrongly shows
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, STD)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(str(folder))
    write_tokenizer(folder, cfg.vocab_size)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A WordLevel tokenizer.json ("t0".."tN" split on spaces): enough for token-id prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))

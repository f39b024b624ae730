"""Write a HF checkpoint folder as a GGUF file (F32, llama.cpp names), for loader tests.

Only families whose Q/K rows llama.cpp stores unpermuted (qwen2, qwen3) are written;
llama's RoPE permutation is covered by the SmolLM2 GGUF tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_gguf(folder: Path, path: Path, arch: str | None = None,
               extra: dict[str, np.ndarray] | None = None) -> Path:
    """`folder`'s config and tensors as GGUF at `path`; `arch` overrides general.architecture,
    `extra` adds tensors under their GGUF names."""
    import gguf
    from safetensors.torch import load_file

    from disagg_mpi.model.config import ModelConfig
    from disagg_mpi.model.gguf_loader import gguf_name

    cfg = ModelConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    if cfg.architecture not in ("qwen2", "qwen3"):
        raise ValueError(f"write_gguf: {cfg.architecture} needs llama.cpp's Q/K permutation; not written here")
    name = arch or cfg.architecture
    w = gguf.GGUFWriter(str(path), name)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])
    for hf, t in sorted(load_file(str(folder / "model.safetensors")).items()):
        w.add_tensor(gguf_name(hf), t.float().numpy())
    for gname, arr in (extra or {}).items():
        w.add_tensor(gname, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

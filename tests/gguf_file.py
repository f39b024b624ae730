"""Write a HF checkpoint folder as a GGUF file (llama.cpp names), for loader tests.

Dense qwen2/qwen3 and the mixture-of-experts families: Mixtral as `llama` with
`llama.expert_count` (Q/K rows permuted for llama.cpp's RoPE, as its converter does),
`qwen3moe` and `qwen2moe`, each layer's experts stacked into `ffn_{gate,up,down}_exps`
[E, rows, cols], optionally quantized (`expert_qtype`, e.g. Q8_0) with gguf's own quantizer.
Dense llama's RoPE permutation is covered by the SmolLM2 GGUF tests.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "mixtral": "llama", "qwen3_moe": "qwen3moe",
             "qwen2_moe": "qwen2moe"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")


def write_gguf(folder: Path, path: Path, arch: str | None = None,
               extra: dict[str, np.ndarray] | None = None, expert_qtype=None) -> Path:
    """`folder`'s config and tensors as GGUF at `path`; `arch` overrides general.architecture,
    `extra` adds tensors under their GGUF names."""
    import gguf
    from safetensors.torch import load_file

    from disagg_mpi.model.config import ModelConfig

    cfg = ModelConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    if cfg.architecture not in GGUF_ARCH:
        raise ValueError(f"write_gguf: {cfg.architecture} needs llama.cpp's Q/K permutation; not written here")
    w = gguf.GGUFWriter(str(path), arch or GGUF_ARCH[cfg.architecture])
    _write_metadata(w, cfg)
    for gname, arr, qtype in _tensors(cfg, load_file(str(folder / "model.safetensors")), expert_qtype):
        if qtype is None:
            w.add_tensor(gname, arr)
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    for gname, arr in (extra or {}).items():
        w.add_tensor(gname, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write_metadata(w, cfg) -> None:
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
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        if cfg.architecture != "mixtral":   # Mixtral's expert width is its feed_forward_length
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order (the inverse of gguf_loader._unpermute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(cfg, sd, expert_qtype):
    """(GGUF name, float32 array, quantization or None) of every tensor; experts stacked per layer."""
    from disagg_mpi.model.gguf_loader import gguf_source

    stacks: dict[str, dict[int, np.ndarray]] = {}
    for hf, t in sorted(sd.items()):
        arr = t.float().numpy()
        gname, expert = gguf_source(hf)
        if expert is not None:
            stacks.setdefault(gname, {})[expert] = arr
            continue
        if gname.endswith(".ffn_gate_inp_shexp.weight"):
            arr = arr.reshape(-1)   # llama.cpp's Qwen2-MoE shared-expert gate is a vector [H]
        if cfg.architecture == "mixtral" and (".attn_q." in gname or ".attn_k." in gname):
            arr = _permute(arr, cfg.num_heads if ".attn_q." in gname else cfg.num_kv_heads)
        yield gname, arr, None
    for gname, experts in sorted(stacks.items()):
        yield gname, np.stack([experts[e] for e in sorted(experts)]), expert_qtype

"""GGUF checkpoints (llama.cpp): config from metadata, dequantized per-rank slices.

llama.cpp stores Q/K rows permuted for its interleaved RoPE; we undo that per
head (like transformers' reverse_permute) so the HF rotate_half RoPE applies.
Mixture of experts (Mixtral as `llama` with `llama.expert_count`, `qwen3moe`,
`qwen2moe`): each layer's experts come stacked, `ffn_{gate,up,down}_exps` [E, rows, cols]
(numpy order); one expert's HF tensor is one index of it, dequantized alone.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from disagg_mpi.model.config import ModelConfig
from disagg_mpi.model.families import check_names, checkpoint_names

if TYPE_CHECKING:   # (reading the config needs no torch: rank 0 and the launcher never load it)
    import torch

    from disagg_mpi.model.weights import Fetch

_LAYER_MAP = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    # Mixture of experts: the router, Qwen2-MoE's shared expert and its gate.
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# An expert's projection (HF and Mixtral names) -> the stacked GGUF tensor holding every expert's.
_EXPERT_MAP = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
               "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_GLOBAL_MAP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_source(hf_name: str) -> tuple[str, int | None]:
    """(GGUF tensor name, expert index in it or None) of a HF tensor name."""
    m = _EXPERT_RE.match(hf_name)
    if m and m.group(3) in _EXPERT_MAP:
        return f"blk.{m.group(1)}.{_EXPERT_MAP[m.group(3)]}.weight", int(m.group(2))
    return _plain_gguf_name(hf_name), None


def gguf_name(hf_name: str) -> str:
    return gguf_source(hf_name)[0]


def _plain_gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[hf_name]
    m = _LAYER_RE.match(hf_name)
    if not m or m.group(2) not in _LAYER_MAP:
        raise KeyError(f"no GGUF name for {hf_name!r}")
    return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"


@lru_cache(maxsize=2)
def open_gguf(path: str):
    """Memory-mapped reader; cached because opening parses all metadata (~2 s for SmolLM2)."""
    import gguf  # imported lazily: only GGUF users pay for it
    return gguf.GGUFReader(path)


def _dequantize_rows(t, start: int | None = None, end: int | None = None,
                     expert: int | None = None) -> np.ndarray:
    """Dequantize rows [start, end) of a GGUF tensor (numpy row order; of expert `expert`'s matrix
    in a stacked one) to float32."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize
    data = t.data if expert is None else t.data[expert]
    data = data if start is None else data[start:end]
    qt = t.tensor_type
    if qt == Q.F32:
        return np.asarray(data, dtype=np.float32)
    if qt == Q.F16:
        return np.asarray(data).astype(np.float32)
    if qt in (Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K):
        return dequantize(np.asarray(data), qt)
    raise ValueError(f"GGUF tensor {t.name}: quantization {qt.name} is not supported "
                     "(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K-quants)")


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    def __init__(self, path: str, reader=None):
        self.path = path
        self.reader = reader if reader is not None else open_gguf(str(path))
        self.config = ModelConfig.from_gguf(self.reader)
        self.arch = self.reader.fields["general.architecture"].contents()
        self.tensors = {t.name: t for t in self.reader.tensors}
        if "rope_freqs.weight" in self.tensors:
            raise ValueError(f"{path}: GGUF with rope_freqs (llama3 rope scaling) is not supported")
        # The whole file's names, whatever this rank's shard: never load it half-understood.
        check_names(self.tensors, [gguf_name(n) for n in checkpoint_names(self.config)], str(path))

    def fetch(self, name: str, dim: int | None, start: int, end: int) -> torch.Tensor:
        import torch

        gname, expert = gguf_source(name)
        if gname not in self.tensors:
            raise KeyError(f"{self.path}: tensor {gname!r} (for {name}) missing")
        t = self.tensors[gname]
        if dim == 0:
            w = torch.from_numpy(_dequantize_rows(t, start, end, expert).copy())
        else:
            w = torch.from_numpy(_dequantize_rows(t, expert=expert).copy())
            if gname.endswith(".ffn_gate_inp_shexp.weight"):
                w = w.reshape(1, -1)   # llama.cpp writes Qwen2-MoE's [1, H] shared-expert gate as [H]
            if dim is not None:
                w = w.narrow(dim, start, end - start).contiguous()
        if self.arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            # Row slices cover whole heads, so the per-head permutation can be undone locally.
            w = _unpermute(w, w.shape[0] // self.config.head_dim)
        return w

    def fetcher(self) -> Fetch:
        return self.fetch

    def drop_metadata(self) -> None:
        """Free the parsed metadata (the tokenizer's vocabulary and merges: ~100 MiB of small arrays for
        SmolLM2) before the weights load: the tensors need none of it. The shared reader goes out of
        the cache, so a tokenizer loaded later in this process parses the file again."""
        open_gguf.cache_clear()
        self.reader.fields.clear()

"""Model hyper-parameters, read from a HF config.json, GGUF metadata, or a preset."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from disagg_mpi.model.families import (
    HF_ARCHITECTURES,
    QK_NORM,
    QKV_BIAS_ALWAYS,
    check_hf_options,
    gguf_family,
    gguf_moe_fields,
    hf_family,
    moe_fields,
    qkv_bias,
    sliding_window_of,
)

if TYPE_CHECKING:
    import torch


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [2])
    architecture: str = "llama"          # family: a value of model/families.py HF_ARCHITECTURES
    qk_norm: bool = False                # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None = None    # attend to the last `sliding_window` positions only
    # Mixture of experts (Mixtral, Qwen3-MoE); num_experts == 0: a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0       # each expert's FFN width
    norm_topk_prob: bool = False         # renormalize the top-k routing weights (Mixtral: always)
    dense_layers: list[int] = field(default_factory=list)   # layers of an MoE model with a dense MLP
    shared_expert_intermediate_size: int = 0   # Qwen2-MoE: an always-on expert (0: none)
    # The checkpoint's own dtype (config.json), for `dtype: auto`: metadata, not part of the shape.
    torch_dtype: str | None = field(default=None, compare=False)

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        family = hf_family(d)
        check_hf_options(d, family)
        heads = d["num_attention_heads"]
        # transformers 5 moved rope settings into `rope_parameters`; 4.x used
        # `rope_theta` + `rope_scaling`. Accept both.
        rope_params = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or None
        if scaling is None and rope_params.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        eos = d.get("eos_token_id", 2)
        cfg = cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(theta), rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 has q/k/v biases without a config flag.
            attention_bias=qkv_bias(d, family),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []),
            architecture=family, qk_norm=family in QK_NORM,
            sliding_window=sliding_window_of(d, family),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),   # (transformers 5 writes `dtype`)
            **moe_fields(d, family),
        )
        return cfg.checked()

    def checked(self) -> ModelConfig:
        """Refuse what the forward pass does not implement; the config itself otherwise."""
        rope_kind(self)   # raises on an unsupported rope_scaling type
        w = self.sliding_window
        if w is not None and w < 1:
            raise ValueError(f"sliding_window={w} must be >= 1 (or null for full attention)")
        if w is not None and w >= self.max_position_embeddings:
            return self.replace(sliding_window=None)   # the window never binds: full attention
        return self

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json of this family that `from_hf_dict` reads back (used by tests and exports)."""
        arch = {f: a for a, f in HF_ARCHITECTURES.items()}[self.architecture]
        d = {
            "architectures": [arch], "model_type": self.architecture,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "mlp_bias": False, "hidden_act": "silu", "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else self.eos_token_ids,
            "sliding_window": self.sliding_window,
        }
        if self.architecture in QKV_BIAS_ALWAYS:
            d.pop("attention_bias")
        if self.architecture in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe"):
            d["use_sliding_window"] = self.sliding_window is not None
            d["max_window_layers"] = 0
        if self.architecture == "mixtral":
            d.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
        if self.architecture == "qwen3_moe":
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=1, mlp_only_layers=list(self.dense_layers))
        return d

    @classmethod
    def from_gguf(cls, reader) -> ModelConfig:
        def get(key: str, default: Any = None) -> Any:
            f = reader.fields.get(key)
            return f.contents() if f is not None else default

        arch = get("general.architecture", "llama")
        family = gguf_family(arch)
        hidden = int(get(f"{arch}.embedding_length"))
        heads = int(get(f"{arch}.attention.head_count"))
        names = {t.name for t in reader.tensors}
        vocab = get(f"{arch}.vocab_size")
        if vocab is None:
            vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
        head_dim = get(f"{arch}.attention.key_length") or get(f"{arch}.rope.dimension_count") or hidden // heads
        scaling = None
        if get(f"{arch}.rope.scaling.type") in ("llama3",):  # rarely written; llama.cpp bakes rope_freqs
            scaling = {"rope_type": "llama3", "factor": float(get(f"{arch}.rope.scaling.factor", 8.0))}
        eos = get("tokenizer.ggml.eos_token_id", 2)
        n_layers = int(get(f"{arch}.block_count"))
        family, moe = gguf_moe_fields(get, arch, family, names, n_layers)
        return cls(
            vocab_size=int(vocab), hidden_size=hidden,
            intermediate_size=int(get(f"{arch}.feed_forward_length", 0) or 0),   # (0: an MoE without one)
            num_layers=n_layers, num_heads=heads,
            num_kv_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(head_dim), rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            max_position_embeddings=int(get(f"{arch}.context_length", 8192)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            bos_token_id=get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[int(eos)] if eos is not None else [],
            architecture=family, qk_norm=family in QK_NORM, **moe,
        ).checked()

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def rope_kind(cfg: ModelConfig) -> str:
    """The rope_scaling type: default, linear or llama3 (ValueError for any other)."""
    sc = cfg.rope_scaling
    kind = (sc or {}).get("rope_type", (sc or {}).get("type"))
    if kind in (None, "default"):
        return "default"
    if kind not in ("linear", "llama3"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    return kind


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim/2] in float32, as transformers computes them."""
    import torch  # (here, not above: reading a config needs no torch)

    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    sc = cfg.rope_scaling
    kind = rope_kind(cfg)
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend between.
    factor = float(sc["factor"])
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_len = float(sc.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, inv_l)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=6,
                        num_heads=8, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                        max_position_embeddings=2048, tie_word_embeddings=False,
                        bos_token_id=1, eos_token_ids=[2]),
    # Qwen3-MoE in miniature (8 experts, 2 active): the MoE paths and scripts on any machine.
    "tiny-moe": ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=4,
                            num_heads=8, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                            max_position_embeddings=2048, bos_token_id=1, eos_token_ids=[2],
                            architecture="qwen3_moe", qk_norm=True, num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=64, norm_topk_prob=True),
    "smollm2": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                           num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                           max_position_embeddings=8192, tie_word_embeddings=True,
                           bos_token_id=1, eos_token_ids=[2]),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_ids=[128001, 128008, 128009]),
    # Other Llama-family shapes for the decode kernels' tile choice (config.json of each model):
    # head_dim 64 and 128, GQA ratios 1 (MHA), 3, 4 and 7, hidden sizes 2,048 to 4,096.
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=[128001, 128008, 128009]),
    "llama-3.2-3b": ModelConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=[128001, 128008, 128009]),
    "llama-2-7b": ModelConfig(   # multi-head attention: as many KV heads as query heads
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rope_theta=10000.0, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_ids=[2]),
    "qwen2.5-7b": ModelConfig(   # GQA 7, q/k/v biases
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
        num_kv_heads=4, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=True,
        bos_token_id=151643, eos_token_ids=[151645, 151643], architecture="qwen2"),
    "qwen2.5-14b": ModelConfig(   # GQA 5, hidden 5120, 48 layers, q/k/v biases
        vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48, num_heads=40,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=False, attention_bias=True,
        bos_token_id=151643, eos_token_ids=[151645, 151643], architecture="qwen2"),
    "qwen2.5-0.5b": ModelConfig(   # head_dim 64, GQA 7, hidden 896, tied embeddings
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
        bos_token_id=151643, eos_token_ids=[151645, 151643], architecture="qwen2"),
    # Qwen3 shapes (config.json of Qwen/Qwen3-8B and Qwen/Qwen3-30B-A3B): q/k norm, head_dim 128.
    "qwen3-8b": ModelConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_ids=[151645], architecture="qwen3", qk_norm=True),
    "qwen3-30b-a3b": ModelConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32,
        num_kv_heads=4, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_ids=[151645], architecture="qwen3_moe", qk_norm=True, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])

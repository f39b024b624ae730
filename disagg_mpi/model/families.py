"""Which model families we run, and refusing the rest up front, by name.

A checkpoint is accepted only when its architecture is in `HF_ARCHITECTURES`
(config.json) or `GGUF_ARCHITECTURES` (GGUF metadata), every option that
changes the forward pass is one we implement, and its tensor names are exactly
the ones the model consumes (`checkpoint_names`): a norm, bias or rope table
that nothing reads is an error naming it, never silently skipped. The checks
read names only (no tensor data), so every rank and `disagg-mpi validate` can
afford them whatever the rank's TP/PP shard.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# HF `architectures[0]` -> our family name (= the HF model_type it must come with).
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
# GGUF `general.architecture` -> family (`llama` with `llama.expert_count` is Mixtral).
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
                      "qwen2moe": "qwen2_moe"}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")

# Families whose attention has per-head q/k RMSNorm; whose q/k/v biases (never an o_proj bias)
# come without a flag (qwen2) or from `qkv_bias` (qwen2_moe, default true).
QK_NORM = {"qwen3", "qwen3_moe"}
QKV_BIAS_ALWAYS = {"qwen2"}
QWEN_WINDOWS = {"qwen2", "qwen3", "qwen3_moe", "qwen2_moe"}   # use_sliding_window + max_window_layers


def qkv_bias(d: dict[str, Any], family: str) -> bool:
    if family in QKV_BIAS_ALWAYS:
        return True
    if family == "qwen2_moe":
        return bool(d.get("qkv_bias", True))
    return bool(d.get("attention_bias", False))


def _supported_list() -> str:
    return ", ".join(f"{a} (model_type {f})" for a, f in HF_ARCHITECTURES.items())


def hf_family(d: dict[str, Any]) -> str:
    """The family of a HF config dict, from `architectures` (and `model_type`, which must agree)."""
    archs = d.get("architectures") or []
    mtype = d.get("model_type")
    if archs:
        if len(archs) != 1 or archs[0] not in HF_ARCHITECTURES:
            raise ValueError(f"config.json architectures={archs} is not supported; "
                             f"supported: {_supported_list()}")
        family = HF_ARCHITECTURES[archs[0]]
        if mtype is not None and mtype != family:
            raise ValueError(f"config.json architectures={archs} comes with model_type={mtype!r}; "
                             f"expected model_type={family!r}")
        return family
    if mtype not in HF_ARCHITECTURES.values():
        raise ValueError(f"config.json model_type={mtype!r} (no architectures) is not supported; "
                         f"supported: {_supported_list()}")
    return mtype


def gguf_family(arch: str) -> str:
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF general.architecture={arch!r} is not supported; "
                         f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    return GGUF_ARCHITECTURES[arch]


def check_hf_options(d: dict[str, Any], family: str) -> None:
    """Refuse config.json options that would change the forward pass in ways we do not implement."""
    act = d.get("hidden_act", d.get("hidden_activation", "silu"))
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r} is not supported (allowed: 'silu')")
    if d.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=True is not supported (allowed: false)")
    if family not in ("qwen2", "qwen2_moe") and d.get("attention_bias"):
        # Llama/Qwen3 attention_bias also puts a bias on o_proj, which would break exact TP sums.
        raise ValueError(f"config.json attention_bias=True is not supported for {family} "
                         "(it adds an o_proj bias); allowed: false")


def sliding_window_of(d: dict[str, Any], family: str) -> int | None:
    """The attention window every layer uses, None for full attention; refuses mixed layers."""
    n = d["num_hidden_layers"]
    if family == "llama":
        return None   # transformers' Llama has no sliding window: a stray key changes nothing there
    if family in QWEN_WINDOWS:
        window = d.get("sliding_window") if d.get("use_sliding_window") else None
        start = d.get("max_window_layers", 0) or 0
        types = d.get("layer_types") or ["sliding_attention" if window is not None and i >= start
                                         else "full_attention" for i in range(n)]
    else:
        window = d.get("sliding_window")
        types = d.get("layer_types") or ["sliding_attention" if window is not None else "full_attention"] * n
    bad = sorted(set(types) - {"sliding_attention", "full_attention"})
    if bad:
        raise ValueError(f"config.json layer_types holds {bad}; allowed: sliding_attention, full_attention")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not sliding or window is None:
        return None
    if len(sliding) != n:
        raise ValueError(f"config.json mixes sliding-window layers {sliding} (sliding_window={window}) "
                         "with full-attention layers (layer_types / max_window_layers); only all or none "
                         "is supported")
    return int(window)


def moe_fields(d: dict[str, Any], family: str) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from a config.json (empty for a dense family)."""
    n = d["num_hidden_layers"]
    if family == "mixtral":
        return {"num_experts": d["num_local_experts"], "num_experts_per_tok": d["num_experts_per_tok"],
                "moe_intermediate_size": d["intermediate_size"], "norm_topk_prob": True}
    if family not in ("qwen3_moe", "qwen2_moe"):
        return {}
    experts = d.get("num_experts", d.get("num_local_experts"))   # transformers 5 saves the latter
    step, only = d.get("decoder_sparse_step", 1) or 1, set(d.get("mlp_only_layers") or [])
    out = {"num_experts": experts, "num_experts_per_tok": d["num_experts_per_tok"],
           "moe_intermediate_size": d["moe_intermediate_size"],
           "norm_topk_prob": bool(d.get("norm_topk_prob", False)),
           "dense_layers": [i for i in range(n) if i in only or (i + 1) % step != 0]}
    if family == "qwen2_moe":   # a shared expert beside the routed ones, gated by sigmoid(x @ w)
        out["shared_expert_intermediate_size"] = d["shared_expert_intermediate_size"]
    return out


def gguf_moe_fields(get, arch: str, family: str, names: set[str], n_layers: int) -> tuple[str, dict[str, Any]]:
    """(family, ModelConfig's mixture-of-experts fields) from GGUF metadata (`get(key, default)`) and
    tensor names. A layer without a router (`ffn_gate_inp`) has a dense MLP. The top-k weights are
    renormalized as llama.cpp does (Mixtral and Qwen3-MoE yes, Qwen2-MoE no) unless
    `{arch}.expert_weights_norm` says otherwise."""
    experts = int(get(f"{arch}.expert_count", 0) or 0)
    if not experts:
        if family in MOE_FAMILIES:
            raise ValueError(f"GGUF general.architecture={arch!r} without {arch}.expert_count")
        return family, {}
    family = "mixtral" if family == "llama" else family
    if family not in MOE_FAMILIES:
        raise ValueError(f"GGUF {arch}.expert_count={experts}: experts are not supported for "
                         f"general.architecture={arch!r} (allowed: llama, qwen3moe, qwen2moe)")
    ffn = get(f"{arch}.expert_feed_forward_length") or get(f"{arch}.feed_forward_length")
    out = {"num_experts": experts, "num_experts_per_tok": int(get(f"{arch}.expert_used_count")),
           "moe_intermediate_size": int(ffn),
           "norm_topk_prob": bool(get(f"{arch}.expert_weights_norm", family != "qwen2_moe")),
           "dense_layers": [i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in names]}
    if family == "qwen2_moe":
        out["shared_expert_intermediate_size"] = int(get(f"{arch}.expert_shared_feed_forward_length"))
    return family, out


def router_name(cfg, layer: int) -> str:
    block = "block_sparse_moe" if cfg.architecture == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}.gate.weight"


_MIXTRAL_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def expert_name(cfg, layer: int, expert: int, proj: str) -> str:
    """Checkpoint name of expert `expert`'s `proj` (gate_proj, up_proj, down_proj) weight."""
    if cfg.architecture == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL_EXPERT[proj]}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def checkpoint_names(cfg) -> list[str]:
    """Every tensor name (HF naming) a checkpoint of `cfg` must hold: exactly what the model consumes."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for layer in range(cfg.num_layers):
        names += layer_names(cfg, layer)
    return names


def layer_names(cfg, layer: int) -> list[str]:
    p = f"model.layers.{layer}."
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
             p + "self_attn.o_proj.weight"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        names.append(f"{p}self_attn.{proj}.weight")
        if cfg.attention_bias:
            names.append(f"{p}self_attn.{proj}.bias")
    if cfg.qk_norm:
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    projs = ("gate_proj", "up_proj", "down_proj")
    if not cfg.is_moe_layer(layer):
        return names + [f"{p}mlp.{proj}.weight" for proj in projs]
    names.append(router_name(cfg, layer))
    if cfg.shared_expert_intermediate_size:
        names += [f"{p}mlp.shared_expert.{proj}.weight" for proj in projs]
        names.append(f"{p}mlp.shared_expert_gate.weight")
    return names + [expert_name(cfg, layer, e, proj) for e in range(cfg.num_experts) for proj in projs]


def check_names(present: Iterable[str], expected: Iterable[str], source: str, shown: int = 8) -> None:
    """`present` must equal `expected`: name the unexpected tensors first, then the missing ones."""
    present, expected = set(present), set(expected)
    extra = sorted(present - expected)
    if extra:
        more = f" (and {len(extra) - shown} more)" if len(extra) > shown else ""
        raise ValueError(f"{source}: unexpected tensor(s) {extra[:shown]}{more}: nothing in this model "
                         "consumes them (an unsupported variant of the architecture?); refusing to load "
                         "it half-understood")
    missing = sorted(expected - present)
    if missing:
        more = f" (and {len(missing) - shown} more)" if len(missing) > shown else ""
        raise ValueError(f"{source}: tensor(s) {missing[:shown]}{more} missing from the checkpoint")

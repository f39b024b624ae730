"""Which tensor slices a sharded LlamaModel needs, and copying them in.

Loaders only implement `fetch(source_name, dim, start, end) -> Tensor` in HF
names; the plan says which rows/columns this rank's ShardSpec holds. A checkpoint
tensor usually fills one parameter; an MoE expert's gate, up or down weight fills
one slice of a stacked parameter (`WeightSlice.at`), keyed `param[expert][rows]`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from disagg_mpi.model.families import expert_name, router_name


@dataclass(frozen=True)
class WeightSlice:
    source: str              # HF tensor name in the checkpoint
    dim: int | None = None   # None: the whole tensor
    start: int = 0
    end: int = 0
    # Into a stacked parameter [E_local, rows, cols]: (local expert, first row, end row); None: whole.
    at: tuple[int, int, int] | None = None


Fetch = Callable[[str, int | None, int, int], torch.Tensor]


def weight_plan(model) -> dict[str, WeightSlice]:
    """Parameter name -> slice of a checkpoint tensor, for the rank's shard."""
    cfg, d = model.config, model.config.head_dim
    qs, qe = model.q_heads
    ks, ke = model.kv_heads
    i0, i1 = model.ffn_range
    plan: dict[str, WeightSlice] = {}
    if model.is_first:
        plan["model.embed_tokens.weight"] = WeightSlice("model.embed_tokens.weight")
    for layer in range(model.layer_start, model.layer_end):
        p = f"model.layers.{layer}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            plan[p + n] = WeightSlice(p + n)
        for proj, (a, b) in (("q_proj", (qs, qe)), ("k_proj", (ks, ke)), ("v_proj", (ks, ke))):
            names = ["weight", "bias"] if cfg.attention_bias else ["weight"]
            for kind in names:
                n = f"{p}self_attn.{proj}.{kind}"
                plan[n] = WeightSlice(n, 0, a * d, b * d)
        n = p + "self_attn.o_proj.weight"
        plan[n] = WeightSlice(n, 1, qs * d, qe * d)
        if cfg.qk_norm:   # one [head_dim] weight shared by every head: each rank takes it whole
            for n in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
                plan[p + n] = WeightSlice(p + n)
        if cfg.is_moe_layer(layer):
            plan.update(_moe_plan(cfg, layer, model.expert_ffn_range, model.shared_ffn_range,
                                  model.expert_range))
            continue
        for proj in ("gate_proj", "up_proj"):
            n = f"{p}mlp.{proj}.weight"
            plan[n] = WeightSlice(n, 0, i0, i1)
        n = p + "mlp.down_proj.weight"
        plan[n] = WeightSlice(n, 1, i0, i1)
    if model.is_last:
        plan["model.norm.weight"] = WeightSlice("model.norm.weight")
        if not cfg.tie_word_embeddings:
            plan["lm_head.weight"] = WeightSlice("lm_head.weight")
        elif not model.is_first:
            # Tied, but the embedding lives on another stage: keep our own copy.
            plan["lm_head.weight"] = WeightSlice("model.embed_tokens.weight")
    return plan


def _moe_plan(cfg, layer: int, ffn: tuple[int, int], shared: tuple[int, int],
              experts: tuple[int, int]) -> dict[str, WeightSlice]:
    """The router (and shared-expert gate) whole on every rank; each of the rank's experts' FFN
    columns [ffn) into its row of the stacked weights (gate rows, then up rows), the shared
    expert's [shared), like a dense MLP's. The rank's experts are [experts) (all of them unless EP;
    local index e - start): another EP rank's experts are never read here, that rank reads them
    (the checkpoint's names are checked whole, before any shard loads)."""
    p = f"model.layers.{layer}.mlp."
    plan = {p + "gate.weight": WeightSlice(router_name(cfg, layer))}
    f = ffn[1] - ffn[0]
    gate_up, down = p + "experts.gate_up_proj", p + "experts.down_proj"
    for e in range(*experts):
        i = e - experts[0]
        for proj, r0 in (("gate_proj", 0), ("up_proj", f)):
            src = expert_name(cfg, layer, e, proj)
            plan[f"{gate_up}[{i}][{r0}:{r0 + f}]"] = WeightSlice(src, 0, *ffn, at=(i, r0, r0 + f))
        src = expert_name(cfg, layer, e, "down_proj")
        plan[f"{down}[{i}]"] = WeightSlice(src, 1, *ffn, at=(i, 0, cfg.hidden_size))
    if cfg.shared_expert_intermediate_size:
        plan[p + "shared_expert_gate.weight"] = WeightSlice(p + "shared_expert_gate.weight")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            n = f"{p}shared_expert.{proj}.weight"
            plan[n] = WeightSlice(n, 1 if proj == "down_proj" else 0, *shared)
    return plan


def destination(params: dict[str, torch.Tensor], key: str, ws: WeightSlice) -> torch.Tensor:
    """The parameter (or the view of a stacked one) that plan entry `key` fills."""
    p = params[key.split("[", 1)[0]]
    if ws.at is None:
        return p
    e, r0, r1 = ws.at
    return p[e, r0:r1]


def slice_tensor(t: torch.Tensor, dim: int | None, start: int, end: int) -> torch.Tensor:
    return t if dim is None else t.narrow(dim, start, end - start)


@torch.no_grad()
def load_weights(model, fetch: Fetch) -> None:
    params = dict(model.named_parameters())
    for name, ws in weight_plan(model).items():
        t = fetch(ws.source, ws.dim, ws.start, ws.end)
        p = destination(params, name, ws)
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{ws.source}: checkpoint slice has shape {tuple(t.shape)}, "
                             f"model expects {tuple(p.shape)} for {name}")
        p.copy_(t.to(device=p.device, dtype=p.dtype))
    model.tie_weights()

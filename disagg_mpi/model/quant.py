"""Weight-only quantization for CPU decode: int8 per output channel, int4 per group of input columns.

Opt-in (`model.quantization` in the YAML, `ExecutorConfig.quantization`, `load_model(quantization=)`);
full precision stays the default and the exactness reference. The weights are quantized at load time
from the full-precision ones (a GGUF's blocks are dequantized first, then requantized here: one path
for HF and GGUF checkpoints; keeping a GGUF's own Q4/Q8 blocks is a later step).

The matmuls are torch's CPU weight-only kernels, `aten._weight_int8pack_mm` and
`aten._weight_int4pack_mm_for_cpu`. Both take bf16 activations and scales (fp32 ones are refused for
the scales, and run a slow fallback for the activations: 10-20x slower than bf16 in a microbenchmark
at SmolLM2's shapes), so a quantized layer casts its input to bf16 and its output back to the
model's dtype; norms, attention, the residual stream and the embeddings stay in the model's dtype.

int8: w ~= q * s, q in [-127, 127], one bf16 scale per output row (symmetric).
int4: w ~= (q - 8) * s + z per group of `group_size` input columns, q in [0, 15] (asymmetric, min/max),
      the layout gpt-fast and torchao feed the same kernel ([K / group, N, 2] scales and zeros).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from disagg_mpi.model.llama import MLP, Attention

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32
# The layers quantized: every projection of attention and of a dense MLP (the bulk of the weights),
# q/k/v and gate/up fused into one module each (see FUSED).
# Embeddings, norms and MoE experts/routers stay in full precision. lm_head is int8 in both modes
# by default: it is a fifth of SmolLM2's weights (49152 x 576), the default GGUF stores it (tied to the
# embeddings) as Q8_0, and on 1 thread it took a decode step from 37 to 30 ms in int8 mode.
ROW_PARALLEL = ("o_proj", "down_proj")   # TP splits their input columns (see parallel.py)

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def check_quantization(value: str, device: str | torch.device = "cpu") -> str:
    """The value, or ValueError naming `model.quantization`, the value and what is allowed."""
    if value not in QUANTIZATIONS:
        raise ValueError(f"model.quantization={value!r} is not supported; allowed: {', '.join(QUANTIZATIONS)}")
    if value != "none" and torch.device(device).type != "cpu":
        raise ValueError(f"model.quantization={value!r} runs on CPU only (torch's weight-only CPU kernels); "
                         f"device is {torch.device(device).type}: use quantization: none there")
    return value


def int8_weights(w: torch.Tensor, row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scales bf16 [N]) with w ~= q * scales[:, None]. `row_absmax` overrides each row's
    max |w| (a TP shard passes the whole row's, so that its q is a slice of the unsharded q)."""
    amax = w.float().abs().amax(dim=1) if row_absmax is None else row_absmax.float()
    # The kernel takes bf16 scales: round the scale first and quantize against the rounded one.
    s = (amax / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w.float() / s.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), s


def int4_weights(w: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int32 [N, K] in 0..15, scales_and_zeros bf16 [K / group, N, 2]) with
    w[n, k] ~= (q[n, k] - 8) * scale[g, n] + zero[g, n], g = k // group_size."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    q = torch.round((g - zero) / scale + 8).clamp(0, 15).to(torch.int32).reshape(n, k)
    sz = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return q, sz


class Int8Linear(nn.Module):
    """y = x @ (q * s)^T + b through `_weight_int8pack_mm` (bf16 inside, the input's dtype outside)."""

    def __init__(self, linear: nn.Linear, row_absmax: torch.Tensor | None = None):
        super().__init__()
        q, s = int8_weights(linear.weight.data, row_absmax)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x @ dequant(q)^T + b through `_weight_int4pack_mm_for_cpu` (group-wise asymmetric int4)."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        n, k = linear.weight.shape
        if k % group_size or n % 16:
            raise ValueError(f"model.quantization='int4' needs in_features divisible by the group size "
                             f"{group_size} and out_features by 16 (the CPU kernel's packing); this layer is "
                             f"[{n}, {k}]: use quantization: int8")
        q, sz = int4_weights(linear.weight.data, group_size)
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_and_zeros", sz)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size,
                                                        self.scales_and_zeros).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _full_row_absmax(w: torch.Tensor, tp_rank: int, tp_size: int, all_reduce: AllReduce) -> torch.Tensor:
    """max |w| over each whole row of a row-parallel weight split across TP ranks. The group only sums,
    so each rank writes its partial maxima into its own slot of a zero [tp, N] tensor and the sum is the
    gather. A collective: every TP rank calls it for the same layers in the same order (load_model)."""
    slots = torch.zeros(tp_size, w.shape[0], dtype=torch.float32, device=w.device)
    slots[tp_rank] = w.float().abs().amax(dim=1)
    return all_reduce(slots).amax(dim=0)


def _fused(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose rows are the parts' rows in order (bias too): quantizing it row by row (int8)
    or row by row in groups of columns (int4) gives each part's quantized rows, in one kernel call
    (saved ~35 us of ~160 per SmolLM2 layer at batch 1 on one thread)."""
    w = torch.cat([p.weight.data for p in parts])
    out = nn.Linear(w.shape[1], w.shape[0], bias=parts[0].bias is not None, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    if parts[0].bias is not None:
        out.bias = nn.Parameter(torch.cat([p.bias.data for p in parts]), requires_grad=False)
    return out


# (fused name, the parts in row order): Attention._qkv and MLP.forward use the fused module if present.
FUSED = (("qkv_proj", ("q_proj", "k_proj", "v_proj")), ("gate_up_proj", ("gate_proj", "up_proj")))


def _quantize(lin: nn.Linear, name: str, mode: str, shard, group_size: int) -> nn.Module:
    if mode == "int4":
        return Int4Linear(lin, group_size)
    absmax = None
    if shard.tp_size > 1 and name in ROW_PARALLEL:
        absmax = _full_row_absmax(lin.weight.data, shard.tp_rank, shard.tp_size, shard.all_reduce)
    return Int8Linear(lin, absmax)


def quantize_model(model: nn.Module, mode: str, lm_head: bool = True,
                   group_size: int = INT4_GROUP_SIZE) -> nn.Module:
    """Swap the projections of every decoder layer for int8/int4 modules, in place (`mode` 'none': no-op).
    q/k/v become one `qkv_proj`, gate/up one `gate_up_proj` (the separate modules are removed).

    TP: column-parallel weights (q/k/v, gate/up) are quantized row by row, so a shard's q and scales are
    the slices of the unsharded ones. Row-parallel weights (o, down) hold part of each row: int8 takes
    the whole row's max (one collective per layer) for the same reason; int4 groups lie inside a shard
    when the group size divides its columns (Int4Linear checks the shape).
    `lm_head` also quantizes the output projection, in int8 for both modes (the tied embedding lookup
    keeps its full-precision table)."""
    check_quantization(mode, model.device)
    if mode == "none":
        return model
    shard = model.shard
    for layer in model.model.layers.values():
        for parent in (layer.self_attn, layer.mlp):
            if not isinstance(parent, (Attention, MLP)):
                continue   # an MoE block: experts stay in full precision
            for fused, parts in FUSED:
                if all(isinstance(getattr(parent, p, None), nn.Linear) for p in parts):
                    setattr(parent, fused, _quantize(_fused([getattr(parent, p) for p in parts]), fused, mode,
                                                     shard, group_size))
                    for p in parts:
                        delattr(parent, p)
            for name in ROW_PARALLEL:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, _quantize(getattr(parent, name), name, mode, shard, group_size))
    if lm_head and getattr(model, "is_last", False):
        model.lm_head = Int8Linear(model.lm_head)
    model.quantization = mode
    return model

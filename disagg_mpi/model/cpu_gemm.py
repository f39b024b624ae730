"""Projections on CPU through oneDNN with weights prepacked in its blocked layout.

`F.linear` on CPU runs MKL's sgemm, which is slow for the few-row products of a decode step and
does not reach the machine's peak on prefills either. oneDNN with a weight reordered once at load
(the path torch.compile's CPU backend takes for frozen weights) measured, per core on the 2-core
AMD EPYC (Zen 4, AVX-512) dev VM, SmolLM2 shapes, GFLOP/s by thread CPU time:

| rows x (in -> out)  | F.linear | prepacked oneDNN |
| ---                 | ---:     | ---:             |
| 8 x (576 -> 3072)   | 32       | 96               |
| 8 x (1536 -> 576)   | 60       | 88               |
| 1024 x (576 -> 960) | 93       | 106              |
| 1024 x (1536 -> 576)| 92       | 105              |

The packed tensor is opaque (layout `torch._mkldnn`): it replaces the module's dense weight,
which `pack_linear` frees (same memory as before, not twice). Results differ from MKL's by
accumulation order only (fp32 rounding, ~1e-6 relative); greedy output is checked against
transformers by the executor tests. `DISAGG_CPU_PACKED_GEMM=0` keeps `F.linear`.

The lm_head keeps its dense weight (it is tied to the embedding table, which a lookup needs):
`dense_linear` runs it through oneDNN unpacked, 1.3-1.4x MKL at 8-32 rows.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import torch
from torch import nn

from disagg_mpi.knobs import env_value

# Row count oneDNN picks the packed layout for; any row count runs on it (decode steps are
# 1-64 rows, prefills hundreds): packing for 8 or for 1024 rows measured within 3% at either size.
_ROWS_HINT = 8


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Prepacked oneDNN projections apply here: a CPU, float32 or bfloat16, and the knob on."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and bool(env_value("DISAGG_CPU_PACKED_GEMM")))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] reordered into oneDNN's blocked layout for this CPU (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, in] @ W.T (+ bias) with W packed by `pack`."""
    if x.shape[0] == 0:   # (oneDNN refuses empty inputs)
        return x.new_zeros(0, packed.size(0))
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ weight.T through oneDNN with the weight left dense (the tied lm_head)."""
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[0])
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")


def pack_linears(mods: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One packed weight for the row-wise concatenation of `mods` (q/k/v, gate/up: one GEMM), plus
    their concatenated bias (or None); then each module's dense weight is freed: the packed copy is
    the only one (the module is no longer called directly)."""
    w = torch.cat([m.weight.detach() for m in mods]) if len(mods) > 1 else mods[0].weight.detach()
    packed = pack(w)
    biases = [m.bias for m in mods]
    bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
    del w
    for m in mods:
        m.weight.data = m.weight.data.new_empty(0)
        if m.bias is not None:
            m.bias.data = m.bias.data.new_empty(0)
    return packed, bias


def return_freed_memory() -> bool:
    """Give the pages of freed heap memory back to the system (glibc's `malloc_trim`): after packing,
    the dense weights' memory is free but stays in the process (SmolLM2: 107 MiB of RSS), and a
    rank's RSS is what the machine has to hold. False where there is no glibc (nothing done)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):
        return False
    if trim is None:
        return False
    trim(0)
    return True

"""Which tile the fused decode kernel (`triton_kernels.rope_write_decode_attention`) runs with.

Pure: the choice depends on the batch, the KV heads, head_dim and the part's SM count, and is
tested without Triton or a GPU (tests/unit/test_decode_tile.py).
"""
from __future__ import annotations

import functools

import torch

_SMS: dict[int, int] = {}


STAGES = 3  # Triton's default pipeline depth on NVIDIA parts: kept where no sweep says otherwise


def decode_tile(b: int, n_kv: int, d: int, device: torch.device, itemsize: int = 2) -> tuple[int, int, int]:
    """(tokens per tile, warps, pipeline stages) of the fused decode kernel for a batch of b sequences.

    Its grid is one program per (sequence, KV head), each walking the context tile by tile.
    Swept on the H200 (scripts/probe_limits.py, 8B shape, bf16, 32 layers replayed from a CUDA
    graph, us per layer; docs/benchmarks.md has the table). Two stages beat Triton's default
    three at every batch size:
    - more programs than twice the SMs (batch 64): 64 tokens, 2 warps: 41.6 / 67.3 us at contexts
      of 576 / 1,024 against 44.8 / 74.0 for the earlier 32 tokens, 4 warps, 3 stages; at 160
      tokens the two are within 1 us.
    - between (batch 32): 128 tokens, 4 warps: 25.3 us against 30.4 for 64 tokens, 3 stages.
    - fewer programs than SMs: long tiles, few serial steps. Batch 1: 256 tokens, 4 warps: 12.9 /
      29.0 us at 576 / 2,048 tokens against 13.8 / 31.7 for 8 warps, 3 stages; batch 8 the same
      within 0.1 us. head_dim <= 64 (SmolLM2) keeps what the H100 chose (128 tokens, 4 warps
      gave 4.8 / 9.1 us against 5.8 / 13.8 with 64 tokens) and three stages: not swept.
    """
    sms = _sm_count(device)
    programs = b * n_kv
    if d <= 64:
        if programs < sms:
            block_n, warps, stages = 128, 4, STAGES
        else:
            block_n, warps, stages = (32, 4, STAGES) if programs >= 2 * sms else (64, 4, STAGES)
    elif programs >= 2 * sms:
        block_n, warps, stages = 64, 2, 2
    elif programs >= sms:
        block_n, warps, stages = 128, 4, 2
    else:
        block_n, warps, stages = 256, 4, 2
    # A K or V tile over 64 KiB does not fit shared memory with the pipelined copies
    # (fp32, head_dim 128, 256 tokens asked for 289 KB on the H100's 227 KB).
    while block_n * d * itemsize > 64 << 10:
        block_n //= 2
    return block_n, warps, stages


MAX_SPLITS = 16


def decode_splits(b: int, n_kv: int, device: torch.device) -> int:
    """How many parts the fused decode kernel splits each context into (flash-decoding).

    One program per (sequence, KV head) leaves most SMs idle at small batches: a batch of one
    on an 8-KV-head model runs 8 programs on 132 SMs, and each walks its whole context alone
    (H100, 2,000-token context, batch 1: the 3B Llama shape's step 3.6 -> 3.2 ms split, the
    1B's 1.7 -> 1.4 ms; no change at 192 tokens). Splitting the context over more programs, then
    combining their partial softmaxes, fills the part; with at least half the SMs busy
    without it, the combine's extra launch is not worth it. Fixed per batch size (not per
    context), so a captured CUDA graph holds for every context length.
    """
    programs = b * n_kv
    if _splits_off() or 2 * programs > _sm_count(device):
        return 1
    return max(1, min(MAX_SPLITS, _sm_count(device) // programs))


def split_tile(d: int, itemsize: int = 2) -> tuple[int, int, int]:
    """(tokens per tile, warps, stages) of a split decode program: short tiles, as each split
    walks only a part of the context (a 640-token context in 16 splits: 40 tokens each)."""
    block_n = 64 if d <= 128 else 32
    while block_n * d * itemsize > 64 << 10:
        block_n //= 2
    return block_n, 4, 2


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132   # the interpreter (CPU) is taken as an H100-sized part
    sms = _SMS.get(device.index or 0)
    if sms is None:
        sms = _SMS[device.index or 0] = torch.cuda.get_device_properties(device).multi_processor_count
    return sms


@functools.cache
def _splits_off() -> bool:
    from disagg_mpi.knobs import env_value  # read once: this runs per layer of an eager step
    return env_value("DISAGG_DECODE_SPLITS") == "off"

"""Tile choice of the fused decode kernel (pure: no Triton needed)."""

import torch

from disagg_mpi.model.decode_tiles import STAGES, decode_tile

CPU = torch.device("cpu")  # taken as an H100-sized part (132 SMs): the interpreter's case


def test_few_programs_take_long_tiles():
    assert decode_tile(1, 3, 64, CPU) == (128, 4, STAGES)   # SmolLM2 shape, batch 1
    assert decode_tile(1, 8, 128, CPU) == (256, 4, 2)       # Llama-3.1-8B shape, batch 1
    assert decode_tile(16, 8, 128, CPU) == (256, 4, 2)      # 128 programs < 132 SMs


def test_many_programs_take_short_tiles():
    assert decode_tile(64, 8, 128, CPU) == (64, 2, 2)       # 512 programs >= 2 x 132
    assert decode_tile(32, 8, 128, CPU) == (128, 4, 2)      # in between
    assert decode_tile(64, 3, 64, CPU) == (64, 4, STAGES)   # 192 programs, head_dim 64
    assert decode_tile(128, 3, 64, CPU) == (32, 4, STAGES)  # 384 programs, head_dim 64


def test_tiles_fit_shared_memory_in_fp32():
    assert decode_tile(1, 8, 128, CPU, itemsize=4) == (128, 4, 2)   # 256 x 128 x 4 B would not fit
    assert decode_tile(32, 8, 128, CPU, itemsize=4) == (128, 4, 2)  # 128 x 128 x 4 B = 64 KiB fits
    assert decode_tile(1, 3, 64, CPU, itemsize=4) == (128, 4, STAGES)

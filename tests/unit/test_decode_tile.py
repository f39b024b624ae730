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


def test_small_batches_split_the_context_to_fill_the_part():
    from disagg_mpi.model.decode_tiles import MAX_SPLITS, decode_splits
    assert decode_splits(1, 8, CPU) == MAX_SPLITS     # 8 programs on 132 SMs: 16 parts each
    assert decode_splits(4, 8, CPU) == 4               # 32 programs: 4 parts
    assert decode_splits(8, 8, CPU) == 2               # 64 programs: 2 parts (128 busy)
    assert decode_splits(9, 8, CPU) == 1               # 72 programs: more than half the SMs already
    assert decode_splits(64, 8, CPU) == 1
    assert decode_splits(1, 3, CPU) == MAX_SPLITS      # SmolLM2 shape


def test_split_tiles_are_short_and_fit_shared_memory():
    from disagg_mpi.model.decode_tiles import split_tile
    assert split_tile(64) == (64, 4, 2)
    assert split_tile(128) == (64, 4, 2)
    assert split_tile(128, itemsize=4) == (64, 4, 2)    # 64 x 128 x 4 B = 32 KiB
    assert split_tile(256, itemsize=4)[0] * 256 * 4 <= 64 << 10

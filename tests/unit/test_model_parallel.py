import pytest

from disagg_mpi.model.config import preset
from disagg_mpi.model.parallel import (
    check_gqa_consistent,
    even_layer_split,
    kv_head_range,
    kv_heads_per_rank,
    layer_range,
    q_head_range,
    validate_split,
)


@pytest.mark.parametrize("tp,kv", [(1, 3), (3, 3), (1, 8), (2, 8), (4, 8), (8, 8)])
def test_kv_ranges_partition(tp, kv):
    ranges = [kv_head_range(r, tp, kv) for r in range(tp)]
    heads = [h for s, e in ranges for h in range(s, e)]
    assert heads == list(range(kv))
    assert all(e - s == kv_heads_per_rank(kv, tp) for s, e in ranges)


@pytest.mark.parametrize("tp,kv", [(4, 2), (8, 2), (16, 8), (6, 3)])
def test_kv_ranges_duplicated(tp, kv):
    ranges = [kv_head_range(r, tp, kv) for r in range(tp)]
    assert all(e - s == 1 for s, e in ranges)
    assert [s for s, _ in ranges] == [r // (tp // kv) for r in range(tp)]
    assert kv_heads_per_rank(kv, tp) == 1


@pytest.mark.parametrize("tp,h", [(1, 9), (3, 9), (2, 8), (8, 32)])
def test_q_ranges_partition(tp, h):
    heads = [x for r in range(tp) for x in range(*q_head_range(r, tp, h))]
    assert heads == list(range(h))


def test_bad_tp_raises():
    with pytest.raises(ValueError, match="tp=3"):
        kv_head_range(0, 3, 8)
    with pytest.raises(ValueError, match="divisible"):
        q_head_range(0, 2, 9)
    with pytest.raises(ValueError, match="out of range"):
        kv_head_range(4, 4, 8)


def test_gqa_consistency():
    for tp in (1, 2, 4, 8):
        for r in range(tp):
            check_gqa_consistent(r, tp, 8, 2)
    for tp in (1, 3, 9):
        for r in range(tp):
            check_gqa_consistent(r, tp, 9, 3)


def test_layer_split():
    assert even_layer_split(30, 4) == [8, 8, 7, 7]
    assert even_layer_split(6, 1) == [6]
    split = even_layer_split(30, 4)
    assert [layer_range(s, split) for s in range(4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]
    with pytest.raises(ValueError):
        even_layer_split(3, 4)
    with pytest.raises(ValueError):
        layer_range(4, split)


def test_validate_split():
    smol = preset("smollm2")
    assert validate_split(smol, 3, 2) == [15, 15]
    assert validate_split(smol, 1, 3, [10, 10, 10]) == [10, 10, 10]
    with pytest.raises(ValueError, match="num_heads=9"):
        validate_split(smol, 2, 1)
    with pytest.raises(ValueError, match="sum to num_layers"):
        validate_split(smol, 1, 2, [10, 10])
    with pytest.raises(ValueError, match="3 stages but pp=2"):
        validate_split(smol, 1, 2, [10, 10, 10])
    with pytest.raises(ValueError, match="exceeds num_layers"):
        validate_split(preset("tiny"), 1, 7)
    big = preset("llama-3.1-8b")
    for tp in (1, 2, 4, 8, 16, 32):
        validate_split(big, tp, 1)
    with pytest.raises(ValueError, match="tp=64"):
        validate_split(big, 64, 1)
    with pytest.raises(ValueError, match="intermediate_size"):
        validate_split(preset("tiny").replace(intermediate_size=250), 4, 1)

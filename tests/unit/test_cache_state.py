"""Tests of CacheState: validation, sharding geometry, wire format."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from disagg_mpi.transfer import CacheState
from disagg_mpi.transfer.cache_state import even_layer_split


def test_even_split_matches_model_convention() -> None:
    assert even_layer_split(30, 4) == (8, 8, 7, 7)
    assert even_layer_split(6, 4) == (2, 2, 1, 1)
    assert CacheState.create(30, 3, 64, 16, "float16", 1, 4).layer_split == (8, 8, 7, 7)


@pytest.mark.parametrize("kwargs,words", [
    ({"tp_size": 3}, ("tp_size=3", "num_kv_heads=2", "[1, 2]")),
    ({"tp_size": 5}, ("tp_size=5",)),
    ({"pp_size": 7}, ("pp_size=7", "1..6")),
    ({"dtype": "int8"}, ("dtype='int8'", "bfloat16", "float16", "float32")),
    ({"head_dim": 0}, ("head_dim=0", ">= 1")),
    ({"block_size": -16}, ("block_size=-16",)),
    ({"pp_size": 2, "layer_split": (2, 3)}, ("layer_split=[2, 3]", "num_layers=6")),
    ({"pp_size": 2, "layer_split": (6, 0)}, ("layer_split=[6, 0]",)),
    ({"pp_size": 2, "layer_split": (6,)}, ("layer_split=[6]", "2 integers")),
])
def test_validation_names_field_value_allowed(kwargs, words) -> None:
    base = {"num_layers": 6, "num_kv_heads": 2, "head_dim": 64, "block_size": 16, "dtype": "float16"}
    with pytest.raises(ValueError) as err:
        CacheState.create(**(base | kwargs))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="layer_split"):
        CacheState(6, 2, 64, 16, "float16", 1, 2, (3, 2))


def test_geometry_with_duplicated_heads() -> None:
    st = CacheState.create(6, 2, 64, 16, "bfloat16", tp_size=4, pp_size=2, layer_split=(1, 5))
    assert st.world_size == 8 and st.local_kv_heads == 1
    assert [st.kv_head_range(r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert st.layer_range(0) == (0, 1) and st.layer_range(1) == (1, 6)
    for rank in range(st.world_size):
        assert st.rank_of(*st.coords(rank)) == rank
    assert st.coords(5) == (1, 1)
    # stage 1: 5 layers * K,V * 1 head * 64 * 2 bytes
    assert st.bytes_per_token_per_rank(5) == 5 * 2 * 1 * 64 * 2
    assert st.bytes_per_token_per_rank(0) == 1 * 2 * 1 * 64 * 2


def test_geometry_split_heads() -> None:
    st = CacheState.create(30, 3, 64, 16, "float32", tp_size=3)
    assert [st.kv_head_range(r) for r in range(3)] == [(0, 1), (1, 2), (2, 3)]
    st1 = CacheState.create(6, 4, 8, 16, "float32", tp_size=2)
    assert st1.kv_head_range(1) == (2, 4) and st1.local_kv_heads == 2
    assert st1.bytes_per_token_per_rank(1) == 6 * 2 * 2 * 8 * 4


@pytest.mark.parametrize("call,arg", [("layer_range", 2), ("kv_head_range", -1), ("coords", 4)])
def test_out_of_range_arguments(call: str, arg: int) -> None:
    st = CacheState.create(6, 2, 64, 16, "float16", tp_size=2, pp_size=2)
    with pytest.raises(ValueError, match="allowed"):
        getattr(st, call)(arg)


def test_dtype_names_are_normalized() -> None:
    st = CacheState.create(6, 2, 64, 16, "torch.bfloat16")
    assert st.dtype == "bfloat16" and st.itemsize == 2


def test_frozen_and_hashable() -> None:
    a = CacheState.create(6, 2, 64, 16, "float16", 2, 2)
    b = CacheState.create(6, 2, 64, 16, "float16", 2, 2, [3, 3])
    assert a == b and hash(a) == hash(b)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.tp_size = 1  # type: ignore[misc]


def test_msgpack_round_trip() -> None:
    st = CacheState.create(30, 3, 64, 32, "bfloat16", 3, 4)
    wire = msgpack.packb(st.to_dict())
    assert CacheState.from_dict(msgpack.unpackb(wire)) == st


def test_from_dict_accepts_uniform_per_layer_lists() -> None:
    d = CacheState.create(4, 2, 64, 16, "float16").to_dict()
    d |= {"num_kv_heads": [2] * 4, "dtype": ["float16"] * 4}
    assert CacheState.from_dict(d).num_kv_heads == 2


@pytest.mark.parametrize("field,value,words", [
    ("num_kv_heads", [2, 2, 4, 2], ("num_kv_heads", "[2, 2, 4, 2]", "uniform")),
    ("dtype", ["float16", "bfloat16", "float16", "float16"], ("dtype", "uniform")),
    ("num_kv_heads", [2, 2], ("num_kv_heads", "2 entries", "num_layers=4")),
])
def test_from_dict_rejects_non_uniform_layers(field, value, words) -> None:
    d = CacheState.create(4, 2, 64, 16, "float16").to_dict() | {field: value}
    with pytest.raises(ValueError) as err:
        CacheState.from_dict(d)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_from_dict_missing_field() -> None:
    d = CacheState.create(4, 2, 64, 16, "float16").to_dict()
    del d["head_dim"]
    with pytest.raises(ValueError, match="head_dim"):
        CacheState.from_dict(d)

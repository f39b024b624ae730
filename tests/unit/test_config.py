"""Topology validation: every error names the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from disagg_mpi.config import ConfigError, load_topology, parse_topology, validate_against_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _ex(*ranks, **kw):
    return {"participant_ids": list(ranks), **kw}


def _tc():
    return {"cache_transceiver_config": {"enable_cache_transceiver": True}}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    topo = load_topology(path)
    assert topo.world_size == 1 + sum(e.size for e in topo.executors)


def test_world_sizes_of_smollm2_configs():
    assert load_topology(CONFIGS / "smollm2-agg.yaml").world_size == 2
    assert load_topology(CONFIGS / "smollm2-1ctx-1gen.yaml").world_size == 3
    assert load_topology(CONFIGS / "smollm2-2ctx-1gen.yaml").world_size == 4
    assert load_topology(CONFIGS / "smollm2-1ctx-2gen.yaml").world_size == 4


@pytest.mark.parametrize("data,needle", [
    ({"generation_executors": [_ex(1)], "bogus": 1}, "bogus: unknown key"),
    ({"generation_executors": [_ex(1, 2)]}, "list exactly 1 ranks"),
    ({"generation_executors": [_ex(0)]}, "rank 0, which is the orchestrator"),
    ({"generation_executors": [_ex(1), _ex(1)]}, "rank 1 is in both"),
    ({"generation_executors": [_ex(2)]}, "ranks [1] are used by no executor"),
    ({"generation_executors": [_ex(1, device_ids=[0, 1])]}, "device_ids [0, 1] has 2 entries"),
    ({"generation_executors": [_ex(1)], "router": "fancy"}, "router.policy: value 'fancy' is not allowed"),
    ({"generation_executors": [_ex(1, 2, pipeline_parallel_size=2, layer_split=[1])]}, "layer_split"),
    ({"generation_executors": [_ex(1, kv_cache={"block_size": 0})]}, "kv_cache.block_size"),
    ({"generation_executors": []}, "generation_executors"),
    ({"context_executors": [_ex(1, cache_transceiver_config={"enable_cache_transceiver": False})],
      "generation_executors": [_ex(2)]},
     "context_executors[0].cache_transceiver_config.enable_cache_transceiver is false"),
    ({"context_executors": [_ex(1, cache_transceiver_config={"comm_type": "UCX"})],
      "generation_executors": [_ex(2, **_tc())]}, "not available in this build"),
    ({"context_executors": [_ex(1, cache_transceiver_config={"lease_seconds": 1, "keep_seconds": 2})],
      "generation_executors": [_ex(2, **_tc())]}, "keep_seconds 2 is too long"),
    ({"model": {"dtype": "int3"}, "generation_executors": [_ex(1)]}, "model.dtype"),
    ([1, 2], "must be a mapping"),
])
def test_bad_topologies_name_the_problem(data, needle):
    with pytest.raises(ConfigError) as err:
        parse_topology(data)
    assert needle in str(err.value)


@pytest.mark.parametrize("tp,pp,split,needle", [
    (2, 1, None, "does not divide the model's 9 attention heads"),
    (1, 31, None, "exceeds the model's 30 layers"),
    (1, 2, [10, 10], "summing to the model's 30 layers"),
])
def test_layouts_the_model_cannot_take(tp, pp, split, needle):
    ranks = list(range(1, tp * pp + 1))
    topo = parse_topology({"generation_executors": [
        _ex(*ranks, tensor_parallel_size=tp, pipeline_parallel_size=pp, layer_split=split)]})
    with pytest.raises(ConfigError, match="generation_executors\\[0\\]") as err:
        validate_against_model(topo, num_heads=9, num_kv_heads=3, num_layers=30, intermediate_size=1536)
    assert needle in str(err.value)


def test_transceiver_is_on_by_default_only_when_disaggregated():
    """Leaving cache_transceiver_config out of a disaggregated topology means enabled (what the docs
    promise and a user of a 1ctx-1gen file expects); an aggregated executor needs no transceiver."""
    disagg = parse_topology({"context_executors": [_ex(1)], "generation_executors": [_ex(2)]})
    for ex in disagg.executors:
        cfg = ex.executor_config("float32").cache_transceiver_config
        assert cfg.enable_cache_transceiver and cfg.comm_type.value == "MPI"
    agg = parse_topology({"generation_executors": [_ex(1)]})
    assert not agg.executors[0].executor_config("float32").cache_transceiver_config.enable_cache_transceiver
    # a Topology built from ExecutorSpec objects gets the same default
    from disagg_mpi.config import ExecutorSpec, Topology

    built = Topology(context_executors=[ExecutorSpec(participant_ids=[1])],
                     generation_executors=[ExecutorSpec(participant_ids=[2])])
    assert all(e.cache_transceiver_config.enable_cache_transceiver for e in built.executors)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_topology(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("generation_executors: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_topology(bad)


from hypothesis import given, settings
from hypothesis import strategies as st

_json = st.recursive(st.none() | st.booleans() | st.integers(-5, 20) | st.text(max_size=6),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=20)
_executor = st.fixed_dictionaries({"participant_ids": st.lists(st.integers(-1, 6), max_size=4)},
                                  optional={"tensor_parallel_size": _json, "device_ids": _json,
                                            "kv_cache": _json, "bogus": _json})


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "model": _json, "router": _json, "server": _json,
    "context_executors": st.lists(_executor, max_size=2) | _json,
    "generation_executors": st.lists(_executor, max_size=2) | _json}))
def test_any_yaml_gives_a_topology_or_a_clear_config_error(data):
    try:
        topo = parse_topology(data)
    except ConfigError as err:
        assert str(err).startswith("invalid topology")
    else:
        assert topo.world_size >= 2


def test_prefill_chunk_tokens_reaches_the_executor_config_and_is_checked():
    topo = parse_topology({"generation_executors": [_ex(1, max_num_tokens=4096, prefill_chunk_tokens=512)]})
    assert topo.executors[0].executor_config("float32").prefill_chunk_tokens == 512
    assert parse_topology({"generation_executors": [_ex(1)]}).executors[0].executor_config(
        "float32").prefill_chunk_tokens is None  # unset: up to max_num_tokens, as before
    with pytest.raises(ConfigError, match="prefill_chunk_tokens"):
        parse_topology({"generation_executors": [_ex(1, prefill_chunk_tokens=0)]})

"""Expert parallelism: the layout (pure), its refusals by name, each rank reading only its own
experts, and EP shards (ranks in threads, the all-reduce in rank order) decoding as transformers
does for every MoE family. The mpiexec runs (EP beside TP, disaggregated and aggregated) are in
tests/mpi/test_expert_parallel.py.
"""
import pytest
import torch

from disagg_mpi.model import ShardSpec, load_model, load_model_config
from disagg_mpi.model.expert_parallel import (
    allowed_ep,
    check_ep,
    describe_layout,
    expert_ffn_range,
    expert_range,
)
from disagg_mpi.model.families import checkpoint_names
from disagg_mpi.model.hf_loader import HFCheckpoint
from disagg_mpi.model.llama import LlamaModel
from disagg_mpi.model.parallel import validate_split
from disagg_mpi.model.weights import load_weights
from tests.hf_folder import family_checkpoint
from tests.oracle import hf_greedy

pytest.importorskip("transformers")

MOE = ["mixtral", "qwen3-moe", "qwen2-moe"]   # 4, 8, 8 experts; FFN 128, 32, 32; Qwen2-MoE: a shared expert


# ---- the layout (pure) ---------------------------------------------------------------------------

@pytest.mark.parametrize("tp,ep,experts,ffn", [(t, e, n, f) for t in (1, 2, 4, 8) for e in (1, 2, 4, 8)
                                               if t % e == 0 for n in (4, 8, 16) if n % e == 0
                                               for f in (32, 96)])
def test_every_expert_column_on_exactly_one_rank(tp, ep, experts, ffn):
    """Over the TP ranks, each (expert, FFN column) is held once: the all-reduce sums each
    expert's whole contribution exactly once."""
    held: dict[tuple[int, int], int] = {}
    for r in range(tp):
        e0, e1 = expert_range(r, tp, ep, experts)
        f0, f1 = expert_ffn_range(r, tp, ep, ffn)
        assert e1 - e0 == experts // ep and f1 - f0 == ffn * ep // tp
        for e in range(e0, e1):
            for c in range(f0, f1):
                held[e, c] = held.get((e, c), 0) + 1
    assert held == {(e, c): 1 for e in range(experts) for c in range(ffn)}


def test_contiguous_ranks_share_a_range():
    assert [expert_range(r, 4, 2, 8) for r in range(4)] == [(0, 4), (0, 4), (4, 8), (4, 8)]
    assert [expert_ffn_range(r, 4, 2, 32) for r in range(4)] == [(0, 16), (16, 32), (0, 16), (16, 32)]
    assert [expert_range(r, 4, 4, 8) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert expert_range(3, 4, 1, 8) == (0, 8) and expert_ffn_range(3, 4, 1, 32) == (24, 32)


def test_allowed_and_refused_values():
    assert allowed_ep(4, 8) == [1, 2, 4] and allowed_ep(4, 6) == [1, 2] and allowed_ep(6, 4) == [1, 2]
    assert allowed_ep(4, 8, moe_ffn=6) == [2, 4]   # ep 1 would split a width of 6 four ways
    check_ep(4, 2, 8, 32)
    check_ep(2, 1, 0, 0)   # ep 1 on a dense model: nothing to check
    for args, needle in [((4, 3, 12, 32), (r"expert_parallel_size=3 does not divide tensor_parallel_size=4.*"
                                          r"allowed: \[1, 2, 4\]")),
                         ((4, 4, 6, 32), r"does not divide the model's 6 experts.*allowed: \[1, 2\]"),
                         ((4, 2, 8, 33), r"split tp/ep = 2 ways, which does not divide its FFN width 33"),
                         ((2, 2, 0, 0), r"expert_parallel_size=2 needs a mixture-of-experts model.*allowed: 1"),
                         ((2, 0, 8, 32), r"expert_parallel_size=0 must be >= 1")]:
        with pytest.raises(ValueError, match=needle):
            check_ep(*args)


def test_validate_split_and_model_refuse_bad_ep():
    cfg = load_model_config(str(family_checkpoint("mixtral")))
    validate_split(cfg, 2, 1, ep=2)
    with pytest.raises(ValueError, match="does not divide the model's 6 experts"):
        validate_split(cfg.replace(num_experts=6), 4, 1, ep=4)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        load_model("random:tiny", shard=ShardSpec(0, 2, all_reduce=lambda x: x, ep_size=2))


def test_describe_layout():
    assert describe_layout(2, 2, 8, 32, [[1, 2]]) == \
        "EP=2 over TP=2: experts 0-3 on rank 1; experts 4-7 on rank 2 (each expert whole)"
    assert describe_layout(4, 2, 8, 32, [[1, 2, 3, 4], [5, 6, 7, 8]]) == \
        ("EP=2 over TP=4: experts 0-3 on ranks 1,2,5,6; experts 4-7 on ranks 3,4,7,8 "
         "(each expert's FFN (32) split 2 ways)")


# ---- loading: each rank reads only its own experts ---------------------------------------------------

@pytest.mark.parametrize("tp,ep", [(2, 2), (4, 2)])
def test_each_rank_reads_only_its_experts(tp, ep):
    """A rank fetches its own experts' tensors and none of another's; over the ranks every tensor of
    the checkpoint is read (none left unconsumed), each expert's by its EP group only."""
    folder = family_checkpoint("qwen3-moe")
    seen: set[str] = set()
    for r in range(tp):
        ckpt = HFCheckpoint(folder)
        fetched: list[str] = []

        def fetch(name, dim, start, end, ckpt=ckpt, fetched=fetched):
            fetched.append(name)
            return ckpt.fetch(name, dim, start, end)
        shard = ShardSpec(r, tp, all_reduce=lambda x: x, ep_size=ep)
        model = LlamaModel.empty(ckpt.config, shard)
        load_weights(model, fetch)
        e0, e1 = expert_range(r, tp, ep, ckpt.config.num_experts)
        ids = {int(n.split(".experts.")[1].split(".")[0]) for n in fetched if ".experts." in n}
        assert ids == set(range(e0, e1)) and e1 - e0 == ckpt.config.num_experts // ep
        assert model.model.layers["0"].mlp.experts.gate_up_proj.shape[0] == e1 - e0
        seen.update(fetched)
    assert seen == set(checkpoint_names(ckpt.config))


def test_a_tensor_no_rank_consumes_is_still_refused_under_ep(tmp_path):
    """The names check stays whole-checkpoint under EP: an expert beyond the model's count (which no
    rank's range holds) is refused by name, on every rank, before any weight loads."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(family_checkpoint("qwen3-moe"), folder)
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.0.mlp.experts.8.gate_proj.weight"] = sd["model.layers.0.mlp.experts.7.gate_proj.weight"].clone()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for r in range(2):
        with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.layers.0.mlp.experts.8.gate_proj"):
            load_model(str(folder), shard=ShardSpec(r, 2, all_reduce=lambda x: x, ep_size=2))


# ---- EP shards decode as transformers does -----------------------------------------------------

def _grid(folder, tp: int, ep: int, stages=((0, 2), (2, 4))):
    from tests.unit.test_model_sharding import ThreadAllReduce

    out = []
    for l0, l1 in stages:
        red = ThreadAllReduce(tp)
        out.append([load_model(str(folder), shard=ShardSpec(r, tp, l0, l1, red.for_rank(r), ep_size=ep))
                    for r in range(tp)])
    return out


@pytest.mark.parametrize("name,tp,ep", [("mixtral", 2, 2), ("qwen3-moe", 2, 2), ("qwen2-moe", 2, 2),
                                        ("mixtral", 4, 4), ("qwen3-moe", 4, 2)])
def test_expert_parallel_equals_transformers(name, tp, ep):
    """EP (x PP=2) over the MoE checkpoint, ranks in threads: greedy tokens equal transformers'."""
    from tests.paged_generate import greedy_generate
    from tests.unit.test_model_sharding import grid_forward_fn

    folder = family_checkpoint(name)
    cfg = load_model_config(str(folder))
    grid = _grid(folder, tp, ep)
    moe = grid[0][-1].model.layers["0"].mlp
    assert moe.expert_range == expert_range(tp - 1, tp, ep, cfg.num_experts)
    gate_up = moe.experts.gate_up_proj   # stacked [E_local, 2F, H]: gate rows, then up rows
    assert gate_up.shape[0] == cfg.num_experts // ep
    assert gate_up.shape[1] == 2 * cfg.moe_intermediate_size * ep // tp
    prompts = [[5, 17, 300, 42, 7, 99, 100, 3, 250], [11, 12, 13]]   # as grid_forward_fn's pool is sized
    assert greedy_generate(grid_forward_fn(grid), prompts, 8, 4) == hf_greedy(prompts, 8, folder, None)


def test_expert_parallel_has_teeth():
    """A rank that skipped its EP peers' experts without the all-reduce summing them back would
    differ: zeroing one rank's experts changes the tokens."""
    from tests.paged_generate import greedy_generate
    from tests.unit.test_model_sharding import grid_forward_fn

    folder = family_checkpoint("qwen3-moe")
    grid = _grid(folder, 2, 2)
    with torch.no_grad():
        for stage in grid:
            for layer in stage[1].model.layers.values():
                for p in getattr(layer.mlp, "experts", torch.nn.Module()).parameters():
                    p.zero_()
    prompts = [[5, 17, 300, 42, 7, 99, 100, 3, 250], [11, 12, 13]]
    assert greedy_generate(grid_forward_fn(grid), prompts, 8, 4) != hf_greedy(prompts, 8, folder, None)


# ---- the YAML field and `disagg-mpi validate` ------------------------------------------------------

def _validate(tmp_path, model: str, ep: int, tp: int = 2, pp: int = 1):
    import yaml
    from click.testing import CliRunner

    from disagg_mpi.cli.slurm import validate

    n = tp * pp
    topo = {"model": {"path": model},
            "context_executors": [{"participant_ids": list(range(1, 1 + n)), "tensor_parallel_size": tp,
                                   "pipeline_parallel_size": pp, "expert_parallel_size": ep}],
            "generation_executors": [{"participant_ids": [1 + n]}]}
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(topo))
    return CliRunner().invoke(validate, ["--config", str(path)])


def test_validate_reports_the_expert_layout(tmp_path):
    res = _validate(tmp_path, str(family_checkpoint("qwen3-moe")), ep=2, tp=2, pp=2)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "context[0] TP=2 EP=2 PP=2 ranks 1,2,3,4" in lines[0] and "generation[0] TP=1 PP=1" in lines[0]
    assert lines[1:] == [("  context[0] EP=2 over TP=2: experts 0-3 on ranks 1,3; experts 4-7 on ranks 2,4 "
                         "(each expert whole)")]


def _six_heads(tmp_path) -> str:
    """The qwen3-moe checkpoint's config with 6 heads (3 KV), so TP 3 fits the attention but EP 3
    cannot split its 8 experts (names unchanged: it is checked, never loaded)."""
    import json
    import shutil

    folder = tmp_path / "six"
    shutil.copytree(family_checkpoint("qwen3-moe"), folder)
    d = json.loads((folder / "config.json").read_text())
    d.update(num_attention_heads=6, num_key_value_heads=3, intermediate_size=96, moe_intermediate_size=48)
    (folder / "config.json").write_text(json.dumps(d))
    return str(folder)


@pytest.mark.parametrize("model,ep,tp,needle", [
    ("qwen3-moe", 3, 2, ("context_executors.0: expert_parallel_size=3 does not divide tensor_parallel_size=2: "
                        "EP splits the experts over the executor's TP ranks")),
    ("random:tiny", 2, 2, ("context_executors[0].expert_parallel_size=2 needs a mixture-of-experts model, "
                          "but this model is dense (no experts); allowed: 1")),
    ("six-heads", 3, 3, ("context_executors[0].expert_parallel_size=3 does not divide the model's 8 experts "
                        "(every rank group holds as many); allowed: [1]")),
])
def test_validate_refuses_bad_expert_parallel_size(tmp_path, model, ep, tp, needle):
    path = (model if model.startswith("random:") else _six_heads(tmp_path) if model == "six-heads"
            else str(family_checkpoint(model)))
    res = _validate(tmp_path, path, ep=ep, tp=tp)
    assert res.exit_code == 2 and needle in res.output, res.output


def test_the_documented_example_validates():
    """configs/README.md's expert-parallel example is a topology that passes the model checks."""
    import re
    from pathlib import Path

    import yaml

    from disagg_mpi.config import check_model, parse_topology

    text = (Path(__file__).resolve().parents[2] / "configs" / "README.md").read_text()
    section = text[text.index("## Expert parallelism"):]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.DOTALL).group(1)
    topo = parse_topology({"model": {"path": str(family_checkpoint("qwen3-moe"))}, **yaml.safe_load(block)})
    assert [e.expert_parallel_size for e in topo.executors] == [2, 1]
    assert check_model(topo).num_experts == 8

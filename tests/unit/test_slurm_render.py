"""render_sbatch, the srun MPI plugin choice and the `slurm` / `validate` commands, without SLURM."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from disagg_mpi.cli.slurm import slurm, summary_line, validate
from disagg_mpi.config import parse_topology
from disagg_mpi.placement import PlacementError
from disagg_mpi.slurm import SlurmOptions, render_sbatch, srun_mpi_for_library

TC = {"enable_cache_transceiver": True}
REPO = Path(__file__).resolve().parents[2]


def _gpu_topology() -> dict:
    """9 ranks: TP=4 context on GPUs 0-3, TP=4 generation on GPUs 4-7 (node-local ids), of a model
    TP=4 can split (Llama-3.1-8B's shapes: 32 heads, 8 KV heads; SmolLM2's 9 heads cannot)."""
    return {"model": {"path": "random:llama-3.1-8b"},
            "context_executors": [{"participant_ids": [1, 2, 3, 4], "device_ids": [0, 1, 2, 3],
                                   "tensor_parallel_size": 4, "cache_transceiver_config": TC}],
            "generation_executors": [{"participant_ids": [5, 6, 7, 8], "device_ids": [4, 5, 6, 7],
                                      "tensor_parallel_size": 4, "cache_transceiver_config": TC}]}


def _sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


def _launch_line(text: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith("srun ")]
    return line


@pytest.mark.parametrize("nodes, per_node", [(1, 9), (2, 5), (3, 3)])
def test_header_for_1_2_3_nodes_of_8_gpus(nodes: int, per_node: int) -> None:
    topo = parse_topology(_gpu_topology())
    text = render_sbatch(topo, "/cfg/topo.yaml", SlurmOptions(nodes=nodes, gpus_per_node=8))
    assert _sbatch_lines(text) == ["#SBATCH --job-name=disagg-mpi", f"#SBATCH --nodes={nodes}",
                                   "#SBATCH --ntasks=9", f"#SBATCH --ntasks-per-node={per_node}",
                                   "#SBATCH --gres=gpu:8"]
    assert text.startswith("#!/bin/bash\n")
    assert "set -euo pipefail" in text


def test_four_nodes_of_8_gpus() -> None:
    ranks = list(range(1, 32))
    topo = parse_topology({"generation_executors": [
        {"participant_ids": ranks[i:i + 8], "device_ids": list(range(8))[:len(ranks[i:i + 8])],
         "tensor_parallel_size": len(ranks[i:i + 8])} for i in range(0, 31, 8)]})
    text = render_sbatch(topo, "t.yaml", SlurmOptions(nodes=4, gpus_per_node=8))
    assert "#SBATCH --ntasks=32" in text and "#SBATCH --ntasks-per-node=8" in text
    assert "#   node 3: r24:gen2/gpu7 r25:gen3/gpu0" in text  # the plan, as comments


def test_optional_directives_only_when_given() -> None:
    topo = parse_topology(_gpu_topology())
    bare = render_sbatch(topo, "t.yaml", SlurmOptions(gpus_per_node=8))
    for key in ("--partition", "--time", "--account", "--overcommit"):
        assert key not in bare
    full = render_sbatch(topo, "t.yaml", SlurmOptions(gpus_per_node=8, partition="gpu", time="01:00:00",
                                                      account="proj42", job_name="mine"))
    assert {"#SBATCH --partition=gpu", "#SBATCH --time=01:00:00", "#SBATCH --account=proj42",
            "#SBATCH --job-name=mine"} <= set(_sbatch_lines(full))


def test_cpu_topology_has_no_gres_and_overcommit_on_one_node() -> None:
    topo = parse_topology(yaml.safe_load((REPO / "configs" / "smollm2-1ctx-1gen.yaml").read_text()))
    text = render_sbatch(topo, "c.yaml", SlurmOptions(overcommit=True))
    assert "--gres" not in text
    assert "#SBATCH --overcommit" in text
    # Slurm refuses --ntasks-per-node above the node's CPUs even overcommitted; one node needs none.
    assert "#SBATCH --ntasks-per-node" not in text
    assert "--overcommit" in _launch_line(text)
    assert "--overcommit" not in _launch_line(render_sbatch(topo, "c.yaml", SlurmOptions()))


def test_launch_line_environment_and_validate() -> None:
    topo = parse_topology(_gpu_topology())
    opts = SlurmOptions(gpus_per_node=8, mpi="pmix", command="serve", venv="/opt/my venv",
                        cache_dir="/shared/cache $x", pythonpath="/src/disagg",
                        command_args=("--port", "8080", "--api-key", "a b"))
    text = render_sbatch(topo, "/cfg/my topo.yaml", opts)
    assert "source '/opt/my venv/bin/activate'" in text
    assert 'export DISAGG_MPI_CACHE="${DISAGG_MPI_CACHE:-/shared/cache \\$x}"' in text
    assert 'export PYTHONPATH=/src/disagg"${PYTHONPATH:+:$PYTHONPATH}"' in text
    validate_line = ("python -m disagg_mpi.cli validate --config '/cfg/my topo.yaml' "
                     '--world-size "$SLURM_NTASKS"')
    assert validate_line in text
    assert _launch_line(text) == (
        'srun --mpi=pmix --ntasks="$SLURM_NTASKS" --distribution=block --kill-on-bad-exit=1 '
        "python -m mpi4py -m disagg_mpi.cli serve --config '/cfg/my topo.yaml' "
        "--port 8080 --api-key 'a b'")
    assert text.index(validate_line) < text.index("srun ")
    assert "OMP_NUM_THREADS" in text


def test_default_cache_and_no_venv() -> None:
    topo = parse_topology(_gpu_topology())
    text = render_sbatch(topo, "t.yaml", SlurmOptions(gpus_per_node=8, python="/usr/bin/python3"))
    assert "source " not in text and "PYTHONPATH" not in text
    assert 'export DISAGG_MPI_CACHE="${DISAGG_MPI_CACHE:-$HOME/.cache/disagg_mpi/models}"' in text
    assert "/usr/bin/python3 -m mpi4py -m disagg_mpi.cli run --config t.yaml" in _launch_line(text)


def test_rendered_script_is_valid_bash(tmp_path: Path) -> None:
    topo = parse_topology(_gpu_topology())
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(topo, "t y.yaml", SlurmOptions(
        nodes=2, gpus_per_node=8, venv="/v", cache_dir='/c/"q"', command_args=("--x", "it's"))))
    assert subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True).returncode == 0


def test_template_is_valid_bash() -> None:
    template = REPO / "launch" / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(template)], check=False, capture_output=True).returncode == 0
    text = template.read_text()
    assert "srun --mpi=pmi2" in text and 'validate --config "$CONFIG" --world-size "$SLURM_NTASKS"' in text


def test_render_refuses_what_does_not_fit() -> None:
    topo = parse_topology(_gpu_topology())
    with pytest.raises(PlacementError, match="--gpus-per-node 8"):
        render_sbatch(topo, "t.yaml", SlurmOptions(gpus_per_node=4))
    with pytest.raises(ValueError, match="allowed pmi2, pmix"):
        render_sbatch(topo, "t.yaml", SlurmOptions(gpus_per_node=8, mpi="auto"))


def test_srun_mpi_for_library() -> None:
    assert srun_mpi_for_library("MPICH Version:      5.0.2\nMPICH Release date: ...") == "pmi2"
    assert srun_mpi_for_library("Intel(R) MPI Library 2021.10 (MPICH based)") == "pmi2"
    assert srun_mpi_for_library("Open MPI v4.1.6, package: Debian OpenMPI, ...") == "pmix"
    with pytest.raises(ValueError, match="--mpi pmi2"):
        srun_mpi_for_library("Some Other MPI 1.0")


# --- the click commands ---------------------------------------------------------------------------

def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_validate_command(tmp_path: Path) -> None:
    cfg = _write(tmp_path, _gpu_topology())
    ok = CliRunner().invoke(validate, ["--config", str(cfg)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip() == summary_line(parse_topology(_gpu_topology()))
    assert ok.output.count("\n") == 1
    assert "world size 9" in ok.output and "context[0] TP=4 PP=1 ranks 1,2,3,4" in ok.output
    assert CliRunner().invoke(validate, ["--config", str(cfg), "--world-size", "9"]).exit_code == 0

    wrong = CliRunner().invoke(validate, ["--config", str(cfg), "--world-size", "8"])
    assert wrong.exit_code == 2 and "needs a world size of 9" in wrong.output

    bad = _write(tmp_path, {"generation_executors": [{"participant_ids": [2]}]})
    res = CliRunner().invoke(validate, ["--config", str(bad)])
    assert res.exit_code == 2 and "ranks [1] are used by no executor" in res.output
    missing = CliRunner().invoke(validate, ["--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_slurm_command_writes_script_and_prints_plan(tmp_path: Path) -> None:
    data = _gpu_topology()
    data["generation_executors"][0]["device_ids"] = [0, 1, 2, 3]
    cfg = _write(tmp_path, data)
    out = tmp_path / "job.sbatch"
    res = CliRunner().invoke(slurm, ["--config", str(cfg), "--nodes", "2", "--gpus-per-node", "8",
                                     "--partition", "p", "--mpi", "pmi2", "--output", str(out),
                                     "--", "--input", "in.jsonl", "--output", "out.jsonl"])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert "#SBATCH --gres=gpu:8" in text and "#SBATCH --nodes=2" in text
    assert _launch_line(text).endswith(f"run --config {cfg.resolve()} --input in.jsonl --output out.jsonl")
    assert "node 1: r5:gen0/gpu0" in res.output
    assert "warning: context_executors[0]" in res.output and "network" in res.output


def test_slurm_command_defaults_and_errors(tmp_path: Path) -> None:
    cfg = _write(tmp_path, _gpu_topology())
    res = CliRunner().invoke(slurm, ["--config", str(cfg)])  # mpi auto: the MPICH wheel here
    assert res.exit_code == 0, res.output
    assert "#SBATCH --gres=gpu:8" in res.output  # highest device id + 1
    assert "srun --mpi=pmi2" in res.output
    bad = CliRunner().invoke(slurm, ["--config", str(cfg), "--gpus-per-node", "4"])
    assert bad.exit_code == 2 and "device_ids[0] = 4" in bad.output
    too_many = CliRunner().invoke(slurm, ["--config", str(cfg), "--nodes", "10"])
    assert too_many.exit_code == 2 and "exceeds the world size 9" in too_many.output


def test_help_texts() -> None:
    assert "Render a SLURM batch script" in CliRunner().invoke(slurm, ["--help"]).output
    assert "without starting anything" in CliRunner().invoke(validate, ["--help"]).output


@pytest.mark.parametrize("change, needle", [
    ({"model": {"path": "smollm2"}}, "does not divide the model's 9 attention heads"),  # TP=4, 9 heads
    ({"generation_executors": [{"participant_ids": [5, 6, 7, 8], "pipeline_parallel_size": 4,
                                "layer_split": [8, 8, 8, 4]}]}, "summing to the model's 32 layers"),
    ({"model": {"path": "/no/such/model.gguf"}}, "model.path='/no/such/model.gguf'"),
])
def test_validate_refuses_what_the_model_cannot_run(tmp_path: Path, change: dict, needle: str) -> None:
    """Model-dependent mistakes fail in validate (one line, exit 2), not after srun on every rank."""
    data = {**_gpu_topology(), **change}
    data["generation_executors"][0].setdefault("cache_transceiver_config", TC)
    res = CliRunner().invoke(validate, ["--config", str(_write(tmp_path, data))])
    assert res.exit_code == 2, res.output
    assert needle in res.output and res.output.startswith("error: ") and "Traceback" not in res.output


def test_one_model_cache_folder_everywhere(monkeypatch) -> None:
    """The runtime, the rendered script, the template and the docs name the same default folder."""
    from disagg_mpi.model.registry import cache_dir

    monkeypatch.delenv("DISAGG_MPI_CACHE", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "disagg_mpi" / "models"
    line = 'export DISAGG_MPI_CACHE="${DISAGG_MPI_CACHE:-$HOME/.cache/disagg_mpi/models}"'
    assert line in render_sbatch(parse_topology(_gpu_topology()), "t.yaml", SlurmOptions(gpus_per_node=8))
    assert line in (REPO / "launch" / "slurm.sbatch").read_text()
    for doc in ("README.md", "docs/transfer.md"):
        text = (REPO / doc).read_text()
        assert "~/.cache/disagg_mpi/models" in text and "disagg-mpi}" not in text, doc

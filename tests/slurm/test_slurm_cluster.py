"""Jobs on a real single-node SLURM cluster (the `slurm_cluster` fixture of conftest.py).

Run with `python -m pytest tests/slurm -m slurm` as root (CI). The node has
fewer CPUs than ranks, so every job overcommits.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from disagg_mpi.config import load_topology
from disagg_mpi.slurm import options_from_environment, render_sbatch

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "smollm2-1ctx-1gen.yaml"
PROMPTS = [
    {"id": "capital", "prompt": "The capital of France is", "max_tokens": 8, "ignore_eos": True},
    {"id": "count", "prompt": "One, two, three,", "max_tokens": 8, "ignore_eos": True},
    {"id": "story", "prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True},
]

# A stand-in for disagg_mpi.cli: the real `validate`, and a `run` that only reports the MPI world,
# so the rendered script is exercised end to end whether or not the real `run` exists yet.
STUB_CLI = '''
import json, os
import click
from mpi4py import MPI
from disagg_mpi.cli.slurm import validate
from disagg_mpi.placement import local_rank

@click.group()
def cli():
    pass

cli.add_command(validate)

@cli.command()
@click.option("--config", required=True)
@click.option("--input", "input_path", required=True)
@click.option("--output", "output_path", required=True)
def run(config, input_path, output_path):
    comm = MPI.COMM_WORLD
    me = {"rank": comm.Get_rank(), "local_rank": local_rank(), "localid": os.environ.get("SLURM_LOCALID")}
    everyone = comm.gather(me, root=0)
    if comm.Get_rank() == 0:
        with open(output_path, "w") as f:
            json.dump({"size": comm.Get_size(), "ranks": everyone, "input": input_path,
                       "cache": os.environ.get("DISAGG_MPI_CACHE")}, f)

if __name__ == "__main__":
    cli()
'''


def _job_env(slurm_cluster) -> dict[str, str]:
    return dict(slurm_cluster.env, PYTHONPATH=str(REPO))


def test_srun_pmi2_gives_one_world(slurm_cluster, tmp_path: Path) -> None:
    """The fixture works and srun --mpi=pmi2 wires 3 tasks into one MPI world of 3 (overcommitted)."""
    script = tmp_path / "trivial.sbatch"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --ntasks=3
        #SBATCH --overcommit
        set -euo pipefail
        source {Path(sys.prefix) / 'bin' / 'activate'}
        srun --mpi=pmi2 -O -n 3 python -c 'from mpi4py import MPI; print(MPI.COMM_WORLD.Get_size())'
        """))
    rc, out = slurm_cluster.sbatch_wait(script, tmp_path, timeout=60)
    assert rc == 0, out
    assert out.split() == ["3", "3", "3"], out


def test_rendered_script_runs_one_world(slurm_cluster, tmp_path: Path) -> None:
    """The script `disagg-mpi slurm` renders activates the venv, validates and starts one 3-rank world."""
    (tmp_path / "stub_cli.py").write_text(STUB_CLI)
    topology = load_topology(CONFIG)
    options = options_from_environment(
        overcommit=True, partition=slurm_cluster.partition, time="00:05:00", mpi="auto",
        entry_module="stub_cli", pythonpath=f"{tmp_path}:{REPO}",
        command_args=("--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.json")))
    assert options.mpi == "pmi2"  # the MPICH wheel
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(topology, CONFIG, options))

    rc, out = slurm_cluster.sbatch_wait(script, tmp_path, timeout=90)
    assert rc == 0, out
    assert "ok: world size 3" in out  # the validate line
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["size"] == 3
    assert [r["rank"] for r in result["ranks"]] == [0, 1, 2]
    assert [r["local_rank"] for r in result["ranks"]] == [0, 1, 2]  # one node, block distribution
    assert [r["localid"] for r in result["ranks"]] == ["0", "1", "2"]
    assert result["cache"]


def test_rendered_script_refuses_wrong_world_size(slurm_cluster, tmp_path: Path) -> None:
    """The validate line stops a job whose allocation does not match the topology, before srun."""
    options = options_from_environment(overcommit=True, mpi="pmi2",
                                       command_args=("--input", "x", "--output", "y"))
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(load_topology(CONFIG), CONFIG, options))
    # Command-line options override the script's #SBATCH lines: ask for 4 tasks instead of 3.
    rc, out = slurm_cluster.sbatch_wait(script, tmp_path, "--ntasks=4", timeout=60)
    assert rc != 0, out
    assert "needs a world size of 3" in out and "has 4" in out, out
    assert "srun" not in out


def test_template_validates_before_launch(slurm_cluster, tmp_path: Path) -> None:
    """launch/slurm.sbatch takes CONFIG INPUT OUTPUT, activates $VENV and refuses a wrong --ntasks."""
    env = dict(_job_env(slurm_cluster), VENV=sys.prefix)
    rc, out = slurm_cluster.sbatch_wait(REPO / "launch" / "slurm.sbatch", tmp_path, "--ntasks=2", "--overcommit",
                                        script_args=(str(CONFIG), "in.jsonl", "out.jsonl"), timeout=60, env=env)
    assert rc != 0, out
    assert "needs a world size of 3" in out and "has 2" in out, out


def _has_run_command() -> bool:
    try:
        cli_module = importlib.import_module("disagg_mpi.cli")
    except ImportError:
        return False
    group = getattr(cli_module, "cli", None)
    return group is not None and "run" in getattr(group, "commands", {})


def _read_outputs(path: Path) -> list[tuple[str, list[int], str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        assert row.get("error") in (None, ""), row
    return sorted((r["id"], r["output_ids"], r["text"]) for r in rows)


def test_smollm2_disaggregated_under_slurm_matches_mpiexec(slurm_cluster, tmp_path: Path) -> None:
    """`disagg-mpi run` in a rendered batch job gives the same greedy output as under plain mpiexec."""
    if not _has_run_command():
        pytest.skip("disagg_mpi.cli has no `run` command yet")
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))

    # Reference: the same command under the venv's mpiexec (MPICH hydra), outside SLURM.
    ref = tmp_path / "mpiexec.jsonl"
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.prefix) / "bin")) or "mpiexec"
    env = {k: v for k, v in _job_env(slurm_cluster).items() if not k.startswith("SLURM_")}
    res = subprocess.run([mpiexec, "-n", "3", sys.executable, "-m", "mpi4py", "-m", "disagg_mpi.cli", "run",
                          "--config", str(CONFIG), "--input", str(inp), "--output", str(ref)],
                         check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    # The same run as a batch job, through the CLI a user types.
    got = tmp_path / "slurm.jsonl"
    script = tmp_path / "job.sbatch"
    res = subprocess.run([sys.executable, "-m", "disagg_mpi.cli", "slurm", "--config", str(CONFIG),
                          "--overcommit", "--partition", slurm_cluster.partition, "--output", str(script),
                          "--", "--input", str(inp), "--output", str(got)],
                         check=False, env=_job_env(slurm_cluster), cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "srun --mpi=pmi2" in script.read_text()
    rc, out = slurm_cluster.sbatch_wait(script, tmp_path, timeout=170)
    assert rc == 0, out[-5000:]

    expected = _read_outputs(ref)
    assert [r[0] for r in expected] == sorted(p["id"] for p in PROMPTS)
    assert all(len(r[1]) == 8 for r in expected), expected
    assert _read_outputs(got) == expected


@pytest.fixture(autouse=True)
def _no_surrounding_job(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rendering reads DISAGG_MPI_CACHE only as a default; keep SLURM variables of an outer job out.
    for var in [v for v in os.environ if v.startswith("SLURM_") and v != "SLURM_CONF"]:
        monkeypatch.delenv(var)

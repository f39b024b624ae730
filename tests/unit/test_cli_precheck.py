"""A newcomer's mistakes are caught before any rank starts (issue 20): `run`, `serve` and
launch/mpirun.sh check the topology against the model in one process and print one clean error
(exit 2) instead of a traceback from every rank after ~30 s."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.unit.http_client import clean_env

REPO = Path(__file__).resolve().parents[2]
TC = {"enable_cache_transceiver": True}
# Each command must refuse these well before a job of ranks could even import torch.
FAST_S = 20


def _topology(**gen) -> dict:
    """random:tiny (8 heads, 6 layers): 1 context rank + the generation executor given."""
    return {"model": {"path": "random:tiny"},
            "context_executors": [{"participant_ids": [1], "cache_transceiver_config": TC}],
            "generation_executors": [{"cache_transceiver_config": TC, **gen}]}


BAD = {
    "tp3": (_topology(participant_ids=[2, 3, 4], tensor_parallel_size=3),
            "generation_executors[0].tensor_parallel_size=3 does not divide the model's 8 attention heads"),
    "split": (_topology(participant_ids=[2, 3], pipeline_parallel_size=2, layer_split=[2, 2]),
              "generation_executors[0].layer_split=[2, 2] must be 2 positive counts summing to the model's 6"),
    "path": ({**_topology(participant_ids=[2]), "model": {"path": "/no/such/folder"}},
             "model.path='/no/such/folder'"),
    "key": ({**_topology(participant_ids=[2]), "modle": {}}, "modle: unknown key"),
}


def _write(tmp_path: Path, data: dict) -> Path:
    cfg = tmp_path / "topo.yaml"
    cfg.write_text(yaml.safe_dump(data))
    (tmp_path / "in.jsonl").write_text('{"id": "a", "input_ids": [1, 2, 3], "max_tokens": 2}\n')
    return cfg


def _clean_refusal(proc: subprocess.CompletedProcess, needle: str, took: float) -> None:
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err, proc.stdout)
    assert needle in err, err
    assert "Traceback" not in err + proc.stdout and "MPI_Abort" not in err, err
    assert took < FAST_S, f"took {took:.1f} s: did a job start?"


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["run", "serve"])
def test_cli_refuses_before_mpiexec(tmp_path: Path, command: str, case: str) -> None:
    data, needle = BAD[case]
    cfg = _write(tmp_path, data)
    args = ["--input", str(tmp_path / "in.jsonl")] if command == "run" else ["--port", "0"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "disagg_mpi.cli", command, "--config", str(cfg), *args],
                          env=clean_env(), capture_output=True, text=True, timeout=120, check=False)
    _clean_refusal(proc, needle, time.monotonic() - t0)
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr  # the error, not a page of output


@pytest.mark.parametrize("case", ["tp3", "key"])
def test_mpirun_sh_refuses_before_mpiexec(tmp_path: Path, case: str) -> None:
    data, needle = BAD[case]
    cfg = _write(tmp_path, data)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "launch" / "mpirun.sh"), str(cfg), "run", "--input",
                           str(tmp_path / "in.jsonl")], env={**clean_env(), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120, check=False, cwd=REPO)
    _clean_refusal(proc, needle, time.monotonic() - t0)

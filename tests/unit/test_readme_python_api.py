"""The README's Python API block runs as written (issue 20: it failed with `NameError: ids` and never
said how to get token ids): under `mpiexec -n 3 python -m mpi4py`, as the README says, with the
real SmolLM2 (skipped when the model is not in the model cache)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.http_client import clean_env

REPO = Path(__file__).resolve().parents[2]


def _smollm2_cached() -> bool:
    from disagg_mpi.model.registry import DEFAULTS, cache_dir

    return (cache_dir() / Path(DEFAULTS["smollm2"]["member"]).name).is_file()


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def _mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else "mpiexec"


@pytest.mark.skipif(not _smollm2_cached(), reason="SmolLM2 is not in the model cache (disagg-mpi model fetch)")
def test_readme_python_api_block_runs_as_written(tmp_path):
    (block,) = readme_python_blocks()
    script = tmp_path / "ask.py"
    script.write_text(block)
    assert "mpiexec -n 3 python -m mpi4py ask.py" in (REPO / "README.md").read_text()
    proc = subprocess.run([_mpiexec(), "-n", "3", sys.executable, "-m", "mpi4py", str(script)], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "Paris" in proc.stdout, proc.stdout + proc.stderr[-2000:]

#!/usr/bin/env python
"""Run the whole test suite: single-process tests, then the multi-rank tests.

The multi-rank tests (tests/mpi) run under `mpiexec -n N python -m mpi4py -m
pytest --with-mpi` once per world size N; each test runs only in the job size
it is marked for. Rank 0 writes a JUnit report per size; the last line printed
sums every run as "N passed, N failed, N skipped".

    python scripts/run_tests.py                 # everything
    python scripts/run_tests.py -k disagg       # extra arguments go to every pytest
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 1800


def world_sizes() -> list[int]:
    """The job sizes the multi-rank tests ask for (their `world(N)` markers)."""
    found = set()
    for f in (ROOT / "tests" / "mpi").glob("test_*.py"):
        found.update(int(n) for n in re.findall(r"world\((\d+)\)", f.read_text()))
    return sorted(found)


def _mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else (shutil.which("mpiexec") or "mpiexec")


def _counts(xml_path: Path) -> tuple[int, int, int]:
    if not xml_path.exists():
        return 0, 1, 0  # the run died before writing its report: count it as a failure
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return tests - failed - skipped, failed, skipped


def _run(cmd: list[str], xml: Path) -> tuple[int, int, int, int]:
    print("+", " ".join(cmd), flush=True)
    try:
        rc = subprocess.call(cmd + [f"--junitxml={xml}"], cwd=ROOT, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"! timed out after {RUN_TIMEOUT_S} s", flush=True)
        rc = 124
    passed, failed, skipped = _counts(xml)
    if rc not in (0, 5) and failed == 0:
        failed = 1  # a crash or abort that left no failing test behind still fails the suite
    return rc, passed, failed, skipped


def main() -> int:
    extra = sys.argv[1:]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    out = Path(tempfile.mkdtemp(prefix="disagg-tests-"))
    totals = [0, 0, 0]
    single = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=900",
              "tests/unit", "tests/slurm", *extra]
    runs = [(single, out / "single.xml")]
    for n in world_sizes():
        cmd = [_mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "pytest", "-q", "--with-mpi",
               "-p", "no:cacheprovider", "--timeout=900", "tests/mpi", *extra]
        runs.append((cmd, out / f"mpi-{n}.xml"))
    for cmd, xml in runs:
        _, p, f, s = _run(cmd, xml)
        totals = [totals[0] + p, totals[1] + f, totals[2] + s]
    print(f"{totals[0]} passed, {totals[1]} failed, {totals[2]} skipped")
    return 1 if totals[1] else 0


if __name__ == "__main__":
    sys.exit(main())

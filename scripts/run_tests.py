#!/usr/bin/env python
"""Run the whole test suite: single-process tests, then the multi-rank tests.

The multi-rank tests (tests/mpi) run under `mpiexec -n N python -m mpi4py -m
pytest` once per world size N; each test runs only in the job size it is marked
for (its skips in the other sizes are counted apart: they are not skips a reader
should worry about). Rank 0 writes a JUnit report per size. The single-process
run lists its 15 slowest tests; the last line printed sums every run as
"N passed, N failed, N skipped" (CI reads it).

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


# tests/mpi/conftest.py skips a `world(n)` test in a job of another size with this reason.
_WORLD_FILTER = re.compile(r"needs exactly \d+ MPI ranks, job has \d+")


def _counts(xml_path: Path) -> tuple[int, int, int, int]:
    """(passed, failed, skipped, filtered): `filtered` are the skips of the world-size filter,
    not counted in `skipped`."""
    if not xml_path.exists():
        return 0, 1, 0, 0  # the run died before writing its report: count it as a failure
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    filtered = sum(1 for s in root.iter("skipped") if _WORLD_FILTER.fullmatch(s.get("message", "")))
    return tests - failed - skipped, failed, skipped - filtered, filtered


def _run(cmd: list[str], xml: Path) -> tuple[int, int, int, int, int]:
    print("+", " ".join(cmd), flush=True)
    try:
        rc = subprocess.call(cmd + [f"--junitxml={xml}"], cwd=ROOT, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"! timed out after {RUN_TIMEOUT_S} s", flush=True)
        rc = 124
    passed, failed, skipped, filtered = _counts(xml)
    if rc not in (0, 5) and failed == 0:
        failed = 1  # a crash or abort that left no failing test behind still fails the suite
    return rc, passed, failed, skipped, filtered


def commands(extra: list[str], sizes: list[int]) -> list[list[str]]:
    """The single-process run, then one `mpiexec -n N` run per world size."""
    single = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=900",
              "--durations=15", "tests/unit", "tests/slurm", *extra]
    # pytest-mpi is left out: with --with-mpi it prints a 20-line "MPI Information" banner from
    # every rank of every run (44 in all), and the world(n) markers already pick each test's job.
    mpi = [[_mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "pytest", "-q",
            "-p", "no:pytest_mpi", "-p", "no:cacheprovider", "--timeout=900", "tests/mpi", *extra] for n in sizes]
    return [single, *mpi]


def summary(passed: int, failed: int, skipped: int, filtered: int) -> list[str]:
    """The closing lines; the last one keeps the form CI parses."""
    lines = []
    if filtered:
        lines.append(f"(+{filtered} not for this world size: a multi-rank test runs in the job size it is "
                     "marked for and is passed over in the others; not counted as skipped)")
    return [*lines, f"{passed} passed, {failed} failed, {skipped} skipped"]


def main() -> int:
    extra = sys.argv[1:]
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    out = Path(tempfile.mkdtemp(prefix="disagg-tests-"))
    totals = [0, 0, 0, 0]
    for i, cmd in enumerate(commands(extra, world_sizes())):
        _, *counts = _run(cmd, out / f"run-{i}.xml")
        totals = [t + c for t, c in zip(totals, counts)]
    for line in summary(*totals):
        print(line)
    return 1 if totals[1] else 0


if __name__ == "__main__":
    sys.exit(main())

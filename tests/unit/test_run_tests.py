"""scripts/run_tests.py: one closing summary that tells world-size filtering apart from real skips,
the slowest tests, and no per-rank pytest-mpi banner (issue 20)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("run_tests", REPO / "scripts" / "run_tests.py")
run_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_tests)

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite errors="0" failures="1" skipped="3" tests="6">
<testcase name="a"/><testcase name="b"/><testcase name="c"><failure message="boom"/></testcase>
<testcase name="d"><skipped type="pytest.skip" message="needs exactly 3 MPI ranks, job has 2">x</skipped></testcase>
<testcase name="e"><skipped type="pytest.skip" message="needs exactly 4 MPI ranks, job has 2">x</skipped></testcase>
<testcase name="f"><skipped type="pytest.skip" message="CUDA is not available">x</skipped></testcase>
</testsuite></testsuites>"""


def test_world_size_filtering_is_counted_apart_from_skips(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(JUNIT)
    assert run_tests._counts(xml) == (2, 1, 1, 2)  # passed, failed, real skips, world-size filtered
    assert run_tests._counts(tmp_path / "missing.xml") == (0, 1, 0, 0)


def test_summary_ends_with_the_line_ci_parses():
    lines = run_tests.summary(10, 0, 1, 716)
    assert re.fullmatch(r"\d+ passed, \d+ failed, \d+ skipped", lines[-1]) and lines[-1] == "10 passed, 0 failed, 1 skipped"
    assert len(lines) == 2 and "+716 not for this world size" in lines[0]
    assert run_tests.summary(3, 1, 0, 0) == ["3 passed, 1 failed, 0 skipped"]


def test_commands_list_slowest_tests_and_leave_pytest_mpi_out():
    single, *mpi = run_tests.commands(["-k", "x"], [2, 3])
    assert "--durations=15" in single and single[-2:] == ["-k", "x"]
    assert len(mpi) == 2 and all("no:pytest_mpi" in c and "--with-mpi" not in c for c in mpi)


def test_a_multi_rank_run_without_the_banner():
    """The real command for one small file: it passes without pytest-mpi and prints no banner."""
    (cmd,) = run_tests.commands([], [2])[1:]
    cmd = [*cmd[:-1], "tests/mpi/test_control_sends.py"]  # the same flags, one small file
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "MPI Information" not in out and "1 passed" in out, out[-3000:]

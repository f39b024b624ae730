"""Stop signals: which one the outer `disagg-mpi` sends its launcher, and which ranks ignore them (pure)."""

import os
import signal

import pytest

from disagg_mpi.runtime import signals
from disagg_mpi.runtime.signals import (
    STOP_SIGNALS,
    catch_early,
    for_launcher,
    launcher_family,
    rank_from_environ,
    requested,
)

OPEN_MPI = "mpirun (Open MPI) 4.1.6\n\nReport bugs to http://www.open-mpi.org/community/help/\n"
HYDRA = "HYDRA build details:\n    Version:                                 5.0.2\n"


def test_families_from_version_text():
    assert launcher_family(OPEN_MPI) == "openmpi"
    assert launcher_family("prterun (Open MPI) 5.0.3") == "openmpi"
    assert launcher_family(HYDRA) == "mpich"
    assert launcher_family("Intel(R) MPI Library for Linux* OS, Version 2021.10") == "mpich"
    assert launcher_family("") == "other"


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_open_mpi_gets_sigusr2(sig):
    # its mpirun SIGKILLs the job a few seconds after a SIGINT/SIGTERM, and forwards SIGUSR2
    assert for_launcher(sig, "openmpi") == signal.SIGUSR2


def test_hydra_never_gets_sigusr2():
    # Hydra forwards SIGINT/SIGTERM; a SIGUSR2 would kill it (and the job) on the spot
    assert for_launcher(signal.SIGUSR2, "mpich") == signal.SIGTERM
    assert for_launcher(signal.SIGTERM, "mpich") == signal.SIGTERM
    assert for_launcher(signal.SIGINT, "mpich") == signal.SIGINT
    assert for_launcher(signal.SIGUSR2, "other") == signal.SIGTERM


def test_rank_from_the_launchers_variables():
    assert rank_from_environ({"PMI_RANK": "2"}) == 2                 # MPICH (Hydra), srun --mpi=pmi2
    assert rank_from_environ({"OMPI_COMM_WORLD_RANK": "1"}) == 1     # Open MPI
    assert rank_from_environ({"PMIX_RANK": "0"}) == 0
    assert rank_from_environ({"PMI_RANK": ""}) is None
    assert rank_from_environ({}) is None


def test_from_the_start_other_ranks_ignore_stop_signals_and_rank_0_notes_them():
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        assert catch_early({}) is None
        assert all(signal.getsignal(s) == saved[s] for s in STOP_SIGNALS)
        assert catch_early({"OMPI_COMM_WORLD_RANK": "3"}) == 3
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
        assert catch_early({"PMI_RANK": "0"}) == 0
        assert requested() is None
        os.kill(os.getpid(), signal.SIGUSR2)  # noted, not fatal
        first = requested()
        assert first is not None and first[1] == signal.SIGUSR2
        os.kill(os.getpid(), signal.SIGTERM)
        assert requested() == first           # the first one counts
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        signals._requested.clear()  # process-wide: later tests start unasked


def test_a_launcher_gets_the_chosen_signal_when_its_parent_is_killed(tmp_path):
    """stop_with_parent: the kernel sends the launcher the signal its family drains on (SIGUSR2 for
    Open MPI's mpirun) when the `disagg-mpi` that started it dies of SIGKILL."""
    import subprocess
    import sys
    import time

    child = ("import signal, sys, time, pathlib\n"
             f"d = pathlib.Path({str(tmp_path)!r})\n"
             "signal.signal(signal.SIGUSR2, lambda *a: ((d / 'got').write_text('USR2'), sys.exit(0)))\n"
             "(d / 'ready').write_text('1')\n"
             "time.sleep(60)\n")
    parent = ("import signal, subprocess, sys, time\n"
              "from disagg_mpi.runtime.signals import stop_with_parent\n"
              f"subprocess.Popen([sys.executable, '-c', {child!r}], preexec_fn=stop_with_parent(signal.SIGUSR2))\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        while not (tmp_path / "got").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "got").read_text() == "USR2"

"""The signals that ask a job to drain and stop, and how they reach every rank.

`disagg-mpi run` and `serve` drain on SIGINT, SIGTERM or SIGUSR2: rank 0 lets in-flight
requests finish (up to `--grace`), then tells the executors to stop; the other ranks
ignore the signals and wait for that word.

The launchers differ in what they pass on:
- MPICH's Hydra `mpiexec` forwards SIGINT and SIGTERM to every rank, and dies of a SIGUSR2;
- Open MPI's `mpirun` does not: on SIGINT or SIGTERM it sends the ranks SIGTERM, waits a
  few seconds, then SIGKILLs the job and exits with an error. It forwards SIGUSR1 and
  SIGUSR2 as they are (its man page, "Signal Propagation").
So the outer `disagg-mpi` process, which started the launcher itself, sends an Open MPI
`mpirun` SIGUSR2 for any stop signal, and Hydra SIGTERM for a SIGUSR2; a user who starts
Open MPI's `mpirun` by hand sends it SIGUSR2 to drain the job.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Mapping

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


# What a launcher tells each rank about its rank: MPICH's Hydra and PMI-2, Open MPI, PMIx.
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def ignore_stop_signals() -> None:
    """On ranks other than 0: rank 0 decides when the job stops."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def rank_from_environ(environ: Mapping[str, str]) -> int | None:
    """This process's world rank as its launcher set it, before MPI starts (None: not said)."""
    for name in RANK_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


_requested: list[tuple[float, int]] = []  # (time.monotonic(), signal) of the first one catch_early caught


def _note(sig: int, _frame: object) -> None:
    if not _requested:
        _requested.append((time.monotonic(), sig))


def catch_early(environ: Mapping[str, str]) -> int | None:
    """Before MPI starts (its rank read from the launcher's variables): a rank other than 0
    ignores stop signals from now on; rank 0 notes the first one (`requested`) until its
    command installs its own handlers. Returns the rank (None: the launcher did not say).

    A stop request during start-up (seconds of imports and model loading) must neither kill a
    rank before it has handlers nor be lost."""
    rank = rank_from_environ(environ)
    if rank is None:
        return None
    if rank:
        ignore_stop_signals()
    else:
        for s in STOP_SIGNALS:
            signal.signal(s, _note)
    return rank


def requested() -> tuple[float, int] | None:
    """(when, which signal) rank 0 was asked to stop before its command's own handlers were in
    (None: it was not)."""
    return _requested[0] if _requested else None


def launcher_family(version_text: str) -> str:
    """"openmpi", "mpich" or "other", from what `mpiexec --version` printed."""
    if "Open MPI" in version_text or "OpenRTE" in version_text or "PRRTE" in version_text:
        return "openmpi"
    if "HYDRA" in version_text or "MPICH" in version_text or "Intel(R) MPI" in version_text:
        return "mpich"
    return "other"


def probe_launcher(mpiexec: str) -> str:
    """`launcher_family` of this mpiexec ("other" when it cannot say)."""
    try:
        done = subprocess.run([mpiexec, "--version"], check=False, capture_output=True, text=True, timeout=20,
                              errors="replace")
    except (OSError, subprocess.SubprocessError):
        return "other"
    return launcher_family(done.stdout + done.stderr)


def for_launcher(sig: int, family: str) -> int:
    """The signal to send a launcher of `family` so that the ranks see a stop request `sig`:
    SIGUSR2 for Open MPI; SIGINT or SIGTERM for the others (Hydra dies of a SIGUSR2)."""
    if family == "openmpi":
        return signal.SIGUSR2
    return signal.SIGTERM if sig == signal.SIGUSR2 else sig


def stop_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A launcher's `preexec_fn` (Linux): it gets `sig` when the `disagg-mpi` that started it dies,
    even of SIGKILL, so the job does not run on without anyone to report to. Pass
    `for_launcher(SIGTERM, family)`: Open MPI's mpirun drains on SIGUSR2 but SIGKILLs the job a
    few seconds after a SIGTERM. Elsewhere a no-op."""

    def preexec() -> None:
        import ctypes
        import sys

        if sys.platform.startswith("linux"):
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig))

    return preexec

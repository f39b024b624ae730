"""What the commands share: finding out whether we are inside an MPI job, starting one, logging,
loading the topology, and the optional extras a command needs."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import click

from ..config import ConfigError, Topology, check_model, load_topology

EXIT_BAD_CONFIG = 2  # a topology or model that cannot run, refused before any rank starts


class BadConfig(click.ClickException):
    """One clean error on stderr and exit code 2 (`validate`'s code for the same mistakes)."""

    exit_code = EXIT_BAD_CONFIG

_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def inside_mpi_job() -> bool:
    """Started by a launcher? Decided from the environment, before MPI initialises."""
    return any(v in os.environ for v in _MPI_ENV)


def mpiexec_path() -> str:
    """The mpiexec of this environment (the mpich wheel puts one beside python)."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise click.ClickException("no mpiexec found: pip install mpich (or load your cluster's MPI)")
    return found


def relaunch(world_size: int, args: list[str]) -> int:
    """Run this CLI again under `mpiexec -n world_size`; returns its exit code.

    The job's output goes straight to this process's stdout and stderr (inherited, not piped
    through it), so a launcher killed with SIGKILL leaves the job able to write: its mpiexec gets
    a stop signal (`signals.stop_with_parent`) and rank 0 drains, ending every open HTTP stream
    with a final chunk and `[DONE]`. Piped through us, the first line rank 0 wrote after our
    death (into a pipe nobody read) ended mpiexec, and Hydra SIGKILLed the ranks mid-stream.
    If the job fails, the rank that died is named (mpiexec itself only names a PID), and the HTTP
    clients rank 0 had in flight are told (runtime/last_words.py: Hydra SIGKILLs rank 0 too).
    """
    import tempfile
    import threading

    from ..runtime import last_words, rankmap, signals

    mpiexec = mpiexec_path()
    family = signals.probe_launcher(mpiexec)
    cmd = [mpiexec, "-n", str(world_size), sys.executable, "-m", "mpi4py", "-m", "disagg_mpi.cli", *args]
    with tempfile.TemporaryDirectory(prefix="disagg-ranks-") as folder:
        keeper = last_words.Keeper.start(os.path.join(folder, "last-words"))  # rank 0's clients, should the job die
        env = {**os.environ, rankmap.ENV: folder, **({last_words.ENV: keeper.path} if keeper else {})}
        sys.stdout.flush()
        sys.stderr.flush()
        orphaned = signals.stop_with_parent(signals.for_launcher(signal.SIGTERM, family))
        proc = subprocess.Popen(cmd, env=env, preexec_fn=orphaned)  # noqa: PLW1509
        watcher = rankmap.Watcher(folder)
        watching = threading.Thread(target=watcher.run, daemon=True)
        watching.start()

        def forward(sig, _frame):  # the launcher passes it to the ranks: rank 0 drains, then all exit
            if proc.poll() is None:
                proc.send_signal(signals.for_launcher(sig, family))

        previous = {s: signal.signal(s, forward) for s in signals.STOP_SIGNALS}
        try:
            rc = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        watcher.stop()
        watching.join(timeout=5)
        spoken = keeper.close(speak=rc != 0) if keeper else 0
        if spoken:
            click.echo(f"disagg-mpi: told {spoken} HTTP clients in flight that the job died", err=True)
        if rc != 0:
            msg = watcher.explain(rc)
            if msg:
                click.echo(msg, err=True)
            left = rankmap.remove_segments(folder)  # MPI_Abort skips MPI_Finalize, which unlinks them
            if left:
                click.echo(f"disagg-mpi: removed the shared memory the job left behind: {' '.join(left)}", err=True)
        return rc


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")


def load_topology_or_exit(config: str) -> Topology:
    try:
        return load_topology(config)
    except ConfigError as err:
        raise BadConfig(str(err)) from None


def check_model_or_exit(topo: Topology) -> None:
    """The model-dependent checks (config.check_model) in this one process, before `mpiexec` starts N
    ranks that would each fail with a traceback; fetches the default model once on first use."""
    try:
        check_model(topo)
    except ConfigError as err:
        raise BadConfig(str(err)) from None


def require_extra(extra: str, *modules: str) -> None:
    """A clear error when an optional dependency group is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(f"this command needs {', '.join(missing)}: pip install 'disagg-mpi[{extra}]'")

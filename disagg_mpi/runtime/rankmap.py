"""Name the rank that died: MPI launchers report a PID, users think in ranks.

The launcher process (`disagg-mpi run`/`serve` outside MPI) gives every rank a
folder (DISAGG_MPI_RANKMAP); each rank writes `rank pid host role` there at
start. A watcher in the launcher polls those PIDs (on its own host) and, when the job
ends badly, says which rank died first, on which host, in which executor.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

ENV = "DISAGG_MPI_RANKMAP"


def record(rank: int, role: str) -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    try:
        # The launcher may report the PID of the process it forked, which can be
        # our parent (a wrapper) rather than us: record both.
        Path(folder, f"{rank}").write_text(
            f"{rank} {os.getpid()},{os.getppid()} {socket.gethostname()} {role}\n")
    except OSError:
        pass  # best effort: a missing map must never stop the job


def role_of(topo, rank: int) -> str:
    found = topo.executor_of_rank(rank)
    if found is None:
        return "orchestrator"
    ex_id, spec = found
    kind = "context" if topo.is_context(ex_id) else "generation"
    return f"{kind} executor {ex_id}, local rank {spec.participant_ids.index(rank)}"


def load(folder: str | Path) -> dict[int, tuple[int, str, str]]:
    """pid -> (rank, host, role)"""
    out = {}
    for f in Path(folder).glob("*"):
        try:
            rank, pids, host, role = f.read_text().split(" ", 3)
            pid, ppid = (int(p) for p in pids.split(","))
            out.setdefault(ppid, (int(rank), host, role.strip()))
            out[pid] = (int(rank), host, role.strip())
        except (OSError, ValueError):
            continue
    return out


class Watcher:
    """Polls the ranks' PIDs while the job runs; remembers which died first."""

    def __init__(self, folder: str | Path, interval: float = 0.01):
        self.folder, self.interval = folder, interval
        self.first_dead: list[tuple[int, int, str, str]] = []  # (rank, pid, host, role)
        self._stop = False

    def run(self) -> None:
        import time

        host = socket.gethostname()
        while not self._stop and not self.first_dead:
            ranks = {}
            for f in Path(self.folder).glob("*"):
                try:
                    rank, pids, rhost, role = f.read_text().split(" ", 3)
                    ranks[int(pids.split(",")[0])] = (int(rank), rhost, role.strip())
                except (OSError, ValueError):
                    continue
            dead = [(r, pid, h, role) for pid, (r, h, role) in ranks.items() if h == host and not _alive(pid)]
            if dead:
                self.first_dead = sorted(dead)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop = True

    def explain(self, returncode: int) -> str | None:
        if not self.first_dead:
            return None
        named = ", ".join(f"rank {r} ({role}, pid {pid} on {h})" for r, pid, h, role in self.first_dead)
        return f"disagg-mpi: the job ended because {named} died first; exit code {returncode}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True

"""Name the rank that died: MPI launchers report a PID, users think in ranks.

The launcher process (`disagg-mpi run`/`serve` outside MPI) gives every rank a
folder (DISAGG_MPI_RANKMAP); each rank writes `rank pid host role` there at
start. A watcher in the launcher polls those PIDs (on its own host) and, when the job
ends badly, says which rank died first, on which host, in which executor.

Each rank also writes the MPI library's shared-memory files it maps (`shm/<rank>`): MPICH names
its node segment `/dev/shm/mpich_shm_<world id>_<node id>` (world id: a hash of the job's PMI
key-value space name) and unlinks it in MPI_Finalize, so a job that aborts leaves it behind,
megabytes each. The launcher removes the ones its own job left (`remove_segments`).
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
    segments = mapped_segments()
    if segments:
        try:
            Path(folder, "shm").mkdir(exist_ok=True)
            Path(folder, "shm", f"{rank}").write_text(" ".join([socket.gethostname(), *segments]) + "\n")
        except OSError:
            pass


SEGMENT_PREFIXES = ("/dev/shm/mpich_",)  # MPICH's node segments (mpich_shm_*, mpich_vci_*)


def mapped_segments(maps: str = "/proc/self/maps") -> list[str]:
    """The MPI library's shared-memory files this process maps (none outside Linux or MPICH)."""
    try:
        fields = [line.split(maxsplit=5) for line in Path(maps).read_text().splitlines()]
    except OSError:
        return []
    # A line: address perms offset dev inode path; an unlinked file's path ends in "(deleted)".
    return sorted({f[5] for f in fields if len(f) == 6 and f[5].startswith(SEGMENT_PREFIXES)
                   and not f[5].endswith("(deleted)")})


def remove_segments(folder: str | Path) -> list[str]:
    """Remove the shared-memory files the ranks of this host recorded and MPI left behind (after
    the job ended: no rank of it maps them any more); returns the removed paths."""
    host, removed = socket.gethostname(), []
    for f in sorted(Path(folder, "shm").glob("*")):
        try:
            rhost, *paths = f.read_text().split()
        except (OSError, ValueError):
            continue
        for path in paths if rhost == host else ():
            if path.startswith(SEGMENT_PREFIXES) and path not in removed:
                try:
                    os.unlink(path)
                    removed.append(path)
                except OSError:
                    pass  # finalized cleanly, or another rank's record named it first
    return removed


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
        pass
    try:
        return not _exiting(_proc_stat(pid))
    except FileNotFoundError:
        # Reaped since the signal's look (MPICH's proxy reaps a killed rank, then kills the
        # others: counting it alive here named the next rank as the first to die) - or no /proc.
        return not _HAVE_PROC
    except (OSError, IndexError):
        return True


_HAVE_PROC = os.path.isdir("/proc/self")
_PF_EXITING = 0x4   # the kernel's task flag, set as the first thing do_exit does


def _exiting(stat: str) -> bool:
    """Whether a /proc/PID/stat line is a process that is dead for our purpose: a zombie (or dead
    task), or one already inside exit (PF_EXITING in its flags). A SIGKILLed rank with gigabytes
    mapped stays in exit while the kernel frees them; MPICH's proxy can meanwhile kill the other
    ranks, and counted alive until its zombie appeared, the rank killed next (rank 0, a small
    process) was named as the first to die (seen twice in CI runs of test_rank_failure.py)."""
    fields = stat.rsplit(") ", 1)[1].split()
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)


def _proc_stat(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read()

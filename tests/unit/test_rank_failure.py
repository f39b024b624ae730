"""A rank that dies ends the whole job fast and loudly, naming the rank (a real mpiexec job)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from disagg_mpi.runtime.signals import RANK_VARIABLES

TOPOLOGY = {
    "model": {"path": "random:tiny", "dtype": "float32"},
    "context_executors": [{"participant_ids": [1], "kv_cache": {"block_size": 4, "num_blocks": 256},
                           "cache_transceiver_config": {"enable_cache_transceiver": True}}],
    "generation_executors": [{"participant_ids": [2], "kv_cache": {"block_size": 4, "num_blocks": 256},
                              "cache_transceiver_config": {"enable_cache_transceiver": True}}],
}


def _descendants(pid: int) -> list[int]:
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _rank_pid(root: int, rank: int) -> int | None:
    for pid in _descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        said = any(f"{name}={rank}".encode() in env for name in RANK_VARIABLES)  # MPICH, Open MPI, PMIx
        if said and b"disagg_mpi.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def _start_run(tmp_path, n: int, max_tokens: int, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`disagg-mpi run` as a user starts it (it relaunches itself under mpiexec), on a long batch."""
    cfg = tmp_path / "topo.yaml"
    cfg.write_text(yaml.safe_dump(TOPOLOGY))
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": str(i), "input_ids": list(range(3, 30)), "max_tokens": max_tokens,
                                       "ignore_eos": True}) + "\n" for i in range(n)))
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not _job_variable(k)}
    proc = subprocess.Popen([sys.executable, "-m", "disagg_mpi.cli", "run", "--config", str(cfg), "--input",
                             str(inp), "--output", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, out


def _job_variable(name: str) -> bool:
    """Set by a launcher for its ranks (dropped: `disagg-mpi run` must see it is not in a job).
    Open MPI's settings stay (OMPI_MCA_*, e.g. an image's plm_rsh_agent, and a root user's leave
    to run it), except those its launcher sets for the ranks."""
    if name.startswith(("OMPI_MCA_orte_", "OMPI_MCA_ess", "OMPI_MCA_pmix")):
        return True
    if name.startswith(("OMPI_MCA_", "OMPI_ALLOW_RUN_AS_ROOT")):
        return False
    return name.startswith(("PMI_", "OMPI_", "PMIX_"))


def _signal_and_wait(proc: subprocess.Popen, pid: int, sig: int) -> tuple[str, float]:
    """Send `sig` to `pid`; the launcher's output and how long it took to exit."""
    os.kill(pid, sig)
    t0 = time.time()
    out, _ = proc.communicate(timeout=60)
    return out, time.time() - t0


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _wait_for_rank(proc: subprocess.Popen, rank: int, deadline: float) -> int | None:
    pid = None
    while pid is None and time.time() < deadline and proc.poll() is None:
        pid = _rank_pid(proc.pid, rank)
        time.sleep(0.2)
    return pid


def test_killed_generation_rank_ends_the_job_and_is_named(tmp_path):
    proc, _ = _start_run(tmp_path, 2000, 200)
    try:
        deadline = time.time() + 120
        victim = _wait_for_rank(proc, 2, deadline)
        assert victim is not None, "rank 2 never started"
        env_of_victim = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{victim}/environ").read_bytes().split(b"\0")
                             if b"=" in kv)
        rank_file = Path(env_of_victim[b"DISAGG_MPI_RANKMAP"].decode()) / "2"
        while not rank_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # let it load the model and start serving
        assert proc.poll() is None, "the job ended before the kill"
        out, elapsed = _signal_and_wait(proc, victim, signal.SIGKILL)
    finally:
        _reap(proc)
    assert proc.returncode != 0
    assert elapsed < 30
    assert "rank 2 (generation executor 1" in out, out[-2000:]
    # MPI_Abort skips MPI_Finalize, which unlinks MPICH's node segment: the launcher removes it.
    (line,) = [ln for ln in out.splitlines() if "removed the shared memory the job left behind" in ln]
    left = line.rsplit(": ", 1)[1].split()
    assert left and all(p.startswith("/dev/shm/mpich_shm_") and not Path(p).exists() for p in left), line


def test_mapped_segments_reads_the_mpi_files_of_proc_maps(tmp_path):
    from disagg_mpi.runtime.rankmap import mapped_segments

    maps = tmp_path / "maps"
    maps.write_text("7f00-7f10 rw-s 00000000 00:1a 12 /dev/shm/mpich_shm_cdcc5afd_0\n"
                    "7f10-7f20 rw-s 00000000 00:1a 13 /dev/shm/mpich_shm_cdcc5afd_0\n"
                    "7f20-7f30 rw-s 00000000 00:1a 14 /dev/shm/mpich_vci_1_0 (deleted)\n"
                    "7f30-7f40 r-xp 00000000 08:01 15 /usr/lib/libc.so.6\n"
                    "7f40-7f50 rw-p 00000000 00:00 0\n")
    assert mapped_segments(str(maps)) == ["/dev/shm/mpich_shm_cdcc5afd_0"]
    assert mapped_segments(str(tmp_path / "none")) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_stop_signal_to_the_launcher_drains_then_exits(tmp_path, sig):
    """SIGTERM or SIGUSR2 to `disagg-mpi run`: in-flight requests get the grace period, the rest end
    cancelled, every line is written, exit code 0; with MPICH's mpiexec and with Open MPI's mpirun
    (each is sent the signal it passes on: runtime/signals.py)."""
    n = 300
    proc, out = _start_run(tmp_path, n, 400, "--grace", "1")
    try:
        assert _wait_for_rank(proc, 0, time.time() + 120) is not None
        time.sleep(6)  # executors up, requests running
        assert proc.poll() is None, "finished before the signal"
        log, elapsed = _signal_and_wait(proc, proc.pid, sig)
    finally:
        _reap(proc)
    assert proc.returncode == 0, log[-2000:]
    assert elapsed < 30
    assert "finishing in-flight requests" in log
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == n and len({x["id"] for x in lines}) == n
    reasons = {x["finish_reason"] for x in lines}
    assert "cancelled" in reasons and reasons <= {"cancelled", "length"}


def test_job_ends_when_the_launcher_is_killed(tmp_path):
    """SIGKILL to `disagg-mpi run` (no handler can run): its mpiexec is told by the kernel, and the
    whole job ends instead of running on with nobody to report to."""
    proc, _ = _start_run(tmp_path, 3000, 400)
    try:
        ranks = [_wait_for_rank(proc, r, time.time() + 120) for r in (0, 1, 2)]
        assert None not in ranks, "the ranks never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.time() + 60
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in ranks):
            time.sleep(0.2)
        alive = [pid for pid in ranks if Path(f"/proc/{pid}").exists()]
    finally:
        _reap(proc)
    assert not alive, f"ranks still running after their launcher died: {alive}"


def test_a_rank_reaped_between_the_two_looks_counts_as_dead(monkeypatch):
    """The watcher's liveness test signals the PID (a zombie still answers), then reads its
    /proc stat; MPICH's proxy can reap the killed rank in between. Counted alive then, the rank
    it killed next was named as the first to die (seen once in CI)."""
    from disagg_mpi.runtime import rankmap

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while Path(f"/proc/{child.pid}/stat").read_text().split(") ", 1)[1][0] != "Z":
        time.sleep(0.01)
    assert not rankmap._alive(child.pid)  # a zombie is dead
    real_read = rankmap._proc_stat

    def reaped_meanwhile(pid):
        child.wait()  # the proxy reaps it after the signal's look, before the stat's
        return real_read(pid)

    monkeypatch.setattr(rankmap, "_proc_stat", reaped_meanwhile)
    assert not rankmap._alive(child.pid)
    assert rankmap._alive(os.getpid())


def test_a_rank_inside_exit_counts_as_dead(monkeypatch):
    """A SIGKILLed rank frees its memory before it becomes a zombie, running (state R or D) with
    the kernel's PF_EXITING flag; meanwhile MPICH's proxy may kill rank 0, which then looked like
    the first to die. Field 9 of /proc/PID/stat holds the flags."""
    from disagg_mpi.runtime import rankmap

    mine = Path(f"/proc/{os.getpid()}/stat").read_text()
    head, rest = mine.rsplit(") ", 1)
    fields = rest.split()
    for state, flags, dead in [("R", 0x400000, False), ("R", 0x400004, True), ("D", 0x4, True), ("Z", 0x0, True),
                               ("S", 0x40, False)]:
        line = f"{head}) {' '.join([state, *fields[1:6], str(flags), *fields[7:]])}\n"
        monkeypatch.setattr(rankmap, "_proc_stat", lambda pid, line=line: line)
        assert rankmap._alive(os.getpid()) is not dead, (state, hex(flags))
    assert rankmap._exiting("7 (a name) with) spaces) R 1 1 1 0 -1 4 0") is True   # comm may hold ") "

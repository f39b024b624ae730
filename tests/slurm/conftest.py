"""A real one-node SLURM cluster for the tests in this folder.

The `slurm_cluster` session fixture installs Debian's SLURM and munge when they
are missing (apt-get; skipped with the reason when that is impossible), writes
a minimal slurm.conf and munge key into a temporary folder, starts munged,
slurmctld and slurmd in the foreground as our own child processes, waits for
`sinfo` to show the node idle and, at teardown, cancels leftover jobs and
stops every daemon it started (then checks that each pid is gone).

Nothing outside the temporary folder is written except by apt-get; the
daemons listen on free ports so a cluster already running on the machine is
left alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scancel"]
SBIN = ["/usr/sbin", "/usr/bin", "/sbin"]
PARTITION = "debug"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: runs jobs on a real single-node SLURM cluster (needs root)")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def _ensure_installed() -> None:
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        pytest.skip("SLURM/munge are not installed and installing them needs root")
    if not shutil.which("apt-get"):
        pytest.skip("SLURM/munge are not installed and there is no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True, text=True, timeout=300)
        res = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    missing = [b for b in BINARIES if not _which(b)]
    if res.returncode != 0 or missing:
        pytest.skip(f"apt-get could not install {' '.join(PACKAGES)} (missing {missing}): "
                    f"{(res.stderr or res.stdout).strip()[-400:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]
    node: str
    cpus: int
    partition: str = PARTITION
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, timeout: float = 60, check: bool = True,
            **kw: object) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), check=False, env=self.env, capture_output=True, text=True, timeout=timeout,
                             **kw)  # type: ignore[call-overload]
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\nstdout:\n{res.stdout}\n"
                                 f"stderr:\n{res.stderr}\n{self.logs()}")
        return res

    def sbatch_wait(self, script: Path, cwd: Path, *args: str, script_args: tuple[str, ...] = (),
                    timeout: float = 150, env: dict[str, str] | None = None) -> tuple[int, str]:
        """Submit (extra sbatch `args` before the script's own), wait for the end by polling
        (`sbatch --wait` polls only every ~10 s), return (exit code, the job's output file)."""
        out = cwd / f"{script.stem}.%j.out"
        res = subprocess.run(["sbatch", "--parsable", f"--output={out}", *args, str(script), *script_args],
                             check=False,
                             env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            return res.returncode, res.stdout + res.stderr
        job_id = res.stdout.strip().split(";")[0]
        deadline = time.monotonic() + timeout
        while True:
            info = self.run("scontrol", "show", "job", "-o", job_id, check=False, timeout=10).stdout
            fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
            if fields.get("JobState") in TERMINAL_STATES:
                break
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise AssertionError(f"job {job_id} ({script}) ran past {timeout} s\n{info}\n{self.logs()}")
            time.sleep(0.3)
        code, _, signal_number = fields.get("ExitCode", "1:0").partition(":")
        rc = int(code) if int(code) or not int(signal_number or 0) else 128 + int(signal_number)
        if fields["JobState"] != "COMPLETED" and rc == 0:
            rc = 1
        log = Path(str(out).replace("%j", job_id))
        text = log.read_text() if log.exists() else f"(no job output file {log})"
        return rc, f"{text}\n[job {job_id}: {fields['JobState']}]" if rc else text

    def _queue(self) -> str:
        return self.run("squeue", "-a", check=False).stdout

    def logs(self, tail: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)


def _write_conf(root: Path, node: str, cpus: int, munge_socket: Path) -> Path:
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=disaggtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=pmi2
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    return conf


def _wait_idle(cluster: SlurmCluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while starting\n{cluster.logs()}")
        res = cluster.run("sinfo", "--noheader", "-o", "%t", check=False, timeout=10)
        last = (res.stdout + res.stderr).strip()
        if res.returncode == 0 and last.split() and all(s == "idle" for s in last.split()):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the node is not idle after {timeout} s (sinfo: {last!r})\n{cluster.logs()}")


def _stop(procs: dict[str, subprocess.Popen]) -> list[str]:
    """Stop daemons in reverse start order; return the names of any that would not die."""
    stuck = []
    for name, proc in reversed(list(procs.items())):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    stuck.append(name)
        if proc.poll() is None or Path(f"/proc/{proc.pid}").exists() and _is_alive(proc.pid):
            stuck.append(name)
    return stuck


def _is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="session")
def slurm_cluster():
    _ensure_installed()
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd as root (SlurmUser=root); run the tests as root")

    root = Path(tempfile.mkdtemp(prefix="slurm-"))  # short: the munge socket path must fit 108 bytes
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir(mode=0o711)
    os.chmod(root, 0o711)
    munge_dir = root / "munge"
    os.chmod(munge_dir, 0o711)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    munge_socket = munge_dir / "munge.socket"

    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    conf = _write_conf(root, node, cpus, munge_socket)
    env = dict(os.environ, SLURM_CONF=str(conf))
    for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_")) and v != "SLURM_CONF"]:
        del env[var]  # never inherit a surrounding job's settings
    cluster = SlurmCluster(root, conf, env, node, cpus)

    daemons = [
        ("munged", [_which("munged"), "--foreground", "--force", f"--key-file={key}",
                    f"--socket={munge_socket}", f"--pid-file={root}/run/munged.pid",
                    f"--log-file={root}/log/munged.log", f"--seed-file={munge_dir}/munged.seed"]),
        ("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(conf)]),
        ("slurmd", [_which("slurmd"), "-D", "-N", node, "-f", str(conf)]),
    ]
    try:
        for name, cmd in daemons:
            with open(root / "log" / f"{name}.stdout", "wb") as log:  # the child keeps its own copy
                cluster.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                       start_new_session=True)
            if name == "munged":
                deadline = time.monotonic() + 10
                while not munge_socket.exists() and time.monotonic() < deadline:
                    if cluster.procs[name].poll() is not None:
                        break
                    time.sleep(0.1)
                if not munge_socket.exists():
                    raise RuntimeError("munged did not create its socket:\n"
                                       + (root / "log" / "munged.stdout").read_text(errors="replace"))
        _wait_idle(cluster)
        yield cluster
    finally:
        if "slurmctld" in cluster.procs and cluster.procs["slurmctld"].poll() is None:
            cluster.run("scancel", "--user", "root", check=False, timeout=10)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and cluster.run(
                    "squeue", "--noheader", check=False, timeout=10).stdout.strip():
                time.sleep(0.5)
        stuck = _stop(cluster.procs)
        if stuck:
            raise RuntimeError(f"could not stop {stuck} (pids "
                               f"{[cluster.procs[n].pid for n in stuck]}); logs in {root}")
        shutil.rmtree(root, ignore_errors=True)

"""Start `disagg-mpi serve` as a subprocess for a benchmark, wait until it serves, stop it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# A launcher's variables would make the child think it already runs inside an MPI job.
_MPI_ENV_PREFIXES = ("PMI_", "PMIX_", "OMPI_", "MPI_LOCALNRANKS", "HYDRA_")
# ... but the user's own launcher settings stay (MCA parameters; running as root in a container).
_MPI_SETTINGS = ("OMPI_MCA_", "OMPI_ALLOW_RUN_AS_ROOT")
_READY = re.compile(r"serving on (http://\S+)")


class ServerError(RuntimeError):
    pass


class ServeProcess:
    """`disagg-mpi serve --config C --port 0 --port-file F` in its own process group.

    `start()` returns the base URL once the port file exists and `GET /health`
    answers 200; `stop()` sends SIGTERM to the serve process, waits `grace`
    seconds, then kills whatever is left of the process group.
    """

    def __init__(self, config: str, log_path: str | Path | None = None, host: str = "127.0.0.1",
                 startup_timeout: float = 900.0, grace: float = 30.0, extra_args: tuple[str, ...] = (),
                 base_command: list[str] | None = None):
        self.config = str(config)
        self.host = host
        self.startup_timeout = startup_timeout
        self.grace = grace
        self.extra_args = tuple(extra_args)
        self.base_command = base_command or [sys.executable, "-m", "disagg_mpi.cli", "serve"]
        self._tmp = tempfile.TemporaryDirectory(prefix="disagg-bench-")
        self.port_file = Path(self._tmp.name) / "port"
        self.log_path = Path(log_path) if log_path else Path(self._tmp.name) / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self._log = None
        self.clean_exit: bool | None = None

    def command(self) -> list[str]:
        return [*self.base_command, "--config", self.config, "--host", self.host,
                "--port", "0", "--port-file", str(self.port_file), *self.extra_args]

    def start(self) -> str:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_MPI_ENV_PREFIXES) or k.startswith(_MPI_SETTINGS)}
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the server's lifetime; closed in stop()
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            self.url = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.url

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _port(self) -> int | None:
        try:
            text = self.port_file.read_text().strip()
        except OSError:
            text = ""
        if text.isdigit() and int(text) > 0:
            return int(text)
        m = _READY.search(self.log_tail(200))
        if m:
            port = m.group(1).rstrip("/").rsplit(":", 1)[-1]
            if port.isdigit():
                return int(port)
        return None

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + self.startup_timeout
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"disagg-mpi serve --config {self.config} exited with code "
                                  f"{self.proc.returncode} before serving; log {self.log_path}:\n"
                                  f"{self.log_tail()}")
            if url is None:
                port = self._port()
                if port is not None:
                    host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
                    url = f"http://{host}:{port}"
            if url is not None and health_ok(url):
                return url
            time.sleep(0.5)
        raise ServerError(f"disagg-mpi serve --config {self.config} did not become healthy in "
                          f"{self.startup_timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM, wait `grace` s, then SIGKILL the process group; returns the serve exit code."""
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                rc = self.proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                rc = None
        # whatever is left of the group (mpiexec, ranks) after a clean exit or a timeout
        self._kill_group(signal.SIGKILL if rc is None else signal.SIGTERM)
        if rc is None:
            try:
                rc = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.clean_exit = rc == 0 or rc == -signal.SIGTERM
        if self._log:
            self._log.close()
            self._log = None
        return rc

    def _kill_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if sig == signal.SIGTERM:   # leftovers after a clean exit: give them a moment, then kill
            end = time.monotonic() + 5
            while time.monotonic() < end:
                try:
                    os.killpg(self.proc.pid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                time.sleep(0.2)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> ServeProcess:  # noqa: PYI034 - typing.Self needs Python 3.11
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._tmp.cleanup()


def health_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False

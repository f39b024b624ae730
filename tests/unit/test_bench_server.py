"""`disagg_mpi.bench.server.ServeProcess`: start, health, stop and the environment it passes on.

Uses a fake `serve` script (a tiny HTTP server that writes the port file), so no model or MPI job.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

FAKE_SERVE = r'''
import argparse, os, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
import threading
ap = argparse.ArgumentParser()
ap.add_argument("--config"); ap.add_argument("--host"); ap.add_argument("--port", type=int)
ap.add_argument("--port-file"); ap.add_argument("--mode", default="clean")
a = ap.parse_args()
if a.mode == "crash":
    print("boom: bad config", flush=True); sys.exit(3)
# a grandchild (like the MPI ranks) that the harness must not leave behind
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(a.port_file + ".child", "w").write(str(child.pid))
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args): pass
srv = HTTPServer((a.host, 0), H)
threading.Thread(target=srv.serve_forever, daemon=True).start()
time.sleep(0.3)
open(a.port_file, "w").write(str(srv.server_address[1]))
print(f"disagg-mpi serving on http://{a.host}:{srv.server_address[1]}", flush=True)
if a.mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(0.1)
'''


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:    # a zombie is as good as gone
        return f.read().split()[2] != "Z"


@pytest.mark.parametrize("mode", ["clean", "stubborn", "crash"])
def test_serve_process_lifecycle(tmp_path, mode):
    import sys

    from disagg_mpi.bench.server import ServeProcess, ServerError, health_ok

    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE_SERVE)
    srv = ServeProcess("cfg.yaml", tmp_path / "serve.log", startup_timeout=30, grace=1.0,
                       base_command=[sys.executable, str(script)], extra_args=("--mode", mode))
    if mode == "crash":
        with pytest.raises(ServerError, match="(?s)exited with code 3.*boom"):
            srv.start()
        return
    url = srv.start()
    assert health_ok(url)
    child = int(Path(str(srv.port_file) + ".child").read_text())
    assert _alive(child)
    t0 = time.time()
    rc = srv.stop()
    assert time.time() - t0 < 15
    assert rc == (0 if mode == "clean" else -9)
    assert srv.clean_exit == (mode == "clean")
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    assert not health_ok(url)


def test_serve_process_drops_job_markers_but_keeps_launcher_settings(tmp_path, monkeypatch):
    # A server started from inside an MPI job must not think it is a rank of it; the user's
    # MCA parameters and Open MPI's run-as-root switches must still reach its mpiexec.
    import subprocess

    from disagg_mpi.bench.server import ServeProcess

    for k, v in {"OMPI_COMM_WORLD_RANK": "3", "PMI_RANK": "3", "PMIX_NAMESPACE": "x",
                 "OMPI_MCA_btl": "self,vader", "OMPI_ALLOW_RUN_AS_ROOT": "1",
                 "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}.items():
        monkeypatch.setenv(k, v)
    seen = {}

    def fake_popen(cmd, env=None, **kw):
        seen.update(env)
        raise OSError("stop here")

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    srv = ServeProcess("cfg.yaml", tmp_path / "serve.log")
    with pytest.raises(OSError, match="stop here"):
        srv.start()
    assert not {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_NAMESPACE"} & set(seen)
    assert seen["OMPI_MCA_btl"] == "self,vader"
    assert seen["OMPI_ALLOW_RUN_AS_ROOT"] == seen["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"


def _servers_of(config: Path) -> list[int]:
    """Pids of live `disagg-mpi serve --config <config>` processes (and their MPI ranks)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(config) in cmd and "serve" in cmd and _alive(int(d.name)):
            pids.append(int(d.name))
    return pids


def test_sigterm_to_bench_stops_the_servers_it_started(tmp_path):
    """`timeout` / a scheduler ends `disagg-mpi bench` with SIGTERM: the real server it started (own
    session, with its MPI ranks) must not outlive it. It did, holding the GPUs of the next run."""
    import signal
    import subprocess
    import sys

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text('model: {path: "random:tiny", dtype: float32}\n'
                   "generation_executors:\n"
                   "  - {participant_ids: [1], max_batch_size: 4, max_num_tokens: 64,\n"
                   "     kv_cache: {block_size: 4, num_blocks: 64}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_COMM", "PMIX_", "HYDRA_"))}
    bench = subprocess.Popen([sys.executable, "-m", "disagg_mpi.cli", "bench", "--config", str(cfg),
                              "--num-requests", "1000", "--request-rate", "1", "--input-len", "8",
                              "--output-len", "8", "--no-plots", "--no-progress", "--out", str(tmp_path / "out")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = tmp_path / "out" / "serve-tiny.log"
        deadline = time.time() + 180
        while not (log.exists() and "serving on" in log.read_text(errors="replace")):
            assert bench.poll() is None and time.time() < deadline, "the bench's server did not come up"
            time.sleep(0.2)
        assert _servers_of(cfg)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) != 0
        deadline = time.time() + 30
        while _servers_of(cfg) and time.time() < deadline:
            time.sleep(0.2)
        assert not _servers_of(cfg), "the server outlived the bench"
    finally:
        bench.kill()
        for pid in _servers_of(cfg):
            os.kill(pid, signal.SIGKILL)

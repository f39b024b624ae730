"""The module-scoped `disagg-mpi serve` of test_serve_http.py: its topology, prompts, and the
fixtures that start it (mpiexec -n 3, random:tiny, 1 context + 1 generation executor, an API key)
and a `disagg-mpi run` of the same prompts beside it. Imported there, so one server serves the
module."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.http_client import clean_env as _clean_env

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
STARTUP_S = 180
MAX_BODY = 4096

TOPOLOGY = f"""
model: {{path: "random:tiny", dtype: float32}}
router: round_robin
server: {{host: 127.0.0.1, port: 0, api_key: {KEY}, max_body_bytes: {MAX_BODY}}}
context_executors:
  - participant_ids: [1]
    max_batch_size: 16
    max_num_tokens: 256
    kv_cache: {{block_size: 4, num_blocks: 512}}
    cache_transceiver_config: {{enable_cache_transceiver: true}}
generation_executors:
  - participant_ids: [2]
    max_batch_size: 32
    max_num_tokens: 256
    kv_cache: {{block_size: 4, num_blocks: 1024}}
    cache_transceiver_config: {{enable_cache_transceiver: true}}
"""

PROMPTS = [[(7 * i + 13 * j + 1) % 1024 for j in range(1 + (i * 11) % 40)] for i in range(6)]
TEXT_PROMPTS = ["Hello world", "The capital of France is"]


def _mpiexec() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else "mpiexec"


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    (d / "tiny.yaml").write_text(TOPOLOGY)
    lines = [{"id": f"ids{i}", "input_ids": p, "max_tokens": 12, "ignore_eos": True} for i, p in enumerate(PROMPTS)]
    lines += [{"id": f"text{i}", "prompt": t, "max_tokens": 12} for i, t in enumerate(TEXT_PROMPTS)]
    (d / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


@pytest.fixture(scope="module")
def batch_run(workdir):
    """`disagg-mpi run` on the same config, started beside the server; the test waits for it."""
    proc = subprocess.Popen([sys.executable, "-m", "disagg_mpi.cli", "run", "--config", str(workdir / "tiny.yaml"),
                             "--input", str(workdir / "in.jsonl"), "--output", str(workdir / "out.jsonl")],
                            env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


AGG_TOPOLOGY = f"""
model: {{path: "random:tiny", dtype: float32}}
server: {{host: 127.0.0.1, port: 0, api_key: {KEY}, max_body_bytes: {MAX_BODY}}}
generation_executors:
  - participant_ids: [1]
    max_batch_size: 32
    max_num_tokens: 256
    kv_cache: {{block_size: 4, num_blocks: 1024}}
"""


@contextlib.contextmanager
def launch(workdir: Path, name: str, topology: str, ranks: int):
    """`disagg-mpi serve` of `topology` under mpiexec -n `ranks`; yields a Server, kills it at the end."""
    config = workdir / f"{name}.yaml"
    if not config.exists():
        config.write_text(topology)
    port_file = workdir / f"{name}.port"
    log = workdir / f"{name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m",
                                 "disagg_mpi.cli", "serve", "--config", str(config), "--port-file", str(port_file),
                                 "--grace", "10"],
                                env=_clean_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while not port_file.exists():
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start in {STARTUP_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.1)
        srv = Server(proc, int(port_file.read_text()), log)
        deadline = time.monotonic() + 10
        while "serving on" not in log.read_text():
            assert time.monotonic() < deadline, "no 'serving on' line"
            time.sleep(0.05)
        yield srv
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(workdir, batch_run):
    with launch(workdir, "tiny", TOPOLOGY, 3) as srv:
        yield srv

"""What an HTTP client in flight sees when the job goes down under it (a real `disagg-mpi serve`).

- The `disagg-mpi serve` launcher killed with SIGKILL: its mpiexec gets a stop signal from the
  kernel (runtime/signals.py: stop_with_parent) and rank 0 drains; when the grace runs out, an
  open stream ends with a final chunk (finish_reason "cancelled") and `data: [DONE]`, and a
  non-streamed request gets a 503 JSON error body, instead of a dropped connection.
- An executor rank killed with SIGKILL: MPICH's Hydra SIGKILLs rank 0 within about 20 ms, so the
  launcher, which holds a duplicate of each connection in flight (runtime/last_words.py), ends
  them: an error event and `data: [DONE]` for a stream, a 503 JSON body for the others.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.unit.http_client import clean_env, post, run, stream
from tests.unit.test_rank_failure import _rank_pid

TOPOLOGY = """
model: {path: "random:tiny", dtype: float32}
server: {host: 127.0.0.1, port: 0}
context_executors:
  - participant_ids: [1]
    kv_cache: {block_size: 4, num_blocks: 512}
    cache_transceiver_config: {enable_cache_transceiver: true}
generation_executors:
  - participant_ids: [2]
    kv_cache: {block_size: 4, num_blocks: 1024}
    cache_transceiver_config: {enable_cache_transceiver: true}
"""
STARTUP_S = 180
LONG = {"model": "random:tiny", "prompt": [5, 6, 7], "max_tokens": 1500, "ignore_eos": True}


def _start(tmp_path) -> tuple[subprocess.Popen, int]:
    """`disagg-mpi serve` as a user starts it (it relaunches itself under mpiexec), grace 1 s."""
    (tmp_path / "topo.yaml").write_text(TOPOLOGY)
    port_file, log = tmp_path / "port", tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "disagg_mpi.cli", "serve", "--config",
                                 str(tmp_path / "topo.yaml"), "--port-file", str(port_file), "--grace", "1"],
                                env=clean_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + STARTUP_S
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_group(proc)
            pytest.fail(f"the server did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    return proc, int(port_file.read_text())


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher, mpiexec and the ranks: one session
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _in_flight_when(proc: subprocess.Popen, port: int, victim: int) -> tuple[list, int, dict]:
    """A streaming and a non-streamed request under way when `victim` gets SIGKILL; what each got."""
    url = f"http://127.0.0.1:{port}/v1/completions"

    async def go():
        started = asyncio.Event()
        async with aiohttp.ClientSession() as s:
            streamed = asyncio.ensure_future(stream(s, url, {**LONG, "stream": True}, started=started))
            full = asyncio.ensure_future(post(s, url, LONG))
            await asyncio.wait_for(started.wait(), 60)
            await asyncio.sleep(0.3)
            assert not streamed.done() and not full.done(), "finished before the kill"
            os.kill(victim, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(streamed, full), 60)

    try:
        events, (status, body) = run(go())
        if victim != proc.pid:
            proc.wait(timeout=30)  # the launcher exits once it has told the clients (and says so)
    finally:
        _kill_group(proc)
    return events, status, body


def test_executor_killed_clients_get_an_error_event_and_done_or_a_503(tmp_path):
    proc, port = _start(tmp_path)
    victim = _rank_pid(proc.pid, 2)
    assert victim is not None
    events, status, body = _in_flight_when(proc, port, victim)
    log = (tmp_path / "serve.log").read_text()
    assert events[-1][1] == "[DONE]", (events[-3:], log[-3000:])
    err = events[-2][1]["error"]
    assert err["code"] == "job_died" and err["type"] == "server_error" and "killed" in err["message"], err
    assert any("choices" in e for _, e in events[:-2])  # tokens came before the error
    assert status == 503 and body["error"]["code"] == "job_died", body
    assert "told 2 HTTP clients in flight that the job died" in log, log[-3000:]


def test_launcher_killed_streams_end_with_done_and_waiting_requests_get_503(tmp_path):
    proc, port = _start(tmp_path)
    events, status, body = _in_flight_when(proc, port, proc.pid)  # the launcher: no handler of its own can run
    log = (tmp_path / "serve.log").read_text()
    assert events[-1][1] == "[DONE]", (events[-3:], log[-3000:])
    last = events[-2][1]
    assert last["choices"][0]["finish_reason"] == "cancelled", last  # cut by the drain's deadline
    assert 0 < sum(len(e["choices"][0]["token_ids"]) for _, e in events[:-1]) < LONG["max_tokens"]
    assert status == 503, body
    assert body["error"]["code"] == "shutting_down" and body["error"]["type"] == "server_error", body
    assert "shutting down; draining" in log

"""Last words (runtime/last_words.py, serve/last_words.py): the bytes are valid HTTP, and the
launcher's keeper writes them to held connections over real Unix sockets, only when asked."""

from __future__ import annotations

import json
import socket
import time

import pytest

from disagg_mpi.runtime.last_words import ENV, Keeper, Teller
from disagg_mpi.serve.last_words import http_error, stream_end


def _events(payload: bytes) -> list[object]:
    out = []
    for ev in payload.split(b"\n\n")[:-1]:
        assert ev.startswith(b"data: "), ev
        data = ev[len(b"data: "):]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def test_a_stream_ends_with_an_error_event_then_done_as_its_last_chunk():
    raw = stream_end(chunked=True)
    size, rest = raw.split(b"\r\n", 1)
    n = int(size, 16)
    assert rest[n:] == b"\r\n0\r\n\r\n"  # the chunk, then the chunked body's end
    err, done = _events(rest[:n])
    assert err["error"]["code"] == "job_died" and err["error"]["type"] == "server_error" and done == "[DONE]"
    assert _events(stream_end(chunked=False)) == [err, "[DONE]"]


def test_a_waiting_request_gets_a_whole_503_with_a_json_body():
    head, body = http_error().split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    headers = dict(x.split(b": ", 1) for x in lines[1:])
    assert int(headers[b"Content-Length"]) == len(body) and headers[b"Connection"] == b"close"
    assert json.loads(body)["error"]["code"] == "job_died"


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.parametrize("died", [True, False], ids=["job-died", "job-ended-well"])
def test_the_keeper_speaks_to_held_connections_only_when_the_job_died(tmp_path, died):
    keeper = Keeper(str(tmp_path / "lw"))
    teller = Teller.connect({ENV: keeper.path})
    assert teller is not None
    held, held_peer = socket.socketpair()
    done, done_peer = socket.socketpair()
    teller.hold(1, held.fileno(), b"first")
    teller.update(1, b"bye")
    teller.hold(2, done.fileno(), b"never")
    teller.drop(2)  # a request that finished: its connection is rank 0's alone again
    _wait(lambda: keeper.held == 1)
    for s in (held, done, teller):
        s.close()  # rank 0 dies: only the keeper's copy is left
    assert keeper.close(speak=died) == int(died)
    held_peer.settimeout(5)
    assert held_peer.recv(100) == (b"bye" if died else b"")
    assert held_peer.recv(100) == b""  # then the connection ends
    done_peer.settimeout(5)
    assert done_peer.recv(100) == b""


def test_no_launcher_no_teller(tmp_path):
    assert Teller.connect({}) is None
    assert Teller.connect({ENV: str(tmp_path / "none")}) is None  # e.g. rank 0 on another host

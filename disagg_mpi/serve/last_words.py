"""What a client in flight reads if the job dies under it (runtime/last_words.py writes it).

Two forms: before a response began, a whole HTTP 503 with an OpenAI-shaped error body; once a
stream's headers went out, an SSE error event and `data: [DONE]` as the stream's last chunk (and
the chunked body's end). Pure, so the bytes are tested alone; `LastWords` tells the launcher.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from ..runtime.last_words import Teller
from .errors import error_body

DIED = ("the serving job died before the request finished (a rank of it was killed or crashed); "
        "send it again")


def _body() -> bytes:
    return json.dumps(error_body(DIED, "server_error", None, "job_died")).encode()


def http_error() -> bytes:
    """A whole response: 503, JSON error body, and the connection closes after it."""
    body = _body()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


def stream_end(chunked: bool) -> bytes:
    """The last event of a stream already under way, then [DONE] (and the chunked body's end)."""
    events = b"data: " + _body() + b"\n\ndata: [DONE]\n\n"
    if not chunked:
        return events
    return f"{len(events):x}\r\n".encode() + events + b"\r\n0\r\n\r\n"


class LastWords:
    """Rank 0's side for the HTTP server: one key per request in flight (None: no launcher here)."""

    def __init__(self, teller: Teller | None):
        self.teller = teller
        self._keys = itertools.count(1)

    def hold(self, request: Any) -> int | None:
        sock = request.transport.get_extra_info("socket") if self.teller and request.transport else None
        if sock is None:
            return None
        key = next(self._keys)
        self.teller.hold(key, sock.fileno(), http_error())
        return key

    def streaming(self, key: int | None, request: Any) -> None:
        """Before a stream's headers go out: from now on its end is an error event, not a 503."""
        if key is not None:
            self.teller.update(key, stream_end(chunked=request.version >= (1, 1)))

    def drop(self, key: int | None) -> None:
        if key is not None:
            self.teller.drop(key)

"""Last words: bytes the launcher writes to rank 0's open client connections if the job dies.

When any rank dies (SIGKILL, a crash), MPICH's Hydra SIGKILLs every other rank, rank 0 included,
15-40 ms later and with no signal first (measured; README "When the job goes down"): rank 0 cannot
tell its HTTP clients anything. The `disagg-mpi` process that started `mpiexec` lives on, on rank
0's host. So rank 0 hands it a duplicate of each connection that has a request in flight (a file
descriptor over a Unix socket, SCM_RIGHTS) with the bytes that end it properly, and takes it back
when the request is over. The connection stays open while the launcher holds it; when the job
ends with an error, the launcher writes those bytes and closes them all.

This module moves bytes and descriptors only; what the bytes say is the HTTP server's
(serve/last_words.py). Off when rank 0 is not on the launcher's host or no launcher started the job.
"""

from __future__ import annotations

import os
import socket
import struct
import threading

ENV = "DISAGG_MPI_LAST_WORDS"  # the Unix socket's path, set by the launcher for its ranks
_HEAD = struct.Struct("!cQ")  # op (b"h" hold, b"u" update, b"d" drop), key; then the words
_MAX = 1 << 16


class Keeper:
    """The launcher's side: holds rank 0's connections and their last words."""

    def __init__(self, path: str):
        self.path = path
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._server.bind(path)
        self._server.listen(1)
        self._held: dict[int, tuple[int, bytes]] = {}  # key -> (fd, words)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="last-words")
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._server.accept()
        except OSError:
            return  # closed before rank 0 came
        with conn:
            while True:
                try:
                    msg, fds, _flags, _addr = socket.recv_fds(conn, _MAX, 1)
                except OSError:
                    return
                if not msg:
                    for fd in fds:
                        os.close(fd)
                    return  # rank 0 is gone (or closed its side)
                self._take(msg, fds)

    def _take(self, msg: bytes, fds: list[int]) -> None:
        op, key = _HEAD.unpack_from(msg)
        words = msg[_HEAD.size:]
        with self._lock:
            if op == b"h" and fds:
                self._held[key] = (fds[0], words)
                fds = fds[1:]
            elif op == b"u" and key in self._held:
                self._held[key] = (self._held[key][0], words)
            elif op == b"d" and key in self._held:
                os.close(self._held.pop(key)[0])
        for fd in fds:  # never leak one we did not keep
            os.close(fd)

    @classmethod
    def start(cls, path: str) -> Keeper | None:
        """A keeper listening at `path`, or None where no Unix socket can be made (the job then runs
        without last words)."""
        try:
            return cls(path)
        except OSError:
            return None

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def close(self, speak: bool) -> int:
        """Stop; with `speak` (the job died), first write each held connection its words. Returns
        how many were spoken to."""
        for stop in (lambda: self._server.shutdown(socket.SHUT_RDWR), self._server.close):
            try:
                stop()  # shutdown wakes an accept() still waiting (no rank 0 came: `run`)
            except OSError:
                pass
        self._thread.join(timeout=1)  # rank 0's last messages, if its socket is already closed
        spoken = 0
        with self._lock:
            for fd, words in self._held.values():
                try:
                    if speak and words:
                        os.write(fd, words)
                        spoken += 1
                    socket.socket(fileno=fd).shutdown(socket.SHUT_RDWR)  # the client sees the end now
                except OSError:
                    pass
                finally:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._held.clear()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        return spoken


class Teller:
    """Rank 0's side. `connect()` is None when no launcher on this host listens."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    @classmethod
    def connect(cls, environ: dict[str, str] | None = None) -> Teller | None:
        path = (environ if environ is not None else os.environ).get(ENV)
        if not path:
            return None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(0.5)  # a stopped launcher must not stall rank 0's event loop for long
        try:
            s.connect(path)  # fails on another host: the path does not exist there
        except OSError:
            s.close()
            return None
        return cls(s)

    def _send(self, op: bytes, key: int, words: bytes, fds: list[int]) -> None:
        try:
            socket.send_fds(self._sock, [_HEAD.pack(op, key) + words[:_MAX - _HEAD.size]], fds)
        except OSError:
            pass  # the launcher is gone: the job is stopping anyway, nothing to keep

    def hold(self, key: int, fd: int, words: bytes) -> None:
        self._send(b"h", key, words, [fd])

    def update(self, key: int, words: bytes) -> None:
        self._send(b"u", key, words, [])

    def drop(self, key: int) -> None:
        self._send(b"d", key, b"", [])

    def close(self) -> None:
        self._sock.close()

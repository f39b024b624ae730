"""Staging buffers shared by the two ranks of a same-node transfer (staged backend).

Through MPI, a staged chunk crosses host memory three times: the context
rank's D2H into pinned memory, the MPI library's copy between the two
processes (Open MPI 4.1 on the H100 machine: about 5.8 GB/s, a tenth of a
pinned copy), and the generation rank's H2D. When both ranks are on one
node, the generation rank instead lends the context rank a ring of `SLOTS`
slots in shared memory (a file in /dev/shm, page-locked in both processes
with cudaHostRegister): the context rank copies a chunk D2H into slot
k % SLOTS and sends a one-integer notice, the generation rank copies it
H2D straight out of the slot and sends the slot back. MPI carries only the
notices; the bytes cross host memory once each way, and with several slots one
chunk's D2H overlaps the other's H2D.

`DISAGG_SHARED_STAGING=0` (or `shared_staging: false`) keeps the bytes on MPI.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import weakref

import torch

log = logging.getLogger(__name__)

_SHM_DIR = "/dev/shm"
SLOTS = int(os.environ.get("DISAGG_RING_SLOTS", "3"))  # chunks in flight through a ring (buffer_bytes shared)
_ALIGN = 1 << 21
_names = itertools.count()


def available() -> str | None:
    """None when rings can be made here, else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not os.path.isdir(_SHM_DIR) or not os.access(_SHM_DIR, os.W_OK):
        return f"{_SHM_DIR} is not a writable folder"
    return None


class _Mapping:
    """A shared file mapped and page-locked in this process."""

    def __init__(self, path: str, nbytes: int, create: bool):
        self.path, self.nbytes = path, nbytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, nbytes)
            self._mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._registered = False
        if torch.cuda.is_available():  # page-locked: async DMA at full speed (CPU-only builds: plain memory)
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(err) != 0:
                log.warning("cudaHostRegister of %s failed (%s): copies will not overlap", path, err)
            else:
                self._registered = True

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._registered = False
        self.tensor = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:  # a view is still alive somewhere: leave it to the GC
            pass


class Ring:
    """`slots` page-locked slots of `slot_bytes` each, in a shared file (made by the generation rank)."""

    def __init__(self, slot_bytes: int, slots: int, path: str | None = None):
        self.slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
        self.slots = slots
        self.owner = path is None
        self.path = path or os.path.join(_SHM_DIR, f"disagg-kv-{os.getpid()}-{next(_names)}")
        self._map = _Mapping(self.path, self.slot_bytes * slots, create=self.owner)
        if self.owner:  # the file goes when we do, even if close() is never called
            self._fin = weakref.finalize(self, _unlink, self.path)

    def describe(self) -> dict:
        return {"path": self.path, "slot_bytes": self.slot_bytes, "slots": self.slots}

    def slot(self, k: int, nbytes: int) -> torch.Tensor:
        """Bytes [0, nbytes) of slot k % slots, as a uint8 host tensor."""
        if nbytes > self.slot_bytes:
            raise ValueError(f"chunk of {nbytes} bytes does not fit a {self.slot_bytes}-byte slot")
        start = (k % self.slots) * self.slot_bytes
        return self._map.tensor[start:start + nbytes]

    def close(self) -> None:
        self._map.close()
        if self.owner:
            self._fin()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class RingPool:
    """Generation side: rings lent to one transfer item at a time, at most `max_live` of them.

    A pull that finds none free goes over MPI instead (so concurrent pulls cannot pin
    unbounded host memory, and a small /dev/shm only costs speed)."""

    def __init__(self, max_live: int = 4):
        self.max_live = max_live
        self._free: list[Ring] = []
        self.live = 0
        self.made = 0
        self.failed: str | None = None  # why the last ring could not be made

    def get(self, slot_bytes: int, slots: int) -> Ring | None:
        for i, r in enumerate(self._free):
            if r.slot_bytes >= slot_bytes and r.slots == slots:
                return self._free.pop(i)
        if self.live >= self.max_live:
            if not self._free:
                return None
            self._free.pop(0).close()  # too small for this pull: make room for a bigger one
            self.live -= 1
        try:
            ring = Ring(slot_bytes, slots)
        except OSError as err:
            if self.failed is None:
                log.warning("cannot make a shared staging ring (%s); staged transfers go over MPI", err)
            self.failed = str(err)
            return None
        self.live += 1
        self.made += 1
        return ring

    def put(self, ring: Ring) -> None:
        self._free.append(ring)

    def close(self) -> None:
        for r in self._free:
            r.close()
        self._free.clear()


class RingMaps:
    """Context side: rings lent by generation ranks, mapped once each (by path).

    At most `keep` stay mapped; beyond that the oldest one no transfer uses is closed."""

    def __init__(self, keep: int = 32):
        self.keep = keep
        self._maps: dict[str, Ring] = {}

    def get(self, desc: dict, in_use: set[str] = frozenset()) -> Ring:
        ring = self._maps.pop(desc["path"], None)
        if ring is None:
            ring = Ring(int(desc["slot_bytes"]), int(desc["slots"]), path=desc["path"])
            for path in [p for p in self._maps if p not in in_use][: max(0, len(self._maps) + 1 - self.keep)]:
                self._maps.pop(path).close()
        self._maps[desc["path"]] = ring  # most recently used last
        return ring

    def close(self) -> None:
        for r in self._maps.values():
            r.close()
        self._maps.clear()

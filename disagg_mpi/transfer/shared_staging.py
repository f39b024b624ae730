"""Staging buffers shared by the two ranks of a same-node transfer (staged backend).

Through MPI, a staged chunk crosses host memory three times: the context
rank's D2H into pinned memory, the MPI library's copy between the two
processes (Open MPI 4.1 on the H100 machine: about 5.8 GB/s, a tenth of a
pinned copy), and the generation rank's H2D. When both ranks are on one
node, the generation rank instead lends the context rank a ring of `SLOTS`
slots in shared memory (a file in /dev/shm, page-locked in both processes
with cudaHostRegister), followed by a page of flags: the context rank copies
chunk k D2H into slot k % SLOTS, the generation rank copies it H2D straight
out of the slot. The bytes cross host memory once each way, and with several
slots one chunk's D2H overlaps another's H2D.

A generation rank keeps one ring per context rank it pulls from, and the
pulls from that rank take turns in it: each pull is given the next `n` chunk
numbers of the ring (`seq` .. `seq + n`) when it is asked, and chunk number g
uses slot g % SLOTS. The two ranks' streams wait for each other on the GPU
(`stream_ops.py`), not on the host: after chunk g's D2H the context stream
writes `ready[slot]` = g + 1, and the generation stream waits for it before
the H2D; after the H2D it writes `free[slot]` = g + 1, which the context
stream waits for before it puts chunk g + SLOTS in the slot (`sender_steps`,
`receiver_steps`). Each side queues every chunk of a pull at once, so pulls
run at copy speed whatever the ranks' loops are doing (an executor's loop
polls between model steps), and MPI carries only a pull and its answer.

A GPU wait that nobody satisfies would hold a stream forever, so:
- the generation rank queues a pull's waits only after the context rank
  answered "ring", and the context rank queues every write it owes right
  after answering, whatever happens next;
- both sides queue a ring's pulls in chunk-number order: the context rank
  gets the pulls in the order they were asked (one MPI tag) and starts them
  in that order; the generation rank holds an answered pull back until the
  ones before it on the ring are queued;
- a context rank's ring pulls on its GPU at any time all go to one
  generation rank (it starts pulls for another once they are done). The
  oldest unfinished ring pull on a generation stream then comes from a
  context rank whose stream holds it as its oldest unfinished work that waits,
  so some pull always progresses: no cycle of waits across ranks;
- a ring the context rank could not use is never lent again (a gap in its
  chunk numbers would leave the next pull waiting).

`DISAGG_SHARED_STAGING=0` (or `shared_staging: false`) keeps the bytes on MPI.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import weakref

import torch

from ..knobs import env_value
from . import stream_ops
from .staging import typed_view

try:  # pragma: no cover - depends on the install (CUDA machines have cupy)
    from cupy.cuda.runtime import memcpyAsync as _memcpy_async
except ImportError:
    _memcpy_async = None
_H2D, _D2H = 1, 2  # cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost

log = logging.getLogger(__name__)

_SHM_DIR = "/dev/shm"
SLOTS = env_value("DISAGG_RING_SLOTS")  # slots of a ring: buffer_bytes / SLOTS per chunk (1..MAX_SLOTS)
_ALIGN = 1 << 21
_FLAGS = 4096  # a page after the slots: ready[s] at 4 * s, free[s] at _FREE + 4 * s
_FREE = _FLAGS // 2
MAX_SLOTS = _FREE // 4


def sender_steps(seq: int, nchunks: int, slots: int) -> list[tuple[int, int | None, int]]:
    """Context side of a pull given chunk numbers seq .. seq + nchunks, per chunk g: (slot,
    wait until free[slot] >= g - slots + 1 (None: the ring's first use of the slot), then the
    D2H, then ready[slot] = g + 1)."""
    return [(g % slots, g - slots + 1 if g >= slots else None, g + 1) for g in range(seq, seq + nchunks)]


def receiver_steps(seq: int, nchunks: int, slots: int) -> list[tuple[int, int, int]]:
    """Generation side, per chunk g: (slot, wait until ready[slot] >= g + 1, then the H2D,
    then free[slot] = g + 1)."""
    return [(g % slots, g + 1, g + 1) for g in range(seq, seq + nchunks)]
_names = itertools.count()


def available() -> str | None:
    """None when rings can be made here, else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not os.path.isdir(_SHM_DIR) or not os.access(_SHM_DIR, os.W_OK):
        return f"{_SHM_DIR} is not a writable folder"
    if not 1 <= SLOTS <= MAX_SLOTS:
        return f"DISAGG_RING_SLOTS={SLOTS} is out of range (1..{MAX_SLOTS})"
    return stream_ops.load()[1]


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
        self.device_ptr = 0  # the mapping's address for GPU-side waits and writes (0: none)
        if torch.cuda.is_available():  # page-locked: async DMA at full speed (CPU-only builds: plain memory)
            # portable | mapped: every device of this process may copy from it and poll its flags
            err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 3)
            if int(err) != 0:
                self.close()
                raise OSError(f"cudaHostRegister of {path} failed ({err})")
            self._registered = True
            ops, _ = stream_ops.load()
            if ops is not None:
                self.device_ptr = ops.device_pointer(self.tensor.data_ptr())

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
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"a ring has 1..{MAX_SLOTS} slots, not {slots}")
        self.slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
        self.slots = slots
        self.seq = 0  # owner: the next chunk number to give a pull
        self.landed = 0  # owner: the first chunk number whose H2D is not queued yet
        self.users = 0  # owner: pulls it is lent to that have not finished
        self.owner = path is None
        self.path = path or os.path.join(_SHM_DIR, f"disagg-kv-{os.getpid()}-{next(_names)}")
        try:
            self._map = _Mapping(self.path, self.slot_bytes * slots + _FLAGS, create=self.owner)
        except OSError:
            if self.owner:
                _unlink(self.path)
            raise
        self._base = self._map.tensor.data_ptr()
        if self.owner:  # the file goes when we do, even if close() is never called
            self._fin = weakref.finalize(self, _unlink, self.path)

    def describe(self) -> dict:
        return {"path": self.path, "slot_bytes": self.slot_bytes, "slots": self.slots}

    def ready_flag(self, k: int) -> int:
        """Device address of slot k % slots' "chunk is in" word."""
        return self._flag(k % self.slots * 4)

    def free_flag(self, k: int) -> int:
        """Device address of slot k % slots' "slot is read" word."""
        return self._flag(_FREE + k % self.slots * 4)

    def _flag(self, offset: int) -> int:
        if not self._map.device_ptr:
            raise RuntimeError(f"the ring {self.path} is not mapped for the GPU")
        return self._map.device_ptr + self.slot_bytes * self.slots + offset

    def flags(self) -> tuple[list[int], list[int]]:
        """(ready, free) words as the host sees them (tests, diagnostics)."""
        words = self._map.tensor[self.slot_bytes * self.slots:].view(torch.int32)
        return words[: self.slots].tolist(), words[_FREE // 4: _FREE // 4 + self.slots].tolist()

    def slot(self, k: int, nbytes: int) -> torch.Tensor:
        """Bytes [0, nbytes) of slot k % slots, as a uint8 host tensor."""
        start = self._slot_ptr(k, nbytes) - self._base
        return self._map.tensor[start:start + nbytes]

    def put(self, k: int, src: torch.Tensor, stream: torch.cuda.Stream) -> int:
        """Queue on `stream` (the current one) the D2H copy of `src` into slot k % slots; returns its
        bytes. A contiguous tensor goes as one raw cudaMemcpyAsync, which halved the host time to
        queue a chunk against a torch copy_ through a typed view of the slot (about 28 vs 60 us on
        the H200 host, probe_ring.py); a pull queues every chunk at once."""
        nbytes = src.numel() * src.element_size()
        if _memcpy_async is not None and src.is_contiguous():
            _memcpy_async(self._slot_ptr(k, nbytes), src.data_ptr(), nbytes, _D2H, stream.cuda_stream)
        else:
            typed_view(self.slot(k, nbytes), src.dtype, tuple(src.shape)).copy_(src, non_blocking=True)
        return nbytes

    def take(self, k: int, dst: torch.Tensor, stream: torch.cuda.Stream) -> int:
        """Queue on `stream` (the current one) the H2D copy of slot k % slots into `dst`; returns its
        bytes (as `put`)."""
        nbytes = dst.numel() * dst.element_size()
        if _memcpy_async is not None and dst.is_contiguous():
            _memcpy_async(dst.data_ptr(), self._slot_ptr(k, nbytes), nbytes, _H2D, stream.cuda_stream)
        else:
            dst.copy_(typed_view(self.slot(k, nbytes), dst.dtype, tuple(dst.shape)), non_blocking=True)
        return nbytes

    def _slot_ptr(self, k: int, nbytes: int) -> int:
        """Host address of slot k % slots, checked to hold `nbytes`."""
        if nbytes > self.slot_bytes:
            raise ValueError(f"chunk of {nbytes} bytes does not fit a {self.slot_bytes}-byte slot")
        return self._base + (k % self.slots) * self.slot_bytes

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
    """Generation side: one ring per context rank, shared by the pulls from it in turn.

    At most `max_live` rings (each pins SLOTS x slot bytes of host memory); a pull that gets
    none (a new peer past the limit, a chunk bigger than its peer's slots, a peer that refused
    a ring: on another node, say) goes over MPI."""

    def __init__(self, max_live: int = 8):
        self.max_live = max_live
        self._rings: dict[int, Ring] = {}
        self._retired: list[Ring] = []
        self._refused: set[int] = set()  # peers that could not use our ring: MPI from then on
        self.made = 0
        self.failed: str | None = None  # why the last ring could not be made

    def may_lend(self, peer: int) -> bool:
        """Whether a pull from `peer` may get a ring (its chunks are cut for one if so)."""
        return peer not in self._refused and (peer in self._rings or len(self._rings) < self.max_live)

    def get(self, peer: int, slot_bytes: int, slots: int) -> Ring | None:
        """`peer`'s ring, lent to one more pull (`give_back` when it is done), or None."""
        if not self.may_lend(peer):
            return None
        ring = self._rings.get(peer)
        if ring is not None:
            if ring.slot_bytes < slot_bytes or ring.slots != slots:
                return None
            ring.users += 1
            return ring
        try:
            ring = Ring(slot_bytes, slots)
        except (OSError, RuntimeError) as err:
            if self.failed is None:
                log.warning("cannot make a shared staging ring (%s); staged transfers go over MPI", err)
            self.failed = str(err)
            return None
        self._rings[peer] = ring
        self.made += 1
        ring.users += 1
        return ring

    def give_back(self, ring: Ring) -> None:
        """A pull is done with `ring`; a retired ring is closed once no pull uses it."""
        ring.users -= 1
        if ring.users == 0 and ring in self._retired:
            self._retired.remove(ring)
            ring.close()

    def retire(self, peer: int, ring: Ring) -> None:
        """The context rank refused `ring`: lend `peer` no ring again (this one stays while pulls
        answered before use it)."""
        self._refused.add(peer)
        if self._rings.get(peer) is ring:
            self._retired.append(self._rings.pop(peer))

    def close(self) -> None:
        for r in (*self._rings.values(), *self._retired):
            r.close()
        self._rings.clear()
        self._retired.clear()


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

"""GPU helpers of the transceiver's copy path: pinned host staging, a side stream, byte views.

When a rank's KV pool is on CUDA and its MPI library is not CUDA-aware (the
usual case; see `disagg_mpi.runtime.devices.mpi_cuda_support`), MPI only ever
sees host memory: a sender copies a chunk device -> pinned host on the
transceiver's side stream (`non_blocking=True`) and posts the `Isend` once
the copy's event has completed; a receiver `Irecv`s into pinned host memory,
then copies host -> device (and scatters into its blocks) on the side stream.
With two chunks in flight per transfer, one chunk's D2H/H2D overlaps the
other's MPI message.

Pinned buffers are expensive to allocate (`cudaHostAlloc`), so a transceiver
keeps a few (`PinnedBuffers`), reused transfer after transfer.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

_ALIGN = 1 << 20  # pinned buffers are allocated in whole MiB, so chunks of varying size share them


class PinnedBuffers:
    """A small free list of page-locked byte buffers (torch uint8 tensors)."""

    def __init__(self, keep: int = 6):
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self.allocated = 0  # bytes ever allocated here (for tests / reports)

    def get(self, nbytes: int) -> torch.Tensor:
        """A pinned uint8 tensor of at least `nbytes` (its length may be larger)."""
        best = None
        for i, b in enumerate(self._free):
            if b.numel() >= nbytes and (best is None or b.numel() < self._free[best].numel()):
                best = i
        if best is not None:
            return self._free.pop(best)
        size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        self.allocated += size
        return torch.empty(size, dtype=torch.uint8, pin_memory=True)

    def put(self, buf: torch.Tensor) -> None:
        self._free.append(buf)
        if len(self._free) > self.keep:  # drop the smallest
            self._free.sort(key=lambda b: b.numel())
            del self._free[0]

    def clear(self) -> None:
        self._free.clear()


def typed_view(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The first bytes of a uint8 buffer seen as a contiguous tensor of `dtype` and `shape`."""
    n = 1
    for s in shape:
        n *= s
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return raw[:nbytes].view(dtype).view(shape)


def mpi_host_buffer(t: torch.Tensor) -> Any:
    """A numpy view of a contiguous host tensor that MPI moves as-is (bf16 goes as bytes)."""
    return t.view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def mpi_device_buffer(t: torch.Tensor) -> Any:
    """A CUDA tensor for a CUDA-aware MPI (bf16, which MPI has no type for, goes as bytes)."""
    return t.view(torch.uint8) if t.dtype == torch.bfloat16 else t


def _cupy_runtime() -> Any:
    try:
        import cupy
    except ImportError:
        return None
    return cupy.cuda.runtime


class RawEvent:
    """A CUDA event recorded on a stream through cupy's thin runtime bindings.

    Creating and recording one costs ~1 us each, a torch.cuda.Event ~5 us; a one-sided IPC
    pull records one on its critical path. Only `query` and `synchronize` are offered."""

    __slots__ = ("_ev", "_rt")

    def __init__(self, rt: Any, stream: int):
        self._rt = rt
        self._ev = rt.eventCreateWithFlags(getattr(rt, "eventDisableTiming", 2))
        rt.eventRecord(self._ev, stream)

    def record(self, stream: int) -> RawEvent:
        """Record again (a recycled event: no create / destroy on the critical path)."""
        self._rt.eventRecord(self._ev, stream)
        return self

    def query(self) -> bool:
        return self._rt.eventQuery(self._ev) == 0   # cudaSuccess; cudaErrorNotReady is 600

    def synchronize(self) -> None:
        self._rt.eventSynchronize(self._ev)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown the context may be gone
            self._rt.eventDestroy(self._ev)


def _raw_ordering(compute: torch.cuda.Stream, side: torch.cuda.Stream):
    """A callable making `side` wait for `compute`'s queued work through cupy's thin runtime
    bindings (None without cupy)."""
    rt = _cupy_runtime()
    if rt is None:
        return None
    ev = rt.eventCreateWithFlags(getattr(rt, "eventDisableTiming", 2))
    c, s = compute.cuda_stream, side.cuda_stream

    def order() -> None:
        rt.eventRecord(ev, c)
        rt.streamWaitEvent(s, ev, 0)

    return order


class SideStream:
    """The transceiver's own CUDA stream; copies and scatters run there, not on the model's stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        # The model's stream: the one current when the transceiver is made (the engine's steps
        # run there). Looked up once: torch.cuda.current_stream costs ~10 us per call.
        self.compute = torch.cuda.current_stream(device)
        self._ordered = torch.cuda.Event()
        self._raw = _raw_ordering(self.compute, self.stream)
        self._rt = _cupy_runtime()
        if self._rt is not None:  # cupy's runtime calls act on its current device: this rank's
            self._rt.setDevice(device.index if device.index is not None else torch.cuda.current_device())
        self._handle = self.stream.cuda_stream
        self._spare_events: list[RawEvent] = []  # completed events, recorded again by record()

    def after_compute(self) -> None:
        """Order the side stream after everything the model's stream has queued so far
        (the prefill's KV writes on a sender; the last reads of recycled blocks on a receiver)."""
        if self._raw is not None:  # two runtime calls, ~3 us instead of torch's ~15
            self._raw()
            return
        self._ordered.record(self.compute)
        self.stream.wait_event(self._ordered)

    def compute_waits(self, ev: RawEvent | torch.cuda.Event) -> None:
        """Make the model's stream wait for `ev` (of `record()`): the steps queued from now on run
        after the side-stream copies before it, with no host wait (a pull's blocks join the batch)."""
        if isinstance(ev, RawEvent):
            self._rt.streamWaitEvent(self.compute.cuda_stream, ev._ev, 0)
        else:
            self.compute.wait_event(ev)

    def recycle(self, ev: RawEvent | torch.cuda.Event) -> None:
        """Hand back an event of `record()` that has completed and is not looked at again."""
        if isinstance(ev, RawEvent) and len(self._spare_events) < 8:
            self._spare_events.append(ev)

    def __enter__(self) -> torch.cuda.Stream:
        self._ctx = torch.cuda.stream(self.stream)
        self._ctx.__enter__()
        return self.stream

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    def record(self) -> RawEvent | torch.cuda.Event:
        """An event after the work queued on the side stream so far (`query()`, `synchronize()`)."""
        if self._rt is not None:
            if self._spare_events:
                return self._spare_events.pop().record(self._handle)
            return RawEvent(self._rt, self._handle)
        ev = torch.cuda.Event()
        ev.record(self.stream)  # explicit stream: no need to be inside `with side`
        return ev

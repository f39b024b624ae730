"""Waits and writes that a CUDA stream does on host memory (CUDA stream memory operations).

`cuStreamWaitValue32` holds a stream until a 32-bit word reaches a value;
`cuStreamWriteValue32` writes a word once the stream's earlier work is done.
On a word in page-locked memory that two processes share, these let two
ranks' streams wait for each other on the GPU, with no host thread watching
an event in between: the shared staging ring (`shared_staging.py`) uses them
so that a staged chunk's D2H on one rank and its H2D on the other follow each
other at GPU speed, whatever the two ranks' Python loops are doing.

The driver API is called through ctypes (torch and cupy do not bind these
calls); the calls act on the calling thread's current context, which torch
has made current for the rank's device.
"""

from __future__ import annotations

import ctypes
from typing import Any

_WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*addr - value) >= 0, so it survives a wrap of 2**32
_WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: ordered after, and visible after, earlier work


class StreamOps:
    """The three driver calls, resolved once."""

    def __init__(self, lib: Any):
        self._wait = _entry(lib, "cuStreamWaitValue32")
        self._write = _entry(lib, "cuStreamWriteValue32")
        self._devptr = _entry(lib, "cuMemHostGetDevicePointer")
        for f in (self._wait, self._write):
            f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            f.restype = ctypes.c_int
        self._devptr.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        self._devptr.restype = ctypes.c_int

    def wait_geq(self, stream: int, addr: int, value: int) -> None:
        """Queue on `stream`: wait until the word at device address `addr` is >= `value`."""
        _check(self._wait(stream, addr, value & 0xFFFFFFFF, _WAIT_GEQ), "cuStreamWaitValue32")

    def write(self, stream: int, addr: int, value: int) -> None:
        """Queue on `stream`: once its earlier work is done, set the word at `addr` to `value`."""
        _check(self._write(stream, addr, value & 0xFFFFFFFF, _WRITE_DEFAULT), "cuStreamWriteValue32")

    def device_pointer(self, host_ptr: int) -> int:
        """The device address of registered (cudaHostRegister'd, mapped) host memory."""
        out = ctypes.c_uint64()
        _check(self._devptr(ctypes.byref(out), ctypes.c_void_p(host_ptr), 0), "cuMemHostGetDevicePointer")
        return out.value


def _entry(lib: Any, name: str) -> Any:
    for symbol in (name + "_v2", name):  # CUDA 11+ exports the _v2 entry points the header maps to
        try:
            return getattr(lib, symbol)
        except AttributeError:
            continue
    raise OSError(f"the CUDA driver has no {name}")


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"{what} failed with CUresult {result}")


_OPS: StreamOps | None = None
_WHY: str | None = None


def load() -> tuple[StreamOps | None, str | None]:
    """(the bound calls, None), or (None, why they cannot be used here). Resolved once."""
    global _OPS, _WHY
    if _OPS is None and _WHY is None:
        try:
            _OPS = StreamOps(ctypes.CDLL("libcuda.so.1"))
        except OSError as err:
            _WHY = f"CUDA stream memory operations are not available ({err})"
    return _OPS, _WHY

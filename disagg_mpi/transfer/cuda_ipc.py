"""CUDA IPC for the KV pull between ranks of one node (one GPU or several).

The context rank exports its whole KV pool once (`PoolExporter`): a
`cudaIpcMemHandle` of the allocation that holds the pool plus the pool's
byte offset in it (torch's caching allocator places tensors inside larger
segments). The handle travels in the small "ipc" header the context rank
sends in answer to a pull. The generation rank opens it once per context
rank (`PoolMapper`, cached), wraps the mapping as a torch tensor of the
context pool's shape and dtype, and copies the blocks it needs device to
device on its side stream (re-sharding = gather/scatter on the GPU), with no
host round trip. Mappings are closed by `PoolMapper.close()` (transceiver
shutdown).

CUDA's rule: a process cannot open its own handle, but two processes on the
same GPU can (the H100 machine's 2-ranks-on-1-GPU runs use exactly that).
Needs cupy (for `cudaIpcOpenMemHandle`); without it `available()` says why
and the transceiver stages through host memory instead.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float8_e4m3fn": getattr(torch, "float8_e4m3fn", torch.uint8), "uint8": torch.uint8}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def available() -> str | None:
    """None when CUDA IPC can be used here, else the reason it cannot."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import cupy  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means no IPC
        return f"cupy is not importable ({type(err).__name__}: {err})"
    return None


def _allocation_base(ptr: int) -> tuple[int, int] | None:
    """(base, size) of the CUDA allocation holding `ptr` (driver cuMemGetAddressRange)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuMemGetAddressRange_v2
    except (OSError, AttributeError):
        return None
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    if fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)) != 0:
        return None
    return base.value, size.value


class PoolExporter:
    """Context side: the pool's IPC description, computed once and sent to every peer."""

    def __init__(self, pool: torch.Tensor):
        self.pool = pool
        self._info: dict[str, Any] | None = None

    def info(self) -> dict[str, Any]:
        if self._info is None:
            import cupy

            pool = self.pool
            ptr = pool.data_ptr()
            with cupy.cuda.Device(pool.device.index):
                rng = _allocation_base(ptr)
                if rng is not None:
                    base = rng[0]
                    handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(base))
                    offset = ptr - base
                else:  # fall back on torch's own export (base + offset of the storage)
                    shared = pool.untyped_storage()._share_cuda_()
                    handle, offset = bytes(shared[1]), int(shared[3]) + pool.storage_offset() * pool.element_size()
            self._info = {"handle": handle, "offset": offset, "nbytes": pool.numel() * pool.element_size(),
                          "shape": list(pool.shape), "dtype": _dtype_name(pool.dtype), "device": pool.device.index}
        return self._info


class PoolMapper:
    """Generation side: opened context pools, one mapping per (context rank, handle)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._maps: dict[tuple[int, bytes], tuple[int, torch.Tensor]] = {}
        self.opened = 0

    def tensor(self, peer: int, info: dict[str, Any]) -> torch.Tensor:
        """The peer's whole pool, as a tensor on this rank's device (device-to-device reads)."""
        key = (peer, bytes(info["handle"]))
        got = self._maps.get(key)
        if got is None:
            import cupy

            for k in [k for k in self._maps if k[0] == peer]:  # the peer re-exported: drop the old one
                self._close_one(k)
            rt = cupy.cuda.runtime
            with cupy.cuda.Device(self.device.index):
                base = rt.ipcOpenMemHandle(key[1], getattr(rt, "cudaIpcMemLazyEnablePeerAccess", 1))
                ptr = base + int(info["offset"])
                nbytes = int(info["nbytes"])
                mem = cupy.cuda.UnownedMemory(ptr, nbytes, key[1], self.device.index)
                arr = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
                raw = torch.as_tensor(arr, device=self.device)
            t = raw.view(_DTYPES[info["dtype"]]).view(tuple(info["shape"]))
            got = (base, t)
            self._maps[key] = got
            self.opened += 1
        return got[1]

    def _close_one(self, key: tuple[int, bytes]) -> None:
        base, _ = self._maps.pop(key)
        try:
            import cupy

            with cupy.cuda.Device(self.device.index):
                cupy.cuda.runtime.ipcCloseMemHandle(base)
        except Exception as err:  # noqa: BLE001 - at shutdown the context may already be gone
            log.debug("ipcCloseMemHandle failed: %s", err)

    def close(self) -> None:
        for key in list(self._maps):
            self._close_one(key)

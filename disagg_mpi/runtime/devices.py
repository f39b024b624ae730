"""Which device a rank computes on.

`device_ids` in the YAML are node-local CUDA ordinals, one per executor rank
(in executor-local order), so the same file works under mpiexec and srun.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..knobs import env_value

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def select_device(device_ids: list[int] | None, executor_local_rank: int) -> torch.device:
    import torch  # (executor ranks only: rank 0 and the launcher never load torch)

    if device_ids is None:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device_ids {device_ids} name GPUs but CUDA is not available on this node; "
                           "leave device_ids out to run on CPU")
    ordinal = device_ids[executor_local_rank]
    count = torch.cuda.device_count()
    if not 0 <= ordinal < count:
        raise RuntimeError(f"device_ids entry {ordinal} is not a GPU of this node (it has {count}: "
                           f"0..{count - 1})")
    torch.cuda.set_device(ordinal)
    return torch.device("cuda", ordinal)


def node_name() -> str:
    """This rank's node, as MPI names it (ranks with the same name share a node: CUDA IPC works)."""
    from mpi4py import MPI

    return MPI.Get_processor_name()


def _loaded_libmpi() -> str | None:
    """Path of the libmpi this process has loaded (mpi4py's), from /proc/self/maps."""
    import os

    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if os.path.basename(path).startswith("libmpi.so"):
                    return path
    except OSError:
        return None
    return None


def mpi_cuda_support() -> tuple[bool, str]:
    """Whether the MPI library accepts CUDA device pointers, and why (never assumed: a
    non-CUDA-aware MPI segfaults on a device pointer).

    Asks `MPIX_Query_cuda_support()` (Open MPI's and MPICH's run-time query) of the libmpi
    mpi4py loaded. `DISAGG_MPI_CUDA_AWARE=0` forces "no".
    """
    import ctypes

    from mpi4py import MPI

    version = MPI.Get_library_version().splitlines()[0].strip()
    if not env_value("DISAGG_MPI_CUDA_AWARE"):
        return False, f"{version}: DISAGG_MPI_CUDA_AWARE=0"
    path = _loaded_libmpi()
    try:
        lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        query = lib.MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False, (f"{version} ({path or 'libmpi not found'}) has no MPIX_Query_cuda_support: "
                       "not built with CUDA support")
    query.restype = ctypes.c_int
    if query() != 1:
        return False, f"{version} ({path}): MPIX_Query_cuda_support() returned 0 (not CUDA-aware)"
    return True, f"{version} ({path}): MPIX_Query_cuda_support() returned 1"

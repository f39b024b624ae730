"""The all-reduce of a tensor-parallel group: NCCL between GPUs, MPI otherwise.

NCCL is bootstrapped over MPI: TP rank 0 makes the unique id, the TP
communicator broadcasts it, every rank joins. It is used when every rank of
the group has a GPU of its own (NCCL cannot put two ranks of one communicator
on one GPU); otherwise, and on CPU, the sum goes through MPI in host memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def gpus_are_distinct(placements: list[tuple[str, int | None]]) -> bool:
    """True when every rank has a GPU and no two ranks share one (placements: (node, gpu) per rank)."""
    return all(g is not None for _, g in placements) and len(set(placements)) == len(placements)


def mpi_all_reduce(comm: Any) -> AllReduce:
    from mpi4py import MPI

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        dev, dtype = x.device, x.dtype
        buf = x.detach().to("cpu", torch.float32).contiguous()
        comm.Allreduce(MPI.IN_PLACE, buf.numpy(), op=MPI.SUM)
        return buf.to(dev, dtype)

    return all_reduce


def nccl_all_reduce(comm: Any, device: torch.device) -> AllReduce:
    """An NCCL communicator over the ranks of `comm` (collective), summing in place on `device`."""
    from cupy.cuda import nccl

    uid = comm.bcast(nccl.get_unique_id() if comm.Get_rank() == 0 else None, root=0)
    with torch.cuda.device(device):
        nc = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())
    types = {torch.float32: nccl.NCCL_FLOAT32, torch.float16: nccl.NCCL_FLOAT16,
             torch.bfloat16: nccl.NCCL_BFLOAT16}

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        stream = torch.cuda.current_stream(x.device).cuda_stream
        nc.allReduce(x.data_ptr(), x.data_ptr(), x.numel(), types[x.dtype], nccl.NCCL_SUM, stream)
        return x

    return all_reduce


def tp_all_reduce(comm: Any, device: torch.device, node: str, gpu: int | None) -> AllReduce:
    """Collective over the TP communicator: every rank must call it."""
    placements = comm.allgather((node, gpu))
    if device.type == "cuda" and gpus_are_distinct(placements):
        try:
            return nccl_all_reduce(comm, device)
        except ImportError:
            log.warning("TP group on distinct GPUs but cupy's NCCL is not importable: all-reducing through MPI")
    return mpi_all_reduce(comm)

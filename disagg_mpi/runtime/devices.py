"""Which device a rank computes on.

`device_ids` in the YAML are node-local CUDA ordinals, one per executor rank
(in executor-local order), so the same file works under mpiexec and srun.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def select_device(device_ids: list[int] | None, executor_local_rank: int) -> torch.device:
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

"""KV-transfer layer: cache layout description and the pure re-sharding plan."""

from .cache_state import CacheState
from .plan import (
    LayoutMismatchError,
    LocalSlices,
    PlanItem,
    block_size_convertible,
    check_compatible,
    local_slices,
    make_plan,
    map_blocks,
    plan_bytes,
    senders_for,
)

__all__ = [
    "CacheState",
    "LayoutMismatchError",
    "LocalSlices",
    "PlanItem",
    "block_size_convertible",
    "check_compatible",
    "local_slices",
    "make_plan",
    "map_blocks",
    "plan_bytes",
    "senders_for",
]

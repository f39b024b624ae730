"""KV cache layout of one executor, as exchanged between context and generation.

`CacheState` is the small, hashable description of how an executor shards
its paged KV cache (TP over KV heads, PP over contiguous layers). It travels
inside the opaque state of `ContextPhaseParams`, so it converts to and from
plain msgpack-friendly types, and it is the only input (with the peer's
state) of the pure re-sharding plan in `plan.py`.

The sharding helpers below re-implement the model layer's conventions on
purpose: the transfer layer must not import the model (or torch) to plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Bytes per element of the KV dtypes we can move; keys are the canonical names.
DTYPE_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


def even_layer_split(num_layers: int, pp_size: int) -> tuple[int, ...]:
    """Default PP split: the first `num_layers % pp_size` stages get one extra layer.

    Must match the model layer exactly, or ranks would disagree on who holds
    which layer and the transfer would scatter KV into the wrong layers.
    """
    base, extra = divmod(num_layers, pp_size)
    return tuple(base + (1 if s < extra else 0) for s in range(pp_size))


def kv_heads_of_tp_rank(num_kv_heads: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """Global KV head range `[start, end)` held by `tp_rank` (model-layer convention).

    With tp <= heads each rank holds a contiguous block of heads; with
    tp > heads each rank holds one head, duplicated on tp // heads ranks.
    """
    if tp_size <= num_kv_heads:
        k = num_kv_heads // tp_size
        return tp_rank * k, (tp_rank + 1) * k
    head = tp_rank // (tp_size // num_kv_heads)
    return head, head + 1


def _normalize_dtype(dtype: Any) -> str:
    """Accept 'float16' as well as 'torch.float16' / a torch dtype; return the canonical name."""
    name = str(dtype)
    name = name.removeprefix("torch.")
    if name not in DTYPE_ITEMSIZE:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPE_ITEMSIZE)}")
    return name


def _require_positive_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field}={value!r} is not valid; allowed: integers >= 1")


@dataclass(frozen=True)
class CacheState:
    """Layout of an executor's KV cache; validated on construction, immutable and hashable.

    `num_kv_heads` and `dtype` are uniform over layers (the seed's limitation);
    `from_dict` refuses per-layer lists that are not.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    tp_size: int
    pp_size: int
    layer_split: tuple[int, ...]

    @classmethod
    def create(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        dtype: Any,
        tp_size: int = 1,
        pp_size: int = 1,
        layer_split: Sequence[int] | None = None,
    ) -> CacheState:
        """Build a state, filling the model layer's even split when `layer_split` is None."""
        _require_positive_int("num_layers", num_layers)
        _require_positive_int("pp_size", pp_size)
        if layer_split is None:
            if pp_size > num_layers:
                raise ValueError(f"pp_size={pp_size} is not valid for num_layers={num_layers}; "
                                 f"allowed: 1..{num_layers}")
            layer_split = even_layer_split(num_layers, pp_size)
        return cls(num_layers, num_kv_heads, head_dim, block_size, _normalize_dtype(dtype),
                   tp_size, pp_size, tuple(layer_split))

    def __post_init__(self) -> None:
        # Validate here (not only in create) so from_dict and direct construction
        # can never produce a state the planner would mis-handle.
        for field in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size", "pp_size"):
            _require_positive_int(field, getattr(self, field))
        object.__setattr__(self, "dtype", _normalize_dtype(self.dtype))
        object.__setattr__(self, "layer_split", tuple(self.layer_split))
        h, tp = self.num_kv_heads, self.tp_size
        if not (h % tp == 0 if tp <= h else tp % h == 0):
            divisors = [d for d in range(1, h + 1) if h % d == 0]
            raise ValueError(f"tp_size={tp} is not valid for num_kv_heads={h}; allowed: "
                             f"a divisor of {h} {divisors} or a multiple of {h}")
        if self.pp_size > self.num_layers:
            raise ValueError(f"pp_size={self.pp_size} is not valid for num_layers="
                             f"{self.num_layers}; allowed: 1..{self.num_layers}")
        split = self.layer_split
        if (len(split) != self.pp_size or sum(split) != self.num_layers
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in split)):
            raise ValueError(f"layer_split={list(split)} is not valid; allowed: {self.pp_size} "
                             f"integers >= 1 summing to num_layers={self.num_layers}")

    # -- geometry -------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """Ranks in the executor (TP x PP)."""
        return self.tp_size * self.pp_size

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def local_kv_heads(self) -> int:
        """KV heads per rank (same on every TP rank)."""
        return max(1, self.num_kv_heads // self.tp_size)

    def layer_range(self, stage: int) -> tuple[int, int]:
        """Global layers `[start, end)` of PP stage `stage`."""
        if not 0 <= stage < self.pp_size:
            raise ValueError(f"stage={stage} is not valid; allowed: 0..{self.pp_size - 1}")
        start = sum(self.layer_split[:stage])
        return start, start + self.layer_split[stage]

    def kv_head_range(self, tp_rank: int) -> tuple[int, int]:
        """Global KV heads `[start, end)` of TP rank `tp_rank`."""
        if not 0 <= tp_rank < self.tp_size:
            raise ValueError(f"tp_rank={tp_rank} is not valid; allowed: 0..{self.tp_size - 1}")
        return kv_heads_of_tp_rank(self.num_kv_heads, self.tp_size, tp_rank)

    def rank_of(self, pp_stage: int, tp_rank: int) -> int:
        """Executor-local rank of (pp_stage, tp_rank)."""
        if not (0 <= pp_stage < self.pp_size and 0 <= tp_rank < self.tp_size):
            raise ValueError(f"(pp_stage, tp_rank)=({pp_stage}, {tp_rank}) is not valid; allowed: "
                             f"0..{self.pp_size - 1} x 0..{self.tp_size - 1}")
        return pp_stage * self.tp_size + tp_rank

    def coords(self, local_rank: int) -> tuple[int, int]:
        """(pp_stage, tp_rank) of an executor-local rank."""
        if not 0 <= local_rank < self.world_size:
            raise ValueError(f"local_rank={local_rank} is not valid; "
                             f"allowed: 0..{self.world_size - 1}")
        return divmod(local_rank, self.tp_size)

    def bytes_per_token_per_rank(self, local_rank: int) -> int:
        """K+V bytes one token occupies in `local_rank`'s pool (sizes buffers and transfers)."""
        stage, _ = self.coords(local_rank)
        return self.layer_split[stage] * 2 * self.local_kv_heads * self.head_dim * self.itemsize

    def kv_heads_per_layer(self) -> tuple[int, ...]:
        """Per-layer KV head counts; uniform by construction, exposed for layout checks."""
        return (self.num_kv_heads,) * self.num_layers

    def dtypes_per_layer(self) -> tuple[str, ...]:
        """Per-layer KV dtypes; uniform by construction, exposed for layout checks."""
        return (self.dtype,) * self.num_layers

    # -- wire format ----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain ints/str/list only, so msgpack (and signing) sees a stable encoding."""
        return {
            "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "block_size": self.block_size, "dtype": self.dtype,
            "tp_size": self.tp_size, "pp_size": self.pp_size,
            "layer_split": list(self.layer_split),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheState:
        """Inverse of `to_dict`; also accepts per-layer `num_kv_heads`/`dtype` lists if uniform."""
        expected = set(cls.__dataclass_fields__)
        missing = expected - set(data)
        if missing:
            raise ValueError(f"CacheState dict is missing fields {sorted(missing)}")
        num_layers = data["num_layers"]
        heads = _uniform("num_kv_heads", data["num_kv_heads"], num_layers)
        dtype = _uniform("dtype", data["dtype"], num_layers)
        return cls(num_layers, heads, data["head_dim"], data["block_size"], dtype,
                   data["tp_size"], data["pp_size"], tuple(data["layer_split"]))


def _uniform(field: str, value: Any, num_layers: int) -> Any:
    """Collapse a per-layer list to its single value; refuse non-uniform lists.

    Layers with different head counts or dtypes would need per-layer pools and
    per-layer plans; the runtime does not support that, so say so up front.
    """
    if not isinstance(value, (list, tuple)):
        return value
    if len(value) != num_layers:
        raise ValueError(f"{field} per-layer list has {len(value)} entries; "
                         f"allowed: exactly num_layers={num_layers}")
    if len(set(value)) != 1:
        raise ValueError(f"{field} differs between layers ({list(value)}); only a uniform "
                         f"{field} on every layer is supported")
    return value[0]

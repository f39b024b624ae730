"""`Request.sample_group`: the requests that sample several sequences of one prompt (parallel sampling).

OpenAI's `n` choices and `best_of` candidates of one prompt are n requests end to end: rank 0
tracks, streams, cancels and fails each alone, and each keeps its own seed. What binds them is
this record, vLLM's parent request of n child sequences (TensorRT-LLM: `num_return_sequences`):
the executors compute the prompt once and share its KV blocks (engine/sample_groups.py), and rank
0 routes every member to the executors of the first (orchestrator/sample_routes.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_SAMPLE_GROUP = 256  # members of one group (the HTTP API's n and best_of stop at 16)


@dataclass(frozen=True)
class SampleGroup:
    key: int  # the same for every member; unique among the groups in flight (random 63 bits)
    index: int  # this member's place among them (0 .. count - 1)
    count: int  # members in all: an executor waits for that many before it computes the prompt

    def check(self) -> None:
        """Raise ValueError naming the field unless the values are servable."""
        for name, v, lo, hi in (("key", self.key, 0, 2**63), ("count", self.count, 1, MAX_SAMPLE_GROUP + 1),
                                ("index", self.index, 0, self.count if isinstance(self.count, int) else 1)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v < hi:
                raise ValueError(f"sample_group.{name}={v!r} must be an integer in [{lo}, {hi})")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "index": self.index, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> SampleGroup | None:
        return None if d is None else cls(int(d["key"]), int(d["index"]), int(d["count"]))

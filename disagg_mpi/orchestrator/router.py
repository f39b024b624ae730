"""Routing policies: which executor gets a request. Pure functions of loads."""

from __future__ import annotations

from collections.abc import Sequence


def round_robin(candidates: Sequence[int], turn: int) -> int:
    """The seed's policy: executors in turn."""
    if not candidates:
        raise ValueError("no executor to route to")
    return candidates[turn % len(candidates)]


def least_loaded(candidates: Sequence[int], load: dict[int, int]) -> int:
    """Fewest in-flight tokens (prefill to compute + tokens to generate); ties go to the first."""
    if not candidates:
        raise ValueError("no executor to route to")
    return min(candidates, key=lambda e: (load.get(e, 0), candidates.index(e)))


class Router:
    """Stateful wrapper: one turn counter per executor pool."""

    def __init__(self, policy: str):
        if policy not in ("round_robin", "least_loaded", "kv_aware"):
            raise ValueError(f"router policy {policy!r} is not known; allowed: round_robin, least_loaded")
        self.policy = policy
        self._turn: dict[tuple[int, ...], int] = {}

    def pick(self, candidates: Sequence[int], load: dict[int, int]) -> int:
        if self.policy == "least_loaded":
            return least_loaded(candidates, load)
        key = tuple(candidates)
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        return round_robin(candidates, turn)

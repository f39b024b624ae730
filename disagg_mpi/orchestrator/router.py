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


def kv_aware(candidates: Sequence[int], cached_tokens: dict[int, int], load: dict[int, int]) -> int:
    """Most cached prefix minus in-flight load (both in tokens); ties go to the first.

    A warm cache saves exactly its tokens of prefill, and queued work delays a
    request by about its token count, so the two are comparable.
    """
    if not candidates:
        raise ValueError("no executor to route to")
    return max(candidates, key=lambda e: (cached_tokens.get(e, 0) - load.get(e, 0), -candidates.index(e)))


def run_locally(prompt_len: int, cached: int, max_local_tokens: int) -> bool:
    """Conditional disaggregation: a short uncached part is prefilled where it decodes."""
    return max_local_tokens > 0 and prompt_len - cached <= max_local_tokens


def direct_handoff(context_flags: Sequence[bool], generation_flags: Sequence[bool]) -> bool:
    """Whether rank 0 parks generation phases ahead (the direct hand-off): only in a disaggregated
    topology whose every context and generation executor has `direct_handoff` on (each side must
    take part: the context leader sends the params, the generation leader waits for them)."""
    return bool(context_flags) and bool(generation_flags) and all(context_flags) and all(generation_flags)


class Router:
    """Stateful wrapper: one turn counter per executor pool."""

    def __init__(self, policy: str):
        if policy not in ("round_robin", "least_loaded", "kv_aware"):
            raise ValueError(f"router policy {policy!r} is not known; allowed: round_robin, least_loaded, "
                             "kv_aware")
        self.policy = policy
        self._turn: dict[tuple[int, ...], int] = {}

    def pick(self, candidates: Sequence[int], load: dict[int, int],
             cached_tokens: dict[int, int] | None = None) -> int:
        if self.policy == "least_loaded":
            return least_loaded(candidates, load)
        if self.policy == "kv_aware":
            return kv_aware(candidates, cached_tokens or {}, load)
        key = tuple(candidates)
        turn = self._turn.get(key, 0)
        self._turn[key] = turn + 1
        return round_robin(candidates, turn)

"""Rank 0 routes every member of a sample group (sample_group.py) where the first went.

The executors compute a group's prompt once and move its KV once only among members that meet on
one context executor and one generation executor (engine/sample_groups.py); a member routed
elsewhere would be computed again there, and its group's leader would wait for it in vain.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

_MAX_GROUPS = 4096  # routes kept for groups whose members did not all come (one refused meanwhile)


class SampleRoutes:
    def __init__(self) -> None:
        self._routes: OrderedDict[tuple[int, str], list[int]] = OrderedDict()  # (key, phase) -> [executor, left]

    def pick(self, group: object, phase: str, candidates: Sequence[int], choose: Callable[[], int]) -> int:
        """The executor of `phase` for a member of `group` (None: no group): the first member's choice."""
        count = getattr(group, "count", 1)
        if group is None or count <= 1:
            return choose()
        k = (group.key, phase)
        route = self._routes.get(k)
        if route is None or route[0] not in candidates:
            route = self._routes[k] = [choose(), count]
            while len(self._routes) > _MAX_GROUPS:
                self._routes.popitem(last=False)
        route[1] -= 1
        if route[1] <= 0:
            del self._routes[k]
        return route[0]

"""Rank 0's estimate of which prompt prefixes each executor has cached.

The executors own the truth (their block managers); rank 0 only remembers the
full-block hash chains of the prompts it sent where, in a bounded LRU, which
is what the kv_aware router and conditional disaggregation need to guess.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def chain_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Hash of every full block, each chained to its predecessor (equal hash = equal prefix)."""
    out, parent = [], 0
    for i in range(len(token_ids) // block_size):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        out.append(parent)
    return out


class PrefixIndex:
    def __init__(self, block_size: int, capacity_blocks: int):
        self.block_size = block_size
        self.capacity = capacity_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()

    def cached_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens of the longest prefix believed cached (the last token is always computed)."""
        n = 0
        for h in chain_hashes(token_ids[: max(0, len(token_ids) - 1)], self.block_size):
            if h not in self._lru:
                break
            n += 1
        return n * self.block_size

    def insert(self, token_ids: Sequence[int]) -> None:
        for h in chain_hashes(token_ids, self.block_size):
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

"""Paged KV-cache block accounting: which request holds which blocks.

Pure bookkeeping, no tensors: the KV pool is indexed by the block ids handed
out here. Every block has a reference count; a block returns to the pool when
its count reaches 0.

Prefix reuse (off by default): a *full* block is named by a hash chain,
h_i = hash((h_{i-1}, tokens of block i)), so equal hashes mean equal prefixes,
not just equal blocks. A freed hashed block is not wiped: it waits in an LRU
set of cached-free blocks, is handed back to any request whose prefix matches,
and is evicted (forgotten, reused for fresh data) only when the plain free list
is empty. Cached-free blocks count as free.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence as Seq

_ROOT_HASH = 0  # parent hash of a request's first block


class OutOfBlocksError(RuntimeError):
    """Not enough free blocks; nothing was allocated."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_reuse: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self._num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_reuse = enable_prefix_reuse
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        # Prefix reuse state.
        self._block_hash: dict[int, int] = {}  # block -> its chain hash (registered blocks only)
        self._hash_block: dict[int, int] = {}  # chain hash -> block
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._req_hashes: dict[int, list[int]] = {}  # chain hashes of a request's full blocks
        self._num_cached: dict[int, int] = {}  # tokens reused at allocation, per request

    # ---- sizes ---------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached_free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int, token_ids: Seq[int] | None = None) -> bool:
        """Whether `allocate(_, num_tokens, token_ids)` would succeed now."""
        return self._free_blocks_to_take(num_tokens, self._reusable(token_ids)) <= self.num_free

    # ---- allocation ----------------------------------------------------------

    def allocate(self, req_id: int, num_tokens: int, token_ids: Seq[int] | None = None) -> list[int]:
        """Reserve blocks for `num_tokens` tokens; returns the block table.

        With prefix reuse on and `token_ids` given (the prompt), the longest
        cached prefix is shared; `num_cached_tokens(req_id)` tells how many
        tokens need no compute. At least the last prompt token is always left
        to compute, since its logits give the first sampled token.
        """
        if req_id in self._tables:
            raise ValueError(f"request {req_id} already holds blocks; free it first")
        hashes, matched = self._reusable(token_ids)
        matched = matched[: self.blocks_needed(num_tokens)]
        hashes = hashes[: len(matched)]
        needed = self._free_blocks_to_take(num_tokens, (hashes, matched))
        if needed > self.num_free:
            raise OutOfBlocksError(
                f"request {req_id} needs {needed} free blocks for {num_tokens} tokens, "
                f"{self.num_free} of {self._num_blocks} are free"
            )
        # Take the matched blocks first, so that evicting for the fresh ones
        # cannot evict a block this request is about to share.
        for block in matched:
            self._cached_free.pop(block, None)
            self._refcount[block] += 1
        fresh = [self._take_block() for _ in range(self.blocks_needed(num_tokens) - len(matched))]
        self._tables[req_id] = list(matched) + fresh
        self._req_hashes[req_id] = hashes
        self._num_cached[req_id] = len(matched) * self.block_size
        return list(self._tables[req_id])

    def free(self, req_id: int) -> None:
        """Drop the request's references; idempotent."""
        table = self._tables.pop(req_id, None)
        self._req_hashes.pop(req_id, None)
        self._num_cached.pop(req_id, None)
        if table is None:
            return
        # Reverse order: a prefix's tail blocks become least recently used,
        # so eviction trims long prefixes before the shared heads.
        for block in reversed(table):
            self._drop(block)

    def fork(self, child: int, parent: int, prompt_len: int, num_tokens: int,
             share_tail: bool = False) -> list[tuple[int, int]]:
        """Give `child` the KV of `parent`'s first `prompt_len` tokens (the same prompt, sampled again:
        parallel sampling) and room for `num_tokens` tokens in all; returns the block copies
        [(source, destination)] to make before the child's KV is written.

        The full prompt blocks are shared by reference (never written again: positions below
        prompt_len). A partial last prompt block is copied (copy on write: each sequence writes its
        own tokens after it), unless `share_tail`: the child never writes (a context-only request, whose
        answer is its first token, as its parent's), and shares every block of the parent it needs. Each copy's source holds one more reference until
        `unpin`, and so does its destination: neither returns to the pool (and is written by someone
        else) before the copy ran, whatever happens to the two requests meanwhile. OutOfBlocksError:
        nothing was taken.
        """
        if child in self._tables:
            raise ValueError(f"request {child} already holds blocks; free it first")
        table, bs = self._tables[parent], self.block_size
        shared = table[: self.blocks_needed(num_tokens) if share_tail else prompt_len // bs]
        fresh = max(0, self.blocks_needed(num_tokens) - len(shared))
        if fresh > self.num_free or len(table) < self.blocks_needed(prompt_len):
            raise OutOfBlocksError(f"request {child} needs {fresh} free blocks to fork request {parent}, "
                                   f"{self.num_free} of {self._num_blocks} are free")
        for block in shared:
            self._refcount[block] += 1
        self._tables[child] = list(shared) + [self._take_block() for _ in range(fresh)]
        self._req_hashes[child], self._num_cached[child] = [], 0
        if share_tail or prompt_len % bs == 0:
            return []
        src, dst = table[len(shared)], self._tables[child][len(shared)]
        self._refcount[src] += 1  # (pinned: see unpin)
        self._refcount[dst] += 1
        return [(src, dst)]

    def unpin(self, blocks: Seq[int]) -> None:
        """Drop the references `fork` took on its copies' blocks (the copies ran)."""
        for block in blocks:
            self._drop(block)

    def block_table(self, req_id: int) -> list[int]:
        return list(self._tables[req_id])

    def has_blocks(self, req_id: int) -> bool:
        return req_id in self._tables

    def num_cached_tokens(self, req_id: int) -> int:
        """Tokens of the request's prefix found in the cache at allocation."""
        return self._num_cached.get(req_id, 0)

    def check_full(self) -> None:
        """Assert every block is back in the pool (cached-free blocks count as free)."""
        problems = []
        if self._tables:
            problems.append(f"requests still holding blocks: {dict(self._tables)}")
        held = {b: c for b, c in enumerate(self._refcount) if c}
        if held:
            problems.append(f"blocks with refcount > 0: {held}")
        pooled = list(self._free) + list(self._cached_free)
        if len(pooled) != self._num_blocks or len(set(pooled)) != self._num_blocks:
            problems.append(
                f"pool holds {len(pooled)} entries ({len(set(pooled))} distinct), expected {self._num_blocks}"
            )
        assert not problems, "block pool not full: " + "; ".join(problems)

    # ---- prefix reuse --------------------------------------------------------

    def match_prefix(self, token_ids: Seq[int]) -> tuple[int, list[int]]:
        """Longest run of cached full blocks that starts `token_ids`: (tokens, blocks)."""
        _, blocks = self._match(token_ids)
        return len(blocks) * self.block_size, blocks

    def commit_full_blocks(self, req_id: int, token_ids: Seq[int]) -> None:
        """Register the request's blocks that `token_ids` (KV computed) fills completely."""
        if not self.enable_prefix_reuse:
            return
        table = self._tables[req_id]
        hashes = self._req_hashes[req_id]
        bs = self.block_size
        for i in range(len(hashes), min(len(token_ids) // bs, len(table))):
            parent = hashes[-1] if hashes else _ROOT_HASH
            h = hash((parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            hashes.append(h)
            # Another request may have computed the same block meanwhile; keep
            # the first copy registered, this one is freed as plain.
            if h not in self._hash_block and table[i] not in self._block_hash:
                self._hash_block[h] = table[i]
                self._block_hash[table[i]] = h

    # ---- internals -----------------------------------------------------------

    def _match(self, token_ids: Seq[int]) -> tuple[list[int], list[int]]:
        hashes: list[int] = []
        blocks: list[int] = []
        parent = _ROOT_HASH
        bs = self.block_size
        for i in range(len(token_ids) // bs):
            h = hash((parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            block = self._hash_block.get(h)
            if block is None:
                break
            hashes.append(h)
            blocks.append(block)
            parent = h
        return hashes, blocks

    def _reusable(self, token_ids: Seq[int] | None) -> tuple[list[int], list[int]]:
        if not self.enable_prefix_reuse or token_ids is None:
            return [], []
        # Leave the last token to compute: its logits give the next token, and
        # a block that is only read is never written while shared.
        return self._match(token_ids[: len(token_ids) - 1])

    def _free_blocks_to_take(self, num_tokens: int, reuse: tuple[list[int], list[int]]) -> int:
        _, matched = reuse
        matched = matched[: self.blocks_needed(num_tokens)]
        # A matched block that sits in the cached-free set leaves the free count too.
        idle = sum(1 for b in matched if self._refcount[b] == 0)
        return self.blocks_needed(num_tokens) - len(matched) + idle

    def _drop(self, block: int) -> None:
        self._refcount[block] -= 1
        assert self._refcount[block] >= 0, f"block {block} freed twice"
        if self._refcount[block] == 0:
            if block in self._block_hash:
                self._cached_free[block] = None
            else:
                self._free.append(block)

    def _take_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._cached_free.popitem(last=False)  # evict the LRU cached block
            del self._hash_block[self._block_hash.pop(block)]
        assert self._refcount[block] == 0, f"block {block} handed out while in use"
        self._refcount[block] = 1
        return block

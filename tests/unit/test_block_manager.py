"""Block accounting: random operation sequences, prefix sharing, LRU eviction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_mpi.engine.block_manager import BlockManager, OutOfBlocksError


def _owners(bm: BlockManager, reqs) -> dict[int, list[int]]:
    """Block -> the requests (of `reqs`) whose tables hold it."""
    result: dict[int, list[int]] = {}
    for r in reqs:
        for block in bm.block_table(r):
            result.setdefault(block, []).append(r)
    return result


def _check_invariants(bm: BlockManager, live: dict[int, int]) -> None:
    """Refcounts equal table membership; free + used = total; tables fit their tokens."""
    owners = _owners(bm, live)
    for req, tokens in live.items():
        assert len(bm.block_table(req)) == bm.blocks_needed(tokens)
    assert bm.num_free + len(owners) == bm.num_blocks
    for block, reqs in owners.items():
        assert bm._refcount[block] == len(reqs)
        if not bm.enable_prefix_reuse:
            assert len(reqs) == 1, f"block {block} shared without prefix reuse: {reqs}"


_ops = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "free"]),
        st.integers(0, 5),  # request id
        st.integers(0, 40),  # tokens
        st.integers(0, 2),  # prompt family: equal families share prefixes
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, reuse=st.booleans(), block_size=st.sampled_from([1, 4, 8]))
def test_random_alloc_free_keeps_accounting(ops, reuse, block_size):
    bm = BlockManager(num_blocks=24, block_size=block_size, enable_prefix_reuse=reuse)
    live: dict[int, int] = {}
    for op, req, tokens, family in ops:
        prompt = [family * 100 + (i % 7) for i in range(tokens)]
        if op == "alloc" and req not in live:
            fits = bm.can_allocate(tokens, prompt)
            free_before = bm.num_free
            try:
                bm.allocate(req, tokens, prompt)
            except OutOfBlocksError:
                assert not fits and bm.num_free == free_before  # nothing leaked
            else:
                assert fits
                live[req] = tokens
                bm.commit_full_blocks(req, prompt)
        elif op == "free":
            bm.free(req)
            bm.free(req)  # idempotent
            live.pop(req, None)
        _check_invariants(bm, live)
    for req in list(live):
        bm.free(req)
    bm.check_full()


def test_allocate_sizes_and_out_of_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(1) == 1 and bm.blocks_needed(8) == 2
    assert bm.allocate(1, 5) == [0, 1]
    assert not bm.can_allocate(9) and bm.can_allocate(8)
    with pytest.raises(OutOfBlocksError, match="needs 3 free blocks"):
        bm.allocate(2, 9)
    assert bm.num_free == 2
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate(1, 1)
    assert bm.block_table(1) == [0, 1]


def test_check_full_names_the_leak():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate(7, 3)
    with pytest.raises(AssertionError, match="7"):
        bm.check_full()
    bm.free(7)
    bm.check_full()


def test_prefix_reuse_shares_full_blocks():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_reuse=True)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    a = bm.allocate(1, 12, prompt)
    assert bm.num_cached_tokens(1) == 0
    bm.commit_full_blocks(1, prompt)
    assert bm.match_prefix(prompt) == (8, a[:2])
    # Same first block, different second block: only block 0 is shared.
    other = prompt[:4] + [99] * 6
    b = bm.allocate(2, 10, other)
    assert b[0] == a[0] and b[1] != a[1]
    assert bm.num_cached_tokens(2) == 4
    assert _owners(bm, [1, 2])[a[0]] == [1, 2]
    # Full match of a block-aligned prompt still leaves its last token to compute.
    c = bm.allocate(3, 8, prompt[:8])
    assert bm.num_cached_tokens(3) == 4 and c[0] == a[0] and c[1] != a[1]
    for r in (1, 2, 3):
        bm.free(r)
    bm.check_full()
    # Cached blocks survive their owners: a new request reuses them.
    d = bm.allocate(4, 12, prompt)
    assert d[:2] == a[:2] and bm.num_cached_tokens(4) == 8
    bm.free(4)
    bm.check_full()


def test_prefix_reuse_off_by_default_ignores_tokens():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate(1, 4, [1, 2, 3, 4])
    bm.commit_full_blocks(1, [1, 2, 3, 4])
    bm.free(1)
    assert bm.match_prefix([1, 2, 3, 4]) == (0, [])
    assert bm.allocate(2, 4, [1, 2, 3, 4]) and bm.num_cached_tokens(2) == 0


def test_can_allocate_counts_idle_matched_blocks_as_taken():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_reuse=True)
    prompt = [1, 2, 3, 4, 5]
    bm.allocate(1, 6, prompt)
    bm.commit_full_blocks(1, prompt)
    bm.free(1)
    assert bm.num_free == 3  # 2 cached + 1 plain
    # Reuses both cached blocks and takes the plain one: exactly fits.
    assert bm.can_allocate(6, prompt)
    assert not bm.can_allocate(8, prompt)
    bm.allocate(2, 6, prompt)
    assert bm.num_cached_tokens(2) == 4 and bm.num_free == 0


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_reuse=True)
    p_old, p_new = [1, 1, 1], [2, 2, 2]
    bm.allocate(1, 3, p_old)  # blocks 0, 1
    bm.commit_full_blocks(1, p_old)
    bm.allocate(2, 3, p_new)  # blocks 2, 3
    bm.commit_full_blocks(2, p_new)
    bm.free(1)  # block 0 cached, block 1 plain
    bm.free(2)  # block 2 cached (more recently used), block 3 plain
    assert bm.match_prefix(p_old)[0] == 2 and bm.match_prefix(p_new)[0] == 2
    # 3 fresh blocks: two plain ones, then evict the least recently used (block 0).
    bm.allocate(3, 6, [9] * 6)
    assert bm.match_prefix(p_old) == (0, [])
    assert bm.match_prefix(p_new) == (2, [2])
    bm.free(3)
    bm.check_full()


def test_reused_block_refreshes_lru():
    bm = BlockManager(num_blocks=3, block_size=2, enable_prefix_reuse=True)
    pa, pb = [1, 1, 0], [2, 2, 0]
    for req, p in ((1, pa), (2, pb)):
        bm.allocate(req, 2, p)
        bm.commit_full_blocks(req, p[:2])
        bm.free(req)
    # pa is older, but using it again makes pb the eviction victim.
    bm.allocate(3, 3, pa)
    assert bm.num_cached_tokens(3) == 2
    bm.free(3)
    bm.allocate(4, 4, [5, 5, 5, 5])
    assert bm.match_prefix(pa)[0] == 2 and bm.match_prefix(pb)[0] == 0

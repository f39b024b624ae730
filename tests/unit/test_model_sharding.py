"""TP and PP shards, simulated in one process, reproduce the unsharded model."""
import threading

import pytest
import torch

from disagg_mpi.model import ShardSpec, load_model
from disagg_mpi.model.parallel import even_layer_split, layer_range
from tests.paged_generate import blocks_needed, greedy_generate, model_forward_fn

PROMPTS = [[5, 17, 300, 42, 7, 99, 1000, 3, 250], [11, 12, 13]]
BS, NEW = 4, 8


class ThreadAllReduce:
    """Sums tensors across `n` threads in rank order (identical result on every rank)."""

    def __init__(self, n: int):
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n)

    def for_rank(self, r: int):
        def all_reduce(x):
            self.slots[r] = x
            self.barrier.wait()
            out = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()       # nobody overwrites a slot before all have read
            return out
        return all_reduce


def build_grid(tp: int, pp: int, spec="random:tiny"):
    """stages[s][r]: model of PP stage s, TP rank r (plus a reducer per stage)."""
    split = even_layer_split(6, pp)
    grid = []
    for s in range(pp):
        start, end = layer_range(s, split)
        red = ThreadAllReduce(tp)
        grid.append([load_model(spec, seed=1, shard=ShardSpec(r, tp, start, end,
                                                              red.for_rank(r) if tp > 1 else None))
                     for r in range(tp)])
    return grid


def grid_forward_fn(grid):
    n_blocks = blocks_needed(PROMPTS, NEW, BS)
    pools = [[m.allocate_kv_pool(n_blocks, BS) for m in stage] for stage in grid]

    def run_stage(s, ids, pos, hidden):
        outs = [None] * len(grid[s])

        def work(r):
            outs[r] = grid[s][r](ids if s == 0 else None, pos, pools[s][r], hidden_states=hidden)
        threads = [threading.Thread(target=work, args=(r,)) for r in range(len(grid[s]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for o in outs[1:]:          # TP ranks must agree exactly after the all-reduce
            assert torch.equal(o, outs[0])
        return outs[0]

    def fn(ids, pos):
        h = None
        for s in range(len(grid)):
            h = run_stage(s, ids, pos, h)
        return grid[-1][0].compute_logits(h)
    return fn


@pytest.fixture(scope="module")
def reference():
    m = load_model("random:tiny", seed=1)
    pool = m.allocate_kv_pool(blocks_needed(PROMPTS, NEW, BS), BS)
    fn = model_forward_fn(m, pool)
    return fn, greedy_generate(fn, PROMPTS, NEW, BS)


def _first_logits(fn):
    from disagg_mpi.model import AttentionMetadata, forward_context
    ids = PROMPTS[0]
    n = len(ids)
    table = torch.arange(8)[None]
    meta = AttentionMetadata(torch.arange(n), [0, n], [n], table, BS)
    with forward_context(meta):
        return fn(torch.tensor(ids), torch.arange(n))


@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 1), (8, 1), (1, 2), (1, 3), (2, 2)])
def test_sharded_equals_single(reference, tp, pp):
    ref_fn, ref_tokens = reference
    grid = build_grid(tp, pp)
    fn = grid_forward_fn(grid)
    torch.testing.assert_close(_first_logits(fn), _first_logits(ref_fn), atol=1e-5, rtol=1e-5)
    fn = grid_forward_fn(grid)   # fresh pools
    assert greedy_generate(fn, PROMPTS, NEW, BS) == ref_tokens


def test_shard_shapes():
    m = load_model("random:tiny", shard=ShardSpec(3, 4, 2, 5, all_reduce=lambda x: x))
    assert list(m.model.layers.keys()) == ["2", "3", "4"]
    assert not hasattr(m.model, "embed_tokens") and not hasattr(m, "lm_head")
    attn = m.model.layers["2"].self_attn
    assert attn.q_proj.weight.shape == (2 * 16, 128) and attn.k_proj.weight.shape == (16, 128)
    assert attn.o_proj.weight.shape == (128, 32)
    assert m.model.layers["2"].mlp.down_proj.weight.shape == (128, 64)
    assert m.kv_heads == (1, 2)
    assert m.allocate_kv_pool(5, 4).shape == (5, 3, 2, 1, 4, 16)


def test_tp_requires_all_reduce():
    with pytest.raises(ValueError, match="all_reduce"):
        load_model("random:tiny", shard=ShardSpec(0, 2))

"""Decode fast path on CUDA: Triton kernels + CUDA graphs give the eager path's greedy tokens.

Run alone: `python -m pytest -q tests/gpu/test_decode_graphs.py` (skips without CUDA;
no MPI needed). `python tests/gpu/test_decode_graphs.py OUT.json` prints / writes a summary.
"""
from __future__ import annotations

import functools
import json
import sys

import pytest
import torch

import disagg_mpi.engine.executor as executor_mod
from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request
from disagg_mpi.engine.model_runner import ModelRunner
from disagg_mpi.model import load_model

MODES = {
    "eager": {"fast_decode": False, "cuda_graphs": False},     # the torch path (as on CPU)
    "triton": {"fast_decode": True, "cuda_graphs": False},     # Triton kernels, no graphs
    "graphs": {"fast_decode": True, "cuda_graphs": True, "overlap": False},  # Triton kernels in CUDA graphs
    "overlap": {"fast_decode": True, "cuda_graphs": True, "overlap": True},  # + next step launched ahead
}


def _prompts(vocab, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1000, vocab, (n,), generator=g).tolist() for n in lens]


def make_executor(model, mode, prompts, new_tokens=24, dtype="float32", block_size=16):
    runner_cls = functools.partial(ModelRunner, **MODES[mode])
    saved = executor_mod.ModelRunner
    executor_mod.ModelRunner = runner_cls
    try:
        per_seq = -(-(max(len(p) for p in prompts) + new_tokens) // block_size)
        cfg = ExecutorConfig(max_batch_size=len(prompts), max_num_tokens=4096,
                             kv_cache_config=KvCacheConfig(block_size=block_size,
                                                           num_blocks=per_seq * len(prompts) + 3),
                             dtype=dtype, device="cuda")
        ex = executor_mod.Executor(model, cfg)
    finally:
        executor_mod.ModelRunner = saved
    if mode in ("graphs", "overlap"):
        assert ex._runner.graphs is not None
    assert ex._runner.chains_decode == (mode == "overlap")
    return ex


def generate(model, mode, prompts, new_tokens=24, dtype="float32", block_size=16):
    ex = make_executor(model, mode, prompts, new_tokens, dtype, block_size)
    resps = ex.generate([Request(list(p), max_tokens=new_tokens, ignore_eos=True) for p in prompts])
    ex.check_blocks_free()
    graphs = sorted(ex._runner.graphs.replays) if ex._runner.graphs is not None else []
    if mode == "overlap":   # every decode step but the last ran ahead of the host
        assert ex._runner.overlap_stats == {"launched": new_tokens - 2, "used": new_tokens - 2, "dropped": 0}
    return [r.result.output_token_ids for r in resps], graphs  # the batch sizes whose graphs replayed


@functools.lru_cache(maxsize=2)
def _model(dtype):
    return load_model("random:smollm2", dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype],
                      device="cuda", seed=0)


# Ragged prompts: sequences cross block boundaries at different steps; 3 and 5 pad to 4 and 8.
BATCHES = [[37], [5, 70, 33], [128, 17, 64, 1, 90]]


@pytest.mark.parametrize("lens", BATCHES, ids=lambda x: f"b{len(x)}")
def test_fp32_graphs_match_eager(lens):
    model = _model("float32")
    prompts = _prompts(model.config.vocab_size, lens)
    ref, _ = generate(model, "eager", prompts)
    tri, _ = generate(model, "triton", prompts)
    gra, captured = generate(model, "graphs", prompts)
    ovl, _ = generate(model, "overlap", prompts)
    assert captured, "no CUDA graph was used"
    assert tri == ref
    assert gra == ref
    assert ovl == ref


@pytest.mark.parametrize("lens", [[37], [5, 70, 33, 12]], ids=lambda x: f"b{len(x)}")
def test_bf16_graphs_match_triton_eager(lens):
    # Same kernels, same (unpadded) batch size: replay must give the same tokens.
    model = _model("bfloat16")
    prompts = _prompts(model.config.vocab_size, lens)
    tri, _ = generate(model, "triton", prompts, dtype="bfloat16")
    gra, _ = generate(model, "graphs", prompts, dtype="bfloat16")
    ovl, _ = generate(model, "overlap", prompts, dtype="bfloat16")
    assert gra == tri
    assert ovl == tri


def _stops_and_a_late_request(model, mode, prompts, stops, late, new_tokens=24):
    """Requests with stop tokens, plus one more enqueued after 5 steps; tokens per request."""
    ex = make_executor(model, mode, prompts + [late], new_tokens)
    ids = ex.enqueue_requests([Request(list(p), max_tokens=new_tokens, ignore_eos=True, stop_token_ids=s)
                               for p, s in zip(prompts, stops)])
    out = {i: [] for i in ids}
    for _ in range(5):
        for r in ex.await_responses(timeout=0):
            out[r.request_id] += r.result.output_token_ids
        ex._engine.step()
    ids.append(ex.enqueue_request(Request(list(late), max_tokens=new_tokens, ignore_eos=True)))
    out[ids[-1]] = []
    while ex._engine.busy or any(not v for v in out.values()):
        for r in ex.await_responses():
            out[r.request_id] += r.result.output_token_ids
    ex.check_blocks_free()
    return [out[i] for i in ids], ex._runner.overlap_stats


def _stop_token(tokens, lo=2, hi=20):
    """A token whose first appearance is at index lo..hi (random weights repeat a lot)."""
    for j, t in enumerate(tokens[lo:hi], lo):
        if tokens.index(t) == j:
            return t
    return None


def test_overlap_drops_mispredicted_steps():
    # Sequences stopping on a stop token during decode make the launched step wrong: the runner
    # must drop it. A request joining mid-run waits one step. Tokens equal the synchronous run's.
    model = _model("float32")
    for seed in range(6):
        prompts = _prompts(model.config.vocab_size, [37, 70, 20, 5], seed=seed)
        ref, _ = generate(model, "graphs", prompts)
        stops = [_stop_token(r) for r in ref]
        if sum(s is not None for s in stops) >= 2:
            break
    assert sum(s is not None for s in stops) >= 2, "no prompts whose tokens vary enough"
    stops = [[s] if s is not None else [] for s in stops]
    late = _prompts(model.config.vocab_size, [50], seed=99)[0]
    sync, _ = _stops_and_a_late_request(model, "graphs", prompts, stops, late)
    ovl, stats = _stops_and_a_late_request(model, "overlap", prompts, stops, late)
    for out, r, s in zip(sync, ref, stops):
        assert out == (r[:r.index(s[0]) + 1] if s else r)
    assert ovl == sync
    # The stops dropped launched steps; the join did not (the newcomer waits one step instead).
    assert stats["dropped"] >= 1 and stats["used"] >= 10, stats


def test_graphs_are_captured_at_startup_not_while_serving():
    """An executor captures every batch size its scheduler can reach when it is made, so a new
    batch size in the middle of serving replays a graph instead of stalling for a capture."""
    model = _model("float32")
    prompts = _prompts(model.config.vocab_size, [37, 5, 70, 33, 12])
    ex = make_executor(model, "graphs", prompts)   # max_batch_size 5: sizes 1, 2, 4, 8
    graphs = ex._runner.graphs
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    captured, warm = dict(graphs.graphs), dict(graphs.replays)   # (the start-up warm-up replays some)
    resps = ex.generate([Request(list(p), max_tokens=12, ignore_eos=True) for p in prompts])
    assert all(len(r.result.output_token_ids) == 12 for r in resps)
    assert graphs.replays.get(8, 0) > warm.get(8, 0), graphs.replays   # five decodes pad to 8: replayed
    assert all(graphs.graphs[b] is captured[b] for b in captured) and graphs.graphs.keys() == captured.keys()


def test_lazy_capture_waits_for_first_use(monkeypatch):
    monkeypatch.setenv("DISAGG_GRAPH_CAPTURE", "lazy")
    monkeypatch.setenv("DISAGG_WARM_UP", "off")   # (its decodes are a first use)
    model = _model("float32")
    prompts = _prompts(model.config.vocab_size, [37, 5, 70])
    ex = make_executor(model, "graphs", prompts)
    assert not ex._runner.graphs.graphs
    ex.generate([Request(list(p), max_tokens=4, ignore_eos=True) for p in prompts])
    assert 4 in ex._runner.graphs.graphs


def test_padding_rows_do_not_write():
    from disagg_mpi.engine.cuda_graphs import DecodeGraphs
    from disagg_mpi.engine.scheduler import StepInputs

    model = _model("float32")
    runner = ModelRunner(model, 16, 16, "cuda", fast_decode=True, cuda_graphs=True)
    graphs: DecodeGraphs = runner.graphs
    pool = runner.kv_pool
    pool.normal_()
    before = pool.clone()
    # 3 sequences (padded to 4): blocks 2, 5, 9; one new token each at offsets 3, 0, 7.
    tables = [[2], [5], [9]]
    inp = StepInputs(input_ids=[1000, 1001, 1002], positions=[3, 0, 7], slot_mapping=[35, 80, 151],
                     query_start_loc=[0, 1, 2, 3], context_lens=[4, 1, 8], block_tables=tables,
                     sample_indices=[0, 1, 2], sample_req_ids=[1, 2, 3])
    logits, tokens = graphs.run(inp)
    torch.cuda.synchronize()
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()
    assert tokens.tolist() == logits.argmax(-1).tolist()
    changed = (pool != before).flatten(2).any(-1)    # [blocks, layers]
    for blk in range(pool.shape[0]):
        assert changed[blk].any() == (blk in (2, 5, 9)), blk
    bs = pool.shape[4]
    for slot in (35, 80, 151):
        diff = (pool[slot // bs, :, :, :, slot % bs] != before[slot // bs, :, :, :, slot % bs])
        assert diff.any()
    # Nothing else in those blocks moved.
    mask = torch.ones(pool.shape[0], pool.shape[4], dtype=torch.bool, device=pool.device)
    for slot in (35, 80, 151):
        mask[slot // bs, slot % bs] = False
    moved = (pool != before).permute(0, 4, 1, 2, 3, 5).flatten(2).any(-1)   # [blocks, bs]
    assert not moved[mask].any()


def summary(out_path=None):
    res = {"device": torch.cuda.get_device_name()}
    for dtype in ("float32", "bfloat16"):
        model = _model(dtype)
        for lens in BATCHES + [[64] * 8]:
            prompts = _prompts(model.config.vocab_size, lens)
            toks = {m: generate(model, m, prompts, dtype=dtype)[0] for m in MODES}
            assert toks["overlap"] == toks["graphs"]
            n = sum(len(t) for t in toks["eager"])

            def agree(a, b, toks=toks, n=n):
                return sum(x == y for s, t in zip(toks[a], toks[b]) for x, y in zip(s, t)) / n

            key = f"{dtype}/b{len(lens)}"
            res[key] = {"graphs_vs_eager": agree("graphs", "eager"),
                        "triton_vs_eager": agree("triton", "eager"),
                        "graphs_vs_triton": agree("graphs", "triton")}
            print(key, res[key], flush=True)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    summary(sys.argv[1] if len(sys.argv) > 1 else None)

"""engine/warm_up.py: every kind of step runs once before an executor says it is ready, and
nothing of it stays behind (a real in-process executor on the tiny model)."""
import json

from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request
from disagg_mpi.engine.executor import Executor
from disagg_mpi.engine.warm_up import NEW_TOKENS, warm_up_plan

CFG = {"max_batch_size": 8, "max_num_tokens": 64, "kv_cache_config": KvCacheConfig(num_blocks=64, block_size=16)}


def test_plan_reaches_every_kind_of_step():
    plan = warm_up_plan(max_num_tokens=2048, max_batch_size=64, capacity_tokens=100_000, max_context=8192)
    lens = [r.prompt_len for r in plan]
    assert lens[0] == 2047                       # the largest prefill one step holds
    assert 2048 + 40 in lens                     # a prompt prefilled in two chunks
    assert [r.step for r in plan][:5] == [0, 1, 2, 3, 3]   # one decode, two, then an unequal pair
    assert any(r.logprobs for r in plan) and any(r.sampling.temperature > 0 for r in plan)


def test_plan_fits_a_small_pool_and_batch():
    plan = warm_up_plan(max_num_tokens=512, max_batch_size=2, capacity_tokens=256, max_context=2048)
    assert plan[0].prompt_len == 128 - NEW_TOKENS   # half the pool at most
    assert len(plan) == 3                           # no pair, no chunked prompt: they would not fit
    assert sum(r.prompt_len + NEW_TOKENS for r in plan) <= 256


def test_warm_up_runs_each_step_kind_and_leaves_nothing(tmp_path, monkeypatch):
    prompt = list(range(5, 30))
    cold = Executor("random:tiny", ExecutorConfig(**CFG))
    [want] = cold.generate([Request(prompt, 6, ignore_eos=True)])
    cold.shutdown()

    monkeypatch.setenv("DISAGG_WARM_UP", "on")
    monkeypatch.setenv("DISAGG_STEP_LOG", str(tmp_path))
    ex = Executor("random:tiny", ExecutorConfig(**CFG))
    steps = [json.loads(x) for x in (tmp_path / "executor0.jsonl").read_text().splitlines()]
    assert ex.warm_up_report["steps"] >= len(steps) > 0
    assert steps[0]["max_chunk"] == 63 and steps[0]["seqs"] == 1        # the largest prefill, alone
    mixed = [s for s in steps if s["max_chunk"] > 1 and s["decode"]]
    assert {1, 2} <= {s["decode"] for s in mixed}                          # beside one and two decodes
    assert any(s["seqs"] - s["decode"] >= 2 for s in steps)               # two prefills in one step
    assert any(s["tokens"] == 64 and s["max_chunk"] > 1 for s in steps)   # a long prompt's first chunk
    plan = warm_up_plan(64, 8, 64 * 16, 2048)
    assert plan[-1].prompt_len > 64                                         # ... and its second
    assert sum(s["tokens"] - s["decode"] for s in steps) == sum(r.prompt_len for r in plan)
    assert any(s["decode"] == s["seqs"] > 1 for s in steps)               # decode-only steps
    engine = ex._engine
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.busy
    assert engine.stats["iterations"] == 0 and not engine.take_responses()
    [got] = ex.generate([Request(prompt, 6, ignore_eos=True)])
    ex.shutdown()
    assert got.result.output_token_ids == want.result.output_token_ids

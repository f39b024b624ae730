"""The in-process Executor on a tiny random Llama (GQA, untied embeddings), fast.

The model is `random:tiny` saved as a HF safetensors folder, so transformers'
LlamaForCausalLM on the same folder is the greedy reference.
"""

import pytest
import torch

from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request, SamplingConfig
from disagg_mpi.engine.executor import Executor
from disagg_mpi.model import load_model
from tests.hf_folder import save_hf_folder

transformers = pytest.importorskip("transformers")

PROMPTS = [
    [5, 17, 300, 42, 7, 99, 1000, 3, 250],
    [11, 12, 13],
    list(range(20, 60)),  # 40 tokens: prefills in chunks under max_num_tokens=16
    [900, 800, 700, 600, 500, 400],
    [7] * 23,
]
NEW = 12




@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_exec_hf")
    model = load_model("random:tiny", seed=7)
    cfg = model.config
    assert cfg.num_kv_heads < cfg.num_heads and not cfg.tie_word_embeddings  # GQA, untied
    save_hf_folder(model, folder)
    return folder


@pytest.fixture(scope="module")
def model(tiny_folder):
    return load_model(str(tiny_folder))


@pytest.fixture(scope="module")
def hf_ref(tiny_folder):
    """prompt (tuple) -> greedy tokens from transformers, EOS neither stopping nor suppressed."""
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tiny_folder), torch_dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    cache = {}

    def ref(prompt, n=NEW):
        key = (tuple(prompt), n)
        if key not in cache:
            x = torch.tensor([list(prompt)])
            with torch.no_grad():
                y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                pad_token_id=0)
            cache[key] = y[0, x.shape[1]:].tolist()
            assert len(cache[key]) == n
        return cache[key]

    return ref


def make_executor(model, max_batch_size=4, max_num_tokens=16, block_size=4, num_blocks=256):
    cfg = ExecutorConfig(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                         kv_cache_config=KvCacheConfig(block_size=block_size, num_blocks=num_blocks))
    return Executor(model, cfg)


def greedy(prompt, n=NEW, **kw):
    return Request(list(prompt), max_tokens=n, ignore_eos=True, **kw)


def drain(ex, ids):
    """Run until every id in `ids` has its final response; {id: [responses]}."""
    got = {i: [] for i in ids}
    done = set()
    for _ in range(10_000):
        if done == set(ids):
            return got
        for r in ex.await_responses(timeout=5):
            got[r.request_id].append(r)
            if r.is_final:
                done.add(r.request_id)
    raise AssertionError(f"requests {set(ids) - done} never finished")


# ---- greedy equality ----------------------------------------------------------------


def test_single_requests_match_hf(model, hf_ref):
    ex = make_executor(model)
    for p in PROMPTS:
        [resp] = ex.generate([greedy(p)])
        assert not resp.has_error(), resp.error_msg
        assert resp.result.output_token_ids == hf_ref(p)
        assert resp.result.finish_reason == "length"
    ex.check_blocks_free()


def test_inflight_batch_matches_hf(model, hf_ref):
    """Staggered arrival, chunked prefill, more requests than batch slots."""
    ex = make_executor(model, max_batch_size=3, max_num_tokens=16, block_size=4)
    ids = {ex.enqueue_request(greedy(PROMPTS[0])): PROMPTS[0],
           ex.enqueue_request(greedy(PROMPTS[2])): PROMPTS[2]}
    results = {}
    for _ in range(3):  # a few steps with only the first two in flight
        for r in ex.await_responses(timeout=0):
            results[r.request_id] = r
        ex._engine.step()
    for p in PROMPTS[1:2] + PROMPTS[3:]:
        ids[ex.enqueue_request(greedy(p))] = p
    got = drain(ex, [i for i in ids if i not in results])
    for i, rs in got.items():
        results[i] = rs[-1]
    for i, p in ids.items():
        assert not results[i].has_error(), results[i].error_msg
        assert results[i].result.output_token_ids == hf_ref(p), f"prompt {p}"
    ex.check_blocks_free()


def test_generate_keeps_order(model, hf_ref):
    ex = make_executor(model, max_batch_size=8, max_num_tokens=64)
    resps = ex.generate([greedy(p) for p in PROMPTS])
    assert [r.result.output_token_ids for r in resps] == [hf_ref(p) for p in PROMPTS]
    assert [r.request_id for r in resps] == sorted(r.request_id for r in resps)


# ---- streaming ----------------------------------------------------------------------


def test_streaming_partial_responses_concatenate(model):
    ex = make_executor(model)
    [plain] = ex.generate([greedy(PROMPTS[0])])
    rid = ex.enqueue_request(greedy(PROMPTS[0], streaming=True))
    other = ex.enqueue_request(greedy(PROMPTS[2], n=5))  # a non-streaming neighbour
    got = drain(ex, [rid, other])
    stream = got[rid]
    assert len(stream) == NEW  # one response per generated token
    assert all(len(r.result.output_token_ids) == 1 for r in stream)
    assert [r.result.is_final for r in stream] == [False] * (NEW - 1) + [True]
    assert all(r.result.finish_reason is None for r in stream[:-1])
    assert stream[-1].result.finish_reason == "length"
    assert [t for r in stream for t in r.result.output_token_ids] == plain.result.output_token_ids
    assert len(got[other]) == 1 and len(got[other][0].result.output_token_ids) == 5
    ex.check_blocks_free()


def test_streaming_one_response_per_step(model):
    ex = make_executor(model)
    rid = ex.enqueue_request(greedy(PROMPTS[1], n=4, streaming=True))
    for k in range(4):
        before = ex.get_latest_iteration_stats()["iterations"]
        rs = ex.await_responses(rid)
        assert len(rs) == 1 and len(rs[0].result.output_token_ids) == 1
        assert ex.get_latest_iteration_stats()["iterations"] == before + 1  # a token per step
        assert rs[0].result.is_final == (k == 3)
    assert ex.await_responses(rid, timeout=0) == []


def test_generate_folds_streaming(model):
    ex = make_executor(model)
    a, b = ex.generate([greedy(PROMPTS[3], streaming=True), greedy(PROMPTS[3])])
    assert a.result.output_token_ids == b.result.output_token_ids and len(a.result.output_token_ids) == NEW


# ---- stop rules -----------------------------------------------------------------------


def test_stop_token_ids(model, hf_ref):
    ref = hf_ref(PROMPTS[0])
    stop = ref[4]
    first = ref.index(stop)
    ex = make_executor(model)
    plain, streamed = ex.generate([greedy(PROMPTS[0], stop_token_ids=[stop]),
                                   greedy(PROMPTS[0], stop_token_ids=[stop], streaming=True)])
    for r in (plain, streamed):
        assert r.result.finish_reason == "stop"
        assert r.result.output_token_ids == ref[: first + 1]  # the stop token is included
    ex.check_blocks_free()


def test_eos_stops_unless_ignored(model, hf_ref):
    ref = hf_ref(PROMPTS[3])
    eos = ref[3]
    first = ref.index(eos)
    m = load_model("random:tiny", seed=7)  # same weights, its own config object
    m.config = m.config.replace(eos_token_ids=[eos])
    ex = make_executor(m)
    stopped, ignored = ex.generate([Request(PROMPTS[3], max_tokens=NEW),
                                    Request(PROMPTS[3], max_tokens=NEW, ignore_eos=True)])
    assert stopped.result.finish_reason == "stop"
    assert stopped.result.output_token_ids == ref[: first + 1]
    assert ignored.result.finish_reason == "length" and ignored.result.output_token_ids == ref
    # A stop token still stops an ignore_eos request.
    [r] = ex.generate([Request(PROMPTS[3], max_tokens=NEW, ignore_eos=True, stop_token_ids=[eos])])
    assert r.result.finish_reason == "stop" and r.result.output_token_ids == ref[: first + 1]
    ex.check_blocks_free()


@pytest.mark.parametrize("n", [1, 2, 7])
def test_max_tokens(model, hf_ref, n):
    ex = make_executor(model)
    [r] = ex.generate([greedy(PROMPTS[4], n=n)])
    assert r.result.finish_reason == "length"
    assert r.result.output_token_ids == hf_ref(PROMPTS[4])[:n]
    assert r.result.metrics.num_prompt_tokens == len(PROMPTS[4])


# ---- sampling ---------------------------------------------------------------------------


def sampled(seed, temperature=1.0, top_k=0, top_p=1.0, n=16):
    return Request(PROMPTS[0], max_tokens=n, ignore_eos=True,
                   sampling_config=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))


def test_seeded_sampling_reproducible(model):
    ex = make_executor(model, max_batch_size=8, max_num_tokens=64)
    a = ex.generate([sampled(123)])[0].result.output_token_ids
    # The same seed inside a different batch gives the same tokens.
    batch = ex.generate([greedy(PROMPTS[2]), sampled(123), sampled(124), sampled(125)])
    assert batch[1].result.output_token_ids == a
    assert len({tuple(r.result.output_token_ids) for r in batch[1:]}) == 3  # seeds differ
    # ... and on a fresh executor with other settings.
    ex2 = make_executor(model, max_batch_size=2, max_num_tokens=8, block_size=8)
    assert ex2.generate([sampled(123)])[0].result.output_token_ids == a


def test_sampling_variants(model, hf_ref):
    ex = make_executor(model, max_batch_size=8, max_num_tokens=64)
    greedy_ref = hf_ref(PROMPTS[0])[:8]
    rs = ex.generate([sampled(1, top_k=1, n=8), sampled(2, temperature=0.0, n=8),
                      sampled(3, temperature=0.7, top_p=0.9), sampled(3, temperature=0.7, top_p=0.9),
                      sampled(None, temperature=1.0, top_k=50)])
    assert rs[0].result.output_token_ids == greedy_ref  # top_k=1 is greedy
    assert rs[1].result.output_token_ids == greedy_ref  # temperature 0 is greedy
    assert rs[2].result.output_token_ids == rs[3].result.output_token_ids
    assert len(rs[4].result.output_token_ids) == 16  # no seed: one is drawn, it still samples
    vocab = model.config.vocab_size
    assert all(0 <= t < vocab for r in rs for t in r.result.output_token_ids)


# ---- cancel and block accounting --------------------------------------------------------


def test_cancel_running_request(model):
    ex = make_executor(model, max_batch_size=2, num_blocks=64)
    total = ex.get_latest_iteration_stats()["num_free_blocks"]
    rid = ex.enqueue_request(greedy(PROMPTS[0], n=100, streaming=True))
    keep = ex.enqueue_request(greedy(PROMPTS[1], n=20))
    streamed = []
    for _ in range(3):
        streamed += ex.await_responses(rid)
    assert len(streamed) == 3 and not any(r.is_final for r in streamed)
    stats = ex.get_latest_iteration_stats()
    assert stats["num_running"] == 2 and stats["num_free_blocks"] < total
    ex.cancel_request(rid)
    [final] = ex.await_responses(rid)
    assert final.is_final and not final.has_error()
    assert final.result.finish_reason == "cancelled"
    # Streaming: the final response carries no token that was already streamed.
    assert final.result.output_token_ids == []
    assert ex.get_latest_iteration_stats()["num_running"] == 1
    [other] = drain(ex, [keep])[keep]
    assert other.result.finish_reason == "length" and len(other.result.output_token_ids) == 20
    ex.check_blocks_free()
    assert ex.get_latest_iteration_stats()["num_free_blocks"] == total


def test_cancel_non_streaming_running_and_waiting(model):
    ex = make_executor(model, max_batch_size=1)
    running = ex.enqueue_request(greedy(PROMPTS[0], n=50))
    waiting = ex.enqueue_request(greedy(PROMPTS[1], n=50))
    for _ in range(5):
        ex._engine.step()
    assert ex.get_latest_iteration_stats()["num_waiting"] == 1
    ex.cancel_request(waiting)
    ex.cancel_request(running)
    ex.cancel_request(running)  # twice: no effect
    ex.cancel_request(10_000)  # unknown: no effect
    got = {r.request_id: r for r in ex.await_responses()}
    assert set(got) == {running, waiting}
    assert got[running].result.finish_reason == "cancelled"
    assert 1 <= len(got[running].result.output_token_ids) < 50  # the tokens made so far
    assert got[waiting].result.finish_reason == "cancelled" and got[waiting].result.output_token_ids == []
    ex.check_blocks_free()
    assert ex.await_responses(timeout=0) == []


def test_cancel_after_finish_is_harmless(model):
    ex = make_executor(model)
    rid = ex.enqueue_request(greedy(PROMPTS[1], n=3))
    [r] = drain(ex, [rid])[rid]
    ex.cancel_request(rid)
    assert r.result.finish_reason == "length" and ex.await_responses(timeout=0) == []
    ex.check_blocks_free()


def test_blocks_free_after_mixed_outcomes(model, monkeypatch):
    ex = make_executor(model, max_batch_size=3, num_blocks=64)
    reqs = [greedy(PROMPTS[0], n=30), greedy(PROMPTS[1], n=5, stop_token_ids=[]),
            Request([], max_tokens=4),  # fails at admission
            greedy(PROMPTS[2], n=30, streaming=True), greedy(PROMPTS[3], n=8),
            Request(PROMPTS[4], max_tokens=3, sampling_config=SamplingConfig(temperature=1.0, seed=5))]
    ids = ex.enqueue_requests(reqs)
    for _ in range(4):
        ex._engine.step()
    ex.cancel_request(ids[0])
    # A step that fails once inside the model (a transient failure, no request's fault) is run
    # again request by request (engine/step_isolation.py): nobody fails.
    runner = ex._runner
    real = runner.execute
    calls = {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return real(plan)

    monkeypatch.setattr(runner, "execute", flaky)
    got = drain(ex, ids)
    finals = {i: rs[-1] for i, rs in got.items()}
    assert finals[ids[2]].has_error() and "empty" in finals[ids[2]].error_msg
    assert finals[ids[0]].result.finish_reason == "cancelled"
    assert calls["n"] > 1
    ok = [i for i in ids if not finals[i].has_error()]
    assert ids[0] in ok and len(ok) + 1 == len(ids)
    ex.check_blocks_free()
    stats = ex.get_latest_iteration_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] == 64
    # The executor keeps serving afterwards.
    [r] = ex.generate([greedy(PROMPTS[1], n=4)])
    assert len(r.result.output_token_ids) == 4
    ex.check_blocks_free()


def test_check_blocks_free_detects_a_leak(model):
    ex = make_executor(model)
    ex.enqueue_request(greedy(PROMPTS[0], n=20))
    ex._engine.step()
    with pytest.raises(AssertionError, match="block pool not full"):
        ex.check_blocks_free()


# ---- stats --------------------------------------------------------------------------------


def test_iteration_stats(model):
    ex = make_executor(model, max_batch_size=2, max_num_tokens=16, block_size=4, num_blocks=100)
    s0 = ex.get_latest_iteration_stats()
    assert {"iterations", "tokens", "num_free_blocks", "num_blocks", "inflight_tokens", "num_running",
            "num_waiting"} <= set(s0)
    assert (s0["iterations"], s0["tokens"], s0["num_running"], s0["num_waiting"]) == (0, 0, 0, 0)
    assert s0["num_free_blocks"] == s0["num_blocks"] == 100 and s0["inflight_tokens"] == 0
    ids = ex.enqueue_requests([greedy(PROMPTS[2], n=4), greedy(PROMPTS[1], n=4), greedy(PROMPTS[0], n=4)])
    s1 = ex.get_latest_iteration_stats()
    assert s1["num_waiting"] == 3 and s1["num_running"] == 0
    assert s1["inflight_tokens"] == 40 + 4 + 3 + 4 + 9 + 4
    ex._engine.step()  # admits up to the batch size; the 40-token prompt takes the whole budget
    s2 = ex.get_latest_iteration_stats()
    assert s2["iterations"] == 1 and s2["tokens"] == 16
    assert s2["num_running"] == 1 and s2["num_waiting"] == 2
    assert s2["num_free_blocks"] == 100 - (40 + 4) // 4
    assert s2["inflight_tokens"] == s1["inflight_tokens"] - 16
    drain(ex, ids)
    s3 = ex.get_latest_iteration_stats()
    assert s3["tokens"] == 40 + 3 + 9 + 3 * 3  # prompts + decode inputs (the first token comes from prefill)
    assert s3["num_running"] == s3["num_waiting"] == s3["inflight_tokens"] == 0
    assert s3["num_free_blocks"] == 100


def test_shutdown(model):
    ex = make_executor(model)
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.enqueue_request(greedy(PROMPTS[0]))

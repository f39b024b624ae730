"""disagg-mpi bench: metric math, workload generation and SSE parsing (the client: test_bench_client.py)."""

from __future__ import annotations

import json
import math
import random

import pytest

from disagg_mpi.bench.client import chunk_tokens, completion_payload, parse_sse_line
from disagg_mpi.bench.metrics import (
    RequestRecord,
    aggregate,
    flatten,
    goodput,
    itl_ms,
    kv_gbps,
    meets_slo,
    percentile,
    summarize,
    tpot_ms,
)
from disagg_mpi.bench.workload import (
    BenchRequest,
    arrival_offsets,
    dataset_requests,
    load_dataset_entries,
    parse_dist,
    parse_int_list,
    parse_rates,
    synthetic_requests,
)

np = pytest.importorskip("numpy")


# ---- percentiles and summaries ---------------------------------------------------

@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    rng = random.Random(q)
    xs = [rng.uniform(0, 100) for _ in range(37)]
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([None, 1, 3], 50) == 2
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_summarize():
    s = summarize([1, 2, 3, 4, None])
    assert s["mean"] == 2.5 and s["p50"] == 2.5
    assert s["p90"] == pytest.approx(3.7) and s["p99"] == pytest.approx(3.97)
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_tpot_and_itl():
    assert tpot_ms(e2e_ms=1000, ttft_ms=100, n_out=10) == pytest.approx(100)
    assert tpot_ms(500, 100, 1) is None
    assert itl_ms([1.0, 1.01, 1.03, 1.06]) == pytest.approx([10, 20, 30])
    assert itl_ms([1.0]) == []


def _rec(idx, start, chunks, end, n_out, ok=True, **sm):
    return RequestRecord(idx=idx, input_len=8, output_len_requested=n_out, ok=ok, start=start,
                         chunk_times=list(chunks), end=end, output_tokens=n_out if ok else 0,
                         server_metrics=dict(sm), error=None if ok else "boom")


def test_record_properties():
    r = _rec(0, 10.0, [10.1, 10.2, 10.4], 10.4, 3)
    assert r.ttft_ms == pytest.approx(100)
    assert r.e2e_ms == pytest.approx(400)
    assert r.tpot_ms == pytest.approx(150)          # (400 - 100) / 2
    assert r.itl_ms == pytest.approx([100, 200])
    bad = _rec(1, 0, [], 1, 0, ok=False)
    assert bad.ttft_ms is None and bad.tpot_ms is None and bad.itl_ms == []
    d = r.to_dict()
    assert d["ttft_ms"] == pytest.approx(100) and "chunk_times" not in d


def test_goodput_and_slo():
    recs = [_rec(0, 0.0, [0.1, 0.2], 0.2, 2),          # ttft 100, tpot 100
            _rec(1, 0.0, [0.5, 0.6], 0.6, 2),          # ttft 500, tpot 100
            _rec(2, 0.0, [0.1, 0.5], 0.5, 2),          # ttft 100, tpot 400
            _rec(3, 0.0, [], 1.0, 0, ok=False)]
    assert goodput(recs, 2.0, None, None) is None
    assert goodput(recs, 2.0, 200, None) == pytest.approx(1.0)     # 0 and 2
    assert goodput(recs, 2.0, None, 200) == pytest.approx(1.0)     # 0 and 1
    assert goodput(recs, 2.0, 200, 200) == pytest.approx(0.5)      # only 0
    assert meets_slo(100, None, 200, 50)                           # one-token request: no tpot
    assert not meets_slo(None, None, 200, None)


def test_aggregate():
    recs = [_rec(0, 0.0, [0.1, 0.2, 0.3], 0.3, 3, kv_transfer_ms=2.0, kv_transfer_bytes=4e6),
            _rec(1, 0.5, [0.7, 0.8, 0.9], 1.0, 3, kv_transfer_ms=4.0, kv_transfer_bytes=4e6),
            _rec(2, 0.2, [], 0.4, 0, ok=False)]
    s = aggregate(recs, slo_ttft_ms=150)
    assert s["num_requests"] == 3 and s["num_samples"] == 2 and s["num_errors"] == 1
    assert s["duration_s"] == pytest.approx(1.0)
    assert s["seq_throughput"] == pytest.approx(2.0)
    assert s["token_throughput"] == pytest.approx(6.0)
    assert s["goodput"] == pytest.approx(1.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(150)
    assert s["tpot_ms"]["p50"] == pytest.approx((100 + 150) / 2)
    assert s["itl_ms"]["mean"] == pytest.approx(100)
    assert s["kv_transfer_ms"]["mean"] == pytest.approx(3.0)
    assert s["kv_transfer_gbps"]["p50"] == pytest.approx((2.0 + 1.0) / 2)
    assert kv_gbps(1e9, 1000) == pytest.approx(1.0) and kv_gbps(None, 1) is None and kv_gbps(5, 0) is None
    flat = flatten(s)
    assert flat["ttft_ms_p99"] == s["ttft_ms"]["p99"] and flat["num_samples"] == 2
    no_kv = aggregate(recs[:1] + [_rec(3, 0, [0.1], 0.1, 1)])
    assert aggregate([_rec(0, 0, [0.1], 0.2, 1)])["kv_transfer_ms"] is None
    assert no_kv["kv_transfer_ms"]["mean"] == pytest.approx(2.0)   # requests without kv figures are skipped


# ---- workloads ---------------------------------------------------------------------

def test_parse_dist():
    assert str(parse_dist("256")) == "fixed:256"
    assert parse_dist(64).kind == "fixed"
    assert parse_dist("uniform:10:20").params == (10, 20)
    for bad in ("uniform:20:10", "normal:1", "zipf:3", "fixed:0", "uniform:a:b"):
        with pytest.raises(ValueError):
            parse_dist(bad)


@pytest.mark.parametrize("spec,lo,hi", [("uniform:10:20", 10, 20), ("normal:100:10", 40, 160),
                                        ("lognormal:100:30", 1, 10000), ("exponential:50", 1, 10000)])
def test_dist_sampling(spec, lo, hi):
    xs = parse_dist(spec).sample(random.Random(0), 2000)
    assert min(xs) >= lo and max(xs) <= hi and all(isinstance(x, int) for x in xs)
    if spec.startswith(("normal", "lognormal")):
        assert sum(xs) / len(xs) == pytest.approx(100, rel=0.05)


def test_synthetic_exact_lengths_and_seed():
    reqs = synthetic_requests(20, 64, 8, vocab_size=1024, seed=3, special_ids=[1, 2])
    assert len(reqs) == 20 and all(r.input_len == 64 and r.output_len == 8 for r in reqs)
    assert all(100 <= t < 1024 for r in reqs for t in r.prompt_ids)
    assert [r.idx for r in reqs] == list(range(20))
    again = synthetic_requests(20, 64, 8, vocab_size=1024, seed=3, special_ids=[1, 2])
    assert [r.prompt_ids for r in reqs] == [r.prompt_ids for r in again]
    other = synthetic_requests(20, 64, 8, vocab_size=1024, seed=4)
    assert [r.prompt_ids for r in reqs] != [r.prompt_ids for r in other]
    small = synthetic_requests(4, 8, 2, vocab_size=16, seed=0, special_ids=[14, 15])
    assert all(4 <= t <= 13 for r in small for t in r.prompt_ids)


def test_synthetic_distributions():
    reqs = synthetic_requests(200, "uniform:16:48", "normal:10:2", vocab_size=49152, seed=0)
    ins = [r.input_len for r in reqs]
    assert min(ins) >= 16 and max(ins) <= 48 and len(set(ins)) > 10
    assert all(r.output_len >= 1 for r in reqs)


def test_shared_prefix():
    reqs = synthetic_requests(10, "uniform:40:80", 4, vocab_size=49152, seed=1, shared_prefix_ratio=0.5)
    longest = max(reqs, key=lambda r: r.input_len)
    for r in reqs:
        n = r.meta["shared_prefix_len"]
        assert n == round(0.5 * r.input_len)
        assert r.prompt_ids[:n] == longest.prompt_ids[:n]
    # the parts after the prefix differ between requests
    assert len({tuple(r.prompt_ids[r.meta["shared_prefix_len"]:][:8]) for r in reqs}) == 10
    full = synthetic_requests(3, 16, 4, vocab_size=1024, seed=0, shared_prefix_ratio=1.0)
    assert full[0].prompt_ids == full[1].prompt_ids == full[2].prompt_ids
    with pytest.raises(ValueError):
        synthetic_requests(3, 16, 4, vocab_size=1024, shared_prefix_ratio=1.5)


def test_arrivals():
    assert arrival_offsets(4, math.inf) == [0.0] * 4
    offs = arrival_offsets(5000, 10.0, seed=1)
    assert offs[0] == 0.0 and offs == sorted(offs)
    gaps = np.diff(offs)
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() == pytest.approx(0.1, rel=0.08)           # exponential: std == mean
    assert arrival_offsets(10, 2.0, seed=1) == arrival_offsets(10, 2.0, seed=1)
    with pytest.raises(ValueError):
        arrival_offsets(3, 0)
    assert parse_rates("1, 2,inf") == [1.0, 2.0, math.inf]
    assert parse_int_list("1,4", "x") == [1, 4]
    for bad in ("0", "", "-1"):
        with pytest.raises(ValueError):
            parse_rates(bad)


class _WordTok:
    """Whitespace tokenizer: one id per word."""

    def encode(self, text):
        return [100 + len(w) for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + (" <assistant>" if
                                                                               add_generation_prompt else "")


def test_dataset_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in [
        {"id": "a", "prompt": "one two three", "max_tokens": 5},
        {"messages": [{"role": "user", "content": "hi there"}]},
        {"input_ids": [7, 8, 9, 10, 11, 12]},
    ]) + "\n\n")
    entries = load_dataset_entries(p)
    assert len(entries) == 3
    reqs = dataset_requests(entries, _WordTok(), 7, default_output_len=3, seed=0)
    assert len(reqs) == 7 and [r.idx for r in reqs] == list(range(7))
    by_len = {r.input_len: r.output_len for r in reqs}
    assert by_len[3] == 5                 # max_tokens wins
    assert by_len[6] == 3                 # input_ids, default output len
    assert by_len[4] == 3                 # chat template applied: "<user> hi there <assistant>"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "input_ids": [1]}\n')
    with pytest.raises(ValueError, match="exactly one"):
        load_dataset_entries(bad)


def test_dataset_sharegpt(tmp_path):
    data = [
        {"id": "1", "conversations": [{"from": "human", "value": "a b c"}, {"from": "gpt", "value": "x y"}]},
        {"id": "2", "conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "d e"},
                                      {"from": "gpt", "value": "p q r s"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "lonely"}]},     # no answer
        {"id": "4", "conversations": []},
    ]
    p = tmp_path / "sg.json"
    p.write_text(json.dumps(data))
    entries = load_dataset_entries(p)
    assert [e["prompt"] for e in entries] == ["a b c", "d e", "lonely"]
    reqs = dataset_requests(entries, _WordTok(), 4, default_output_len=None, seed=0)
    assert sorted({(r.input_len, r.output_len) for r in reqs}) == [(2, 4), (3, 2)]
    reqs = dataset_requests(entries, _WordTok(), 6, default_output_len=9, seed=0, max_output_len=3)
    assert sorted({(r.input_len, r.output_len) for r in reqs}) == [(1, 3), (2, 3), (3, 2)]
    reqs = dataset_requests(entries, _WordTok(), 2, default_output_len=9, seed=0, max_input_len=2)
    assert all(r.input_len <= 2 for r in reqs)
    with pytest.raises(ValueError):
        dataset_requests(entries, _WordTok(), 2, None, max_input_len=0)
    with pytest.raises(FileNotFoundError):
        load_dataset_entries(tmp_path / "nope.json")


def test_dataset_with_real_tokenizer(tmp_path):
    from disagg_mpi.model.tokenizer import load_tokenizer

    tok = load_tokenizer("random:tiny")
    p = tmp_path / "sg.json"
    p.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hello world"},
                                                {"from": "gpt", "value": "hi!"}]}]))
    (r,) = dataset_requests(load_dataset_entries(p), tok, 1, None)
    assert r.prompt_ids == tok.encode("hello world") and r.output_len == len(tok.encode("hi!"))


# ---- SSE parsing -------------------------------------------------------------------

def test_sse_parsing():
    assert parse_sse_line(b"data: [DONE]\n") == "[DONE]"
    assert parse_sse_line(": keep-alive") is None
    assert parse_sse_line("") is None
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert chunk_tokens({"choices": [{"index": 0, "text": "hi", "finish_reason": None}]}) == 1
    assert chunk_tokens({"choices": [{"index": 0, "text": "", "finish_reason": None}]}) == 1
    assert chunk_tokens({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}) == 0
    assert chunk_tokens({"choices": [{"text": "ab", "token_ids": [1, 2]}]}) == 2
    assert chunk_tokens({"choices": [], "usage": {"completion_tokens": 3}}) == 0
    body = completion_payload(BenchRequest([5, 6], 4), extra={"model": "m"})
    assert body == {"prompt": [5, 6], "max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}, "model": "m"}

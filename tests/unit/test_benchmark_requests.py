"""Generation-only benchmark requests (engine/benchmark.py): the checks at rank 0's edge and in the
executor, and what the in-process executor (random:tiny) does with one: no prefill, the prompt's blocks
reserved, exactly max_tokens tokens, nothing in the prefix cache."""

from __future__ import annotations

import pytest

from disagg_mpi.api import (
    ContextPhaseParams,
    ExecutorConfig,
    GuidedDecodingParams,
    KvCacheConfig,
    OutputConfig,
    Request,
    RequestError,
    RequestType,
)
from disagg_mpi.engine import benchmark
from disagg_mpi.engine.executor import Executor
from disagg_mpi.orchestrator.admission import ModelLimits, check_request
from disagg_mpi.serve.protocol import ApiError, check_benchmark_allowed, parse_completion

LIMITS = ModelLimits(vocab_size=1024, max_context=2048)
FIELD = "benchmark_generation_only"


def _bench(prompt=(5, 6, 7), max_tokens=4, **kw) -> Request:
    return Request(list(prompt), max_tokens, ignore_eos=True, benchmark_generation_only=True, **kw)


@pytest.mark.parametrize("extra", [
    {"context_phase_params": ContextPhaseParams(1, [5], b"x")},
    {"request_type": RequestType.REQUEST_TYPE_CONTEXT_ONLY},
    {"request_type": RequestType.REQUEST_TYPE_GENERATION_ONLY},
    {"guided_decoding": GuidedDecodingParams("json")},
    {"output_config": OutputConfig(return_log_probs=True)},
], ids=["context_phase_params", "context_only", "generation_only", "guided", "logprobs"])
def test_what_a_benchmark_request_cannot_take_is_refused_by_name(extra):
    r = _bench(**extra)
    with pytest.raises(RequestError) as err:
        benchmark.check_request(r)
    assert err.value.param == FIELD and FIELD in str(err.value)
    with pytest.raises(RequestError) as err:   # rank 0's edge refuses it before dispatch
        check_request(r, LIMITS, generation_only=False)
    assert err.value.param == FIELD


def test_a_plain_benchmark_request_passes_and_the_flag_must_be_a_bool():
    benchmark.check_request(_bench())
    check_request(_bench(), LIMITS)
    bad = _bench()
    bad.benchmark_generation_only = "yes"
    with pytest.raises(RequestError, match=FIELD):
        check_request(bad, LIMITS)
    assert Request.from_dict(_bench().to_dict()).benchmark_generation_only is True   # crosses the wire


class _Tok:
    def encode(self, text):
        return [ord(c) % 1000 for c in text]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def _parse(body):
    return parse_completion(body, _Tok(), ("m",), 1024)


def test_http_field_parses_and_is_refused_unless_the_server_allows_it():
    p = _parse({"prompt": [1, 2, 3], "max_tokens": 4, "disagg_benchmark": "generation_only"})
    assert all(r.benchmark_generation_only for r in p.requests)
    with pytest.raises(ApiError) as err:
        check_benchmark_allowed(p, allowed=False)
    assert err.value.status == 400 and err.value.param == "disagg_benchmark"
    assert "--allow-benchmark-requests" in str(err.value)
    check_benchmark_allowed(p, allowed=True)
    plain = _parse({"prompt": [1, 2, 3]})
    assert not plain.request.benchmark_generation_only
    check_benchmark_allowed(plain, allowed=False)
    for value in ("context_only", True, 1):
        with pytest.raises(ApiError) as err:
            _parse({"prompt": [1, 2], "disagg_benchmark": value})
        assert err.value.param == "disagg_benchmark"
    with pytest.raises(ApiError) as err:
        _parse({"prompt": [1, 2], "disagg_benchmark": "generation_only",
                "disaggregated_params": {"request_type": "context_only"}})
    assert err.value.param == "disagg_benchmark"


@pytest.fixture(scope="module")
def executor():
    return Executor("random:tiny", ExecutorConfig(max_batch_size=8, max_num_tokens=64,
                                                  kv_cache_config=KvCacheConfig(4, 64, enable_prefix_reuse=True)))


def test_executor_decodes_without_prefill_over_the_prompts_blocks(executor):
    e = executor._engine
    prompt, max_tokens = list(range(100, 130)), 6   # 30 tokens: 8 blocks of 4 with the output
    before = dict(e.stats)
    [rid] = executor.enqueue_requests([_bench(prompt, max_tokens)])
    e.step()   # admitted: blocks for prompt + max_tokens, then its first decode step
    [seq] = e.scheduler.running
    assert seq.num_computed_tokens == len(prompt) + 1   # decoded at position len(prompt): attention over it
    assert e.blocks.num_free == e.blocks.num_blocks - e.blocks.blocks_needed(len(prompt) + max_tokens)
    [resp] = executor.await_responses(rid, timeout=60)
    assert resp.error_msg is None and resp.result.is_final
    out = resp.result.output_token_ids
    assert len(out) == max_tokens and out[0] == prompt[-1]
    assert e.stats["tokens"] - before["tokens"] == max_tokens - 1   # one token a decode step, no prefill
    executor.check_blocks_free()
    assert e.blocks.match_prefix(prompt + out)[0] == 0   # its (meaningless) KV was never cached for reuse


def test_executor_streams_the_first_token_and_ends_at_max_tokens_one(executor):
    [rid] = executor.enqueue_requests([_bench((9, 8, 7), 5, streaming=True)])
    got = []
    while not got or not got[-1].is_final:
        got += executor.await_responses(rid, timeout=60)
    tokens = [t for r in got for t in r.result.output_token_ids]
    assert got[0].result.output_token_ids == [7] and len(tokens) == 5
    [one] = executor.generate([_bench((3, 4), 1)])
    assert one.result.output_token_ids == [4] and one.result.finish_reason == "length"
    refused = executor.generate([_bench(guided_decoding=GuidedDecodingParams("json"))])[0]
    assert refused.error_param == FIELD
    executor.check_blocks_free()


def test_bench_modes_parse_and_mark_their_results():
    from disagg_mpi.bench.report import column_name, load_label
    from disagg_mpi.bench.runner import LoadPoint, parse_modes

    assert parse_modes("full") == ["full"]
    assert parse_modes("full, generation-only") == ["full", "generation-only"]
    for bad in ("", "gen", "full,full"):
        with pytest.raises(ValueError, match="--mode"):
            parse_modes(bad)
    assert LoadPoint(mode="generation-only").body == {"disagg_benchmark": "generation_only"}
    assert LoadPoint().body == {}
    gen = {"label": "a", "bench_mode": "generation-only", "request_rate": 1.0, "concurrency": 4}
    assert load_label(gen) == "generation-only,rate=1,conc=4"
    assert column_name(gen, many_loads=False) == "a (generation-only)"
    assert column_name({**gen, "bench_mode": "full"}, many_loads=False) == "a"

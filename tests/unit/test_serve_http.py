"""`disagg-mpi serve` end to end: a real server (mpiexec -n 3, random:tiny, 1 context +
1 generation executor) and a real aiohttp client on 127.0.0.1.

One server is shared by the module (startup takes seconds); it requires an API
key, so the auth tests need no second server. The last test stops it with
SIGTERM; the fixture kills whatever is left at teardown. The server, its
topology and the fixtures are in serve_server.py.
"""
# ruff: noqa: F811 - the tests take the imported fixtures by name

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

aiohttp = pytest.importorskip("aiohttp")
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.http_client import post, run, stream
from tests.unit.serve_server import (  # noqa: F401 - batch_run, server, workdir are fixtures
    AUTH,
    KEY,
    MAX_BODY,
    PROMPTS,
    STARTUP_S,
    TEXT_PROMPTS,
    batch_run,
    server,
    workdir,
)


async def _post(session, url, body, headers=AUTH, raw=None):
    return await post(session, url, body, headers, raw)


async def _stream(session, url, body):
    return await stream(session, url, body, AUTH)


def completion(server, body):
    async def go():
        async with aiohttp.ClientSession() as s:
            return await _post(s, server.url + "/v1/completions", body)
    return run(go())


# ---- tests -------------------------------------------------------------------------------------------


def test_health_and_models(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.get(server.url + "/health") as r:
                assert r.status == 200
                assert (await r.json())["status"] == "ok"
            async with s.get(server.url + "/v1/models", headers=AUTH) as r:
                assert r.status == 200
                body = await r.json()
                assert body["object"] == "list" and body["data"][0]["id"] == "random:tiny"
    run(go())


def test_completion_ids_and_text(server):
    status, body = completion(server, {"prompt": PROMPTS[1], "max_tokens": 7, "ignore_eos": True})
    assert status == 200, body
    ch = body["choices"][0]
    assert len(ch["token_ids"]) == 7 and ch["finish_reason"] == "length"
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["usage"] == {"prompt_tokens": len(PROMPTS[1]), "completion_tokens": 7,
                             "total_tokens": len(PROMPTS[1]) + 7}
    status, body = completion(server, {"model": "random:tiny", "prompt": "Hello", "max_tokens": 4, "n": 1,
                                       "user": "me", "logprobs": None})
    assert status == 200, body
    assert isinstance(body["choices"][0]["text"], str) and body["usage"]["prompt_tokens"] == 5


def test_chat(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            url = server.url + "/v1/chat/completions"
            msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
            status, body = await _post(s, url, {"messages": msgs, "max_tokens": 5, "ignore_eos": True})
            assert status == 200, body
            assert body["object"] == "chat.completion"
            ch = body["choices"][0]
            assert ch["message"]["role"] == "assistant" and isinstance(ch["message"]["content"], str)
            assert body["usage"]["completion_tokens"] == 5 and len(ch["token_ids"]) == 5
            events = await _stream(s, url, {"messages": msgs, "max_tokens": 5, "ignore_eos": True, "stream": True,
                                            "stream_options": {"include_usage": True}})
            chunks = [e for _, e in events if e != "[DONE]"]
            assert events[-1][1] == "[DONE]"
            assert chunks[0]["object"] == "chat.completion.chunk"
            assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
            streamed = [t for c in chunks if c["choices"] for t in c["choices"][0]["token_ids"]]
            assert streamed == ch["token_ids"]  # greedy: same tokens streamed or not
            assert chunks[-1]["usage"]["completion_tokens"] == 5 and chunks[-1]["choices"] == []
    run(go())


def test_streaming_tokens_arrive_before_the_end(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            body = {"prompt": PROMPTS[2], "max_tokens": 48, "ignore_eos": True}
            status, full = await _post(s, server.url + "/v1/completions", body)
            assert status == 200, full
            events = await _stream(s, server.url + "/v1/completions", {**body, "stream": True})
            return full, events
    full, events = run(go())
    assert events[-1][1] == "[DONE]"
    chunks = [(t, e) for t, e in events if e != "[DONE]"]
    assert len(chunks) >= 2
    assert all(e["choices"][0]["finish_reason"] is None for _, e in chunks[:-1])
    assert chunks[-1][1]["choices"][0]["finish_reason"] == "length"
    tokens = [tok for _, e in chunks for tok in e["choices"][0]["token_ids"]]
    assert tokens == full["choices"][0]["token_ids"]
    first_token_at = next(t for t, e in chunks if e["choices"][0]["token_ids"])
    assert first_token_at < chunks[-1][0], "the first token came together with the last"
    assert len({t for t, _ in chunks}) >= 2


def test_32_concurrent_requests(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8 + i % 5, "ignore_eos": True,
                       "stream": i % 2 == 1} for i in range(32)]

            async def one(b):
                if b["stream"]:
                    ev = await _stream(s, server.url + "/v1/completions", b)
                    return [t for _, e in ev if e != "[DONE]" for t in e["choices"][0]["token_ids"]]
                status, body = await _post(s, server.url + "/v1/completions", b)
                assert status == 200, body
                return body["choices"][0]["token_ids"]
            return bodies, await asyncio.gather(*(one(b) for b in bodies))
    bodies, outs = run(go())
    for b, out in zip(bodies, outs):
        assert len(out) == b["max_tokens"]
    by_prompt = {}
    for b, out in zip(bodies, outs):  # greedy: one prompt, one answer (prefix-wise), whatever the batch
        key = tuple(b["prompt"])
        ref = by_prompt.setdefault(key, out)
        n = min(len(ref), len(out))
        assert out[:n] == ref[:n]


@pytest.mark.parametrize("raw,body,param", [
    (b"not json", None, None),
    (None, {"max_tokens": 3}, "prompt"),
    (None, {"prompt": "x", "frobnicate": True}, "frobnicate"),
    (None, {"prompt": "x", "n": 17}, "n"),
    (None, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (None, {"prompt": [1, 99999]}, "prompt"),
    (None, {"prompt": "x", "max_tokens": -1}, "max_tokens"),
])
def test_bad_bodies_are_400(server, raw, body, param):
    async def go():
        async with aiohttp.ClientSession() as s:
            return await _post(s, server.url + "/v1/completions", body, raw=raw)
    status, out = run(go())
    assert status == 400, out
    err = out["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert err["param"] == param and param in err["message"]


def test_benchmark_requests_are_refused_unless_allowed(server):
    """`disagg_benchmark` reserves KV without computing it: a server started without
    --allow-benchmark-requests (this one) refuses it by name, on both endpoints."""
    for path, body in (("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 4}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        async def go(path=path, body=body):
            async with aiohttp.ClientSession() as s:
                return await _post(s, server.url + path, {**body, "disagg_benchmark": "generation_only"})
        status, out = run(go())
        assert status == 400, out
        err = out["error"]
        assert err["param"] == "disagg_benchmark" and err["code"] == "benchmark_requests_disabled", err
        assert "disagg_benchmark" in err["message"] and "--allow-benchmark-requests" in err["message"]


def test_other_errors(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            url = server.url + "/v1/completions"
            # refused by the engine: prompt + max_tokens over the model's context
            status, out = await _post(s, url, {"prompt": [5, 6], "max_tokens": 5000})
            assert status == 400 and "exceeds" in out["error"]["message"], out
            status, out = await _post(s, url, {"prompt": "x" * 2 * MAX_BODY})
            assert status == 413 and "max_body_bytes" in out["error"]["message"], out
            async with s.get(server.url + "/v1/nothing", headers=AUTH) as r:
                assert r.status == 404 and (await r.json())["error"]["message"]
            async with s.get(url, headers=AUTH) as r:
                assert r.status == 405
            status, out = await _post(s, server.url + "/v1/chat/completions", {"messages": "hi"})
            assert status == 400 and out["error"]["param"] == "messages"
            # a forged generation_only request: the engine refuses the opaque state
            status, out = await _post(s, url, {"prompt": "x", "disaggregated_params": {
                "request_type": "generation_only", "first_gen_tokens": [5], "ctx_request_id": 1,
                "opaque_state": "bm90IGEgc3RhdGU="}})
            assert status == 400 and out["error"]["message"], out
    run(go())


def test_api_key_enforced(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            url = server.url + "/v1/completions"
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                status, out = await _post(s, url, {"prompt": "x"}, headers=headers)
                assert status == 401 and out["error"]["code"] == "invalid_api_key", out
            async with s.get(server.url + "/v1/models") as r:
                assert r.status == 401
    run(go())


def test_client_disconnect_cancels(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            body = {"prompt": PROMPTS[3], "max_tokens": 1500, "ignore_eos": True, "stream": True}
            r = await s.post(server.url + "/v1/completions", json=body, headers=AUTH)
            assert r.status == 200
            got = b""
            while got.count(b"\n\n") < 3:
                got += await r.content.readany()
            r.close()  # drop the connection mid-stream
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(server.url + "/metrics") as r:
                    fams = {f.name: f for f in text_string_to_metric_families(await r.text())}
                cancelled = [x.value for x in fams["disagg_requests"].samples
                             if x.name == "disagg_requests_total" and x.labels["outcome"] == "cancelled"]
                in_flight = fams["disagg_requests_in_flight"].samples[0].value
                if cancelled and cancelled[0] >= 1 and in_flight == 0:
                    return
                assert time.monotonic() < deadline, (cancelled, in_flight)
                await asyncio.sleep(0.1)
    run(go())


def test_metrics(server):
    completion(server, {"prompt": PROMPTS[0], "max_tokens": 4, "ignore_eos": True})

    async def go():
        async with aiohttp.ClientSession() as s, s.get(server.url + "/metrics") as r:
            assert r.status == 200
            return await r.text()
    text = run(go())
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    reqs = {s.labels["outcome"]: s.value for s in fams["disagg_requests"].samples if s.name.endswith("_total")}
    assert set(reqs) == {"ok", "refused", "error", "cancelled"} and reqs["ok"] >= 1
    for name in ("disagg_time_to_first_token_seconds", "disagg_time_per_output_token_seconds",
                 "disagg_e2e_request_latency_seconds"):
        count = [s.value for s in fams[name].samples if s.name == name + "_count"]
        assert count and count[0] >= 1, name
    free = {s.labels["executor"]: s.value for s in fams["disagg_kv_free_blocks"].samples}
    assert set(free) == {"0", "1"}
    assert {s.labels["executor"] for s in fams["disagg_executor_queue_depth"].samples} == {"0", "1"}
    assert next(s.value for s in fams["disagg_kv_transfer_bytes"].samples if s.name.endswith("_total")) > 0
    assert "disagg_kv_transfer_seconds" in fams and "disagg_requests_in_flight" in fams


def test_context_only_then_generation_only_equals_one_request(server):
    prompt = PROMPTS[4]
    base = {"prompt": prompt, "max_tokens": 10, "ignore_eos": True}
    status, whole = completion(server, base)
    assert status == 200, whole
    status, ctx = completion(server, {**base, "disaggregated_params": {"request_type": "context_only"}})
    assert status == 200, ctx
    dp = ctx["choices"][0]["disaggregated_params"]
    assert dp["request_type"] == "context_only" and isinstance(dp["ctx_request_id"], int)
    assert dp["first_gen_tokens"] == whole["choices"][0]["token_ids"][:1]
    assert ctx["choices"][0]["token_ids"] == dp["first_gen_tokens"]
    gen_params = {"request_type": "generation_only", "first_gen_tokens": dp["first_gen_tokens"],
                  "ctx_request_id": dp["ctx_request_id"], "opaque_state": dp["opaque_state"]}
    status, gen = completion(server, {**base, "disaggregated_params": gen_params})
    assert status == 200, gen
    assert gen["choices"][0]["token_ids"] == whole["choices"][0]["token_ids"]
    assert gen["choices"][0]["text"] == whole["choices"][0]["text"]
    # the same params a second time: the context was already handed off
    status, again = completion(server, {**base, "disaggregated_params": gen_params})
    assert status == 400 and "already" in again["error"]["message"], again


def test_greedy_http_equals_batch_run(server, batch_run, workdir):
    out, _ = batch_run.communicate(timeout=STARTUP_S)
    assert batch_run.returncode == 0, out
    expected = {ln["id"]: ln for ln in map(json.loads, (workdir / "out.jsonl").read_text().splitlines())}

    async def go():
        async with aiohttp.ClientSession() as s:
            url = server.url + "/v1/completions"
            bodies = {f"ids{i}": {"prompt": p, "max_tokens": 12, "ignore_eos": True} for i, p in enumerate(PROMPTS)}
            bodies.update({f"text{i}": {"prompt": t, "max_tokens": 12} for i, t in enumerate(TEXT_PROMPTS)})
            res = await asyncio.gather(*(_post(s, url, b) for b in bodies.values()))
            return dict(zip(bodies, res))
    got = run(go())
    for line_id, (status, body) in got.items():
        assert status == 200, body
        exp = expected[line_id]
        assert body["choices"][0]["token_ids"] == exp["output_ids"], line_id
        assert body["choices"][0]["text"] == exp["text"], line_id
        assert body["choices"][0]["finish_reason"] == exp["finish_reason"], line_id
        # run's lines say where the time went (hops.py): rank 0's and both executors' hops
        assert {"arrival", "ctx_answer_sent", "kv_landed", "final"} <= set(exp["metrics"]["hops"]), line_id
        direct = "ctx_ready_sent" in exp["metrics"]["hops"]  # (the direct hand-off: the default)
        assert ("ctx_ready_sent->gen_admitted" if direct else "ctx_answer_received->gen_enqueued") in exp["hops_ms"]


def test_final_chunk_carries_per_request_metrics(server):
    """The final stream chunk and the full body report where the phases ran and the KV moved."""
    import asyncio
    import json as _json

    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as s:
            body = {"prompt": [5, 6, 7, 8, 9, 10], "max_tokens": 4, "ignore_eos": True}
            async with s.post(f"{server.url}/v1/completions", json=body, headers=AUTH) as r:
                full = await r.json()
            events = []
            async with s.post(f"{server.url}/v1/completions", json={**body, "stream": True,
                                                                    "stream_options": {"include_usage": True}},
                              headers=AUTH) as r:
                async for raw in r.content:
                    line = raw.decode().strip()
                    if line.startswith("data: {"):
                        events.append(_json.loads(line[6:]))
            return full, events

    full, events = asyncio.run(go())
    content = [e for e in events if e["choices"]]  # (not the usage chunk)
    last = content[-1]
    for m in (full["metrics"], last["metrics"]):
        assert m["kv_transfer_bytes"] > 0 and "context_executor" in m and "generation_executor" in m
    # Where the time went (hops.py): every hop of the chain, in causal order, HTTP in and out included.
    # (The direct hand-off, the default, takes DIRECT_CHAIN: rank 0's context-answer hops lie beside it.)
    from disagg_mpi.hops import chain_of

    for m in (full["metrics"], last["metrics"]):
        chain = [h.value for h, _ in chain_of(m["hops"])]
        assert set(chain) <= set(m["hops"]) and {"ctx_answer_sent", "ctx_answer_received"} <= set(m["hops"])
        times = [m["hops"][h] for h in chain]
        assert times == sorted(times), m["hops"]
    sm = last["metrics"]
    assert sm["sse_events"] == len(content) >= 2 and sm["sse_max_gap_ms"] >= 0
    assert sm["hops"]["kv_landed"] <= sm["hops"]["sse_first"] <= sm["hops"]["http_out"]
    assert "sse_events" not in full["metrics"] and "sse_first" not in full["metrics"]["hops"]


def test_sigterm_drains_and_exits_zero(server):
    """Last: stops the shared server. An in-flight request finishes; new ones get 503."""
    async def go():
        async with aiohttp.ClientSession() as s:
            url = server.url + "/v1/completions"
            long = asyncio.ensure_future(_post(s, url, {"prompt": PROMPTS[5], "max_tokens": 300,
                                                        "ignore_eos": True}))
            await asyncio.sleep(0.3)
            assert not long.done()
            os.kill(server.proc.pid, signal.SIGTERM)  # mpiexec forwards it to every rank
            t0 = time.monotonic()
            while "shutting down" not in server.log.read_text():
                assert time.monotonic() - t0 < 5, "no shutdown message"
                await asyncio.sleep(0.02)
            status, out = await _post(s, url, {"prompt": "x", "max_tokens": 2})
            late = (status, out)
            status, body = await long
            return late, status, body
    t0 = time.monotonic()
    late, status, body = run(go())
    assert status == 200 and len(body["choices"][0]["token_ids"]) == 300, body
    assert late[0] == 503 and late[1]["error"]["message"], late  # refused while draining
    rc = server.proc.wait(timeout=30)
    assert rc == 0, server.log.read_text()[-3000:]
    assert time.monotonic() - t0 < 10 + 15

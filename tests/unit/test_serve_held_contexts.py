"""Orphaned context_only requests cannot starve other clients (issue 20, part 3), against a real
`disagg-mpi serve` under mpiexec -n 3 (random:tiny, 1 context + 1 generation executor).

The context executor's pool is small (64 blocks of 4 tokens) and its lease long enough to matter
(LEASE s). An attacker sends four context_only requests of 16 blocks each and never follows up:
before the fix they filled the pool, a long prompt then waited for a lease, and a short chat
request waited behind it for the rest of the lease. Now client holds stop at half the pool (the
third and fourth get 429 with Retry-After), and the chat passes the long prompt that does not fit.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

aiohttp = pytest.importorskip("aiohttp")
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.http_client import run
from tests.unit.serve_server import AUTH, KEY, launch, workdir  # noqa: F401 - fixtures

LEASE = 20.0
VICTIM_BOUND_S = 8.0  # the chat must finish within this; before the fix it waited most of LEASE
TOPOLOGY = f"""
model: {{path: "random:tiny", dtype: float32}}
router: round_robin
server: {{host: 127.0.0.1, port: 0, api_key: {KEY}}}
context_executors:
  - participant_ids: [1]
    max_batch_size: 8
    max_num_tokens: 256
    kv_cache: {{block_size: 4, num_blocks: 64}}
    cache_transceiver_config: {{enable_cache_transceiver: true, lease_seconds: {LEASE}, max_held_fraction: 0.5}}
generation_executors:
  - participant_ids: [2]
    max_batch_size: 16
    max_num_tokens: 256
    kv_cache: {{block_size: 4, num_blocks: 512}}
    cache_transceiver_config: {{enable_cache_transceiver: true}}
"""
# 60 tokens + the first token: 16 blocks each; four of them are the whole context pool.
ATTACK = [[(11 * i + 7 * j + 3) % 1000 for j in range(60)] for i in range(4)]
GEN_FIELDS = ("first_gen_tokens", "ctx_request_id", "opaque_state")
BIG = [(5 * j + 1) % 1000 for j in range(130)]  # 33 blocks: more than the 32 the two holds leave


@pytest.fixture(scope="module")
def server(workdir):  # noqa: F811 - the imported fixture by name
    with launch(workdir, "held", TOPOLOGY, 3) as srv:
        yield srv


async def _post(s, url, body):
    async with s.post(url, json=body, headers=AUTH) as r:
        return r.status, r.headers, await r.json(content_type=None)


def _context_only(prompt):
    return {"prompt": prompt, "max_tokens": 8, "ignore_eos": True,
            "disaggregated_params": {"request_type": "context_only"}}


def _held_metrics(server):
    with urllib.request.urlopen(server.url + "/metrics") as r:
        fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    ctx = {s.name: s.value for name in ("disagg_kv_held_blocks", "disagg_kv_held_client_blocks",
                                        "disagg_kv_oldest_hold_seconds")
           for s in fams[name].samples if s.labels["executor"] == "0"}
    ctx["refused"] = next(s.value for s in fams["disagg_held_contexts_full"].samples if s.name.endswith("_total"))
    return ctx


def test_orphaned_context_only_requests_do_not_starve_a_chat(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            url = server.url + "/v1/completions"
            attack = [await _post(s, url, _context_only(p)) for p in ATTACK]
            big = asyncio.create_task(_post(s, url, {"prompt": BIG, "max_tokens": 4, "ignore_eos": True}))
            await asyncio.sleep(1.0)  # the long prompt is queued on the context executor, and does not fit
            t0 = time.perf_counter()
            victim = await _post(s, server.url + "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "ignore_eos": True})
            victim_s = time.perf_counter() - t0
            big_waiting = not big.done()
            held = _held_metrics(server)
            deadline = time.monotonic() + 5
            while held["disagg_kv_held_blocks"] != 32 and time.monotonic() < deadline:  # (stats come every 1 s)
                await asyncio.sleep(0.2)
                held = _held_metrics(server)
            # Nobody else was harmed: a held context's own generation phase still runs, and frees its
            # blocks, so the long prompt fits and finishes well before the lease ends.
            dp = attack[0][2]["choices"][0]["disaggregated_params"]
            gen = await _post(s, url, {"prompt": ATTACK[0], "max_tokens": 8, "ignore_eos": True,
                                       "disaggregated_params": {"request_type": "generation_only",
                                                                **{k: dp[k] for k in GEN_FIELDS}}})
            big_out = await asyncio.wait_for(big, LEASE / 2)
            return attack, victim, victim_s, big_waiting, held, gen, big_out

    attack, victim, victim_s, big_waiting, held, gen, big_out = run(go())
    assert victim[0] == 200, victim
    assert len(victim[2]["choices"][0]["token_ids"]) == 8
    assert victim_s < VICTIM_BOUND_S, f"the chat took {victim_s:.1f} s behind held contexts"
    assert big_waiting, "the long prompt was not waiting: the chat passed nothing"
    assert [a[0] for a in attack] == [200, 200, 429, 429], [a[2] for a in attack]
    for status, headers, body in attack[2:]:
        err = body["error"]
        assert err["code"] == "held_contexts_full" and err["type"] == "rate_limit_error", body
        assert "held contexts awaiting their generation phase" in err["message"], body
        assert 1 <= int(headers["Retry-After"]) <= LEASE, headers
    assert held["disagg_kv_held_blocks"] == 32 and held["disagg_kv_held_client_blocks"] == 32, held
    assert 0 < held["disagg_kv_oldest_hold_seconds"] < LEASE and held["refused"] == 2, held
    assert gen[0] == 200 and len(gen[2]["choices"][0]["token_ids"]) == 8, gen
    assert big_out[0] == 200 and len(big_out[2]["choices"][0]["token_ids"]) == 4, big_out

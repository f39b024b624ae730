"""Cancellation at each stage of the disaggregated flow ends the request as cancelled and frees blocks.

Stages: queued behind another request, prefilling (a long prompt in many chunks),
decoding, streaming. Waiting for a transfer is in test_context_params.py.
"""

from __future__ import annotations

import pytest

from disagg_mpi import Request, launch
from tests.mpi.helpers import tiny_topology

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.world(3)]


def _prompt(n: int, seed: int = 1) -> list[int]:
    return [(seed * 13 + 7 * j) % 1000 + 3 for j in range(n)]


_FINALS: dict = {}  # finals of other requests that arrive while waiting for one


def _final(orch, gid, on_stream=None):
    while gid not in _FINALS:
        for g, resp in orch.await_responses(timeout=30):
            if resp.is_final:
                _FINALS[g] = resp
            elif g == gid and on_stream is not None:
                on_stream(resp)
    return _FINALS.pop(gid)


def _wait_until(orch, pred, limit=2000):
    for _ in range(limit):
        stats = orch.executor_stats()
        if pred(stats):
            return stats
        for g, resp in orch.await_responses(timeout=0.005):
            if resp.is_final:
                _FINALS[g] = resp
    raise AssertionError("stage never reached")


def test_cancel_queued_prefilling_decoding_and_streaming():
    # One sequence per step on each executor, 16 tokens per step: prompts prefill in chunks.
    topo = tiny_topology(1, 1, max_batch_size=1, max_num_tokens=16,
                         kv_cache={"block_size": 4, "num_blocks": 1024})
    with launch(topo) as orch:
        if orch is None:
            return
        # Prefilling: a 1,500-token prompt takes ~94 context steps.
        [long_ctx] = orch.submit([Request(_prompt(1500), max_tokens=4, ignore_eos=True)])
        # Queued: waits behind it on the context executor (batch of 1).
        [queued] = orch.submit([Request(_prompt(20, 2), max_tokens=4, ignore_eos=True)])
        _wait_until(orch, lambda s: s[0]["running"] == 1 and s[0]["tokens"] > 0)
        orch.cancel_request(queued)
        orch.cancel_request(long_ctx)
        for gid in (queued, long_ctx):
            resp = _final(orch, gid)
            assert resp.error_msg is None and resp.result.finish_reason == "cancelled", resp
        orch.wait_pools_full()

        # Decoding (on the generation executor) and streaming.
        [dec] = orch.submit([Request(_prompt(10, 3), max_tokens=1000, ignore_eos=True)])
        _wait_until(orch, lambda s: s[1]["running"] == 1)
        orch.cancel_request(dec)
        resp = _final(orch, dec)
        assert resp.result.finish_reason == "cancelled" and 0 < len(resp.result.output_token_ids) < 1000
        seen = []
        [stream] = orch.submit([Request(_prompt(10, 4), max_tokens=1000, ignore_eos=True, streaming=True)])

        def cancel_after_some(resp):
            seen.extend(resp.result.output_token_ids)
            if len(seen) >= 3:
                orch.cancel_request(stream)

        resp = _final(orch, stream, cancel_after_some)
        assert resp.result.finish_reason == "cancelled" and len(seen) >= 3
        assert len(resp.result.output_token_ids) < 1000
        orch.wait_pools_full()

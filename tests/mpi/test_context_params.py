"""Signed context params, replays and leases, over a real 1 context + 1 generation job."""

from __future__ import annotations

import time

import msgpack
import pytest

from disagg_mpi import ContextPhaseParams, Request, launch
from disagg_mpi.orchestrator.tracks import Flow
from tests.mpi.helpers import tiny_prompts, tiny_topology

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.world(3)]


def _context(orch, prompt):
    [gid] = orch.enqueue_context([Request(prompt, max_tokens=6, ignore_eos=True)])
    [(g, resp)] = orch.await_context_responses(timeout=60)
    assert g == gid and resp.error_msg is None
    return gid, resp.result.context_phase_params


def _generate(orch, gid, prompt, cpp):
    """A generation phase with these params, under a new global id each time (as an HTTP client's
    generation_only request): the context's own id `gid` ends with its first generation phase."""
    [g] = orch.enqueue_generation_only([Request(prompt, max_tokens=6, ignore_eos=True, context_phase_params=cpp)])
    while True:
        for got, resp in orch.await_generation_responses(timeout=60):
            if got == g and resp.is_final:
                return resp


def test_forged_altered_and_replayed_params_are_refused():
    with launch(tiny_topology(1, 1)) as orch:
        if orch is None:
            return
        prompt = tiny_prompts(3)[2]
        gid, cpp = _context(orch, prompt)
        # Altered: flip a byte of the signed payload.
        outer = msgpack.unpackb(cpp.opaque_state)
        outer["p"] = outer["p"][:-1] + bytes([outer["p"][-1] ^ 1])
        bad = ContextPhaseParams(cpp.req_id, cpp.first_gen_tokens, msgpack.packb(outer))
        resp = _generate(orch, gid, prompt, bad)
        assert resp.error_msg and "bad signature" in resp.error_msg
        # Forged from scratch.
        resp = _generate(orch, gid, prompt, ContextPhaseParams(cpp.req_id, [5], b"not a state"))
        assert resp.error_msg and "malformed" in resp.error_msg
        # The genuine params still work once...
        good = _generate(orch, gid, prompt, cpp)
        assert good.error_msg is None and good.result.output_token_ids[0] == cpp.first_gen_tokens[0]
        # ... and only once: a replay finds the blocks already served.
        resp = _generate(orch, gid, prompt, cpp)
        assert resp.error_msg and "already served" in resp.error_msg
        # The params are bound to their prompt: another one of the same length is refused.
        other = [t + 1 if i == 0 else t for i, t in enumerate(prompt)]
        resp = _generate(orch, gid, other, cpp)
        assert resp.error_msg and "prompt differs" in resp.error_msg
        orch.wait_pools_full()


def test_lease_frees_blocks_nobody_pulls():
    topo = tiny_topology(1, 1)
    ctx = topo.context_executors[0].model_copy(update={
        "cache_transceiver_config": topo.context_executors[0].cache_transceiver_config.model_copy(
            update={"lease_seconds": 0.5})})
    topo = topo.model_copy(update={"context_executors": [ctx]})
    with launch(topo) as orch:
        if orch is None:
            return
        prompt = tiny_prompts(4)[3]
        gid, cpp = _context(orch, prompt)
        held = orch.executor_stats()[0]
        assert held["held_contexts"] == 1 and held["free_blocks"] < held["num_blocks"]
        time.sleep(1.0)
        orch.wait_pools_full(timeout=10)  # the lease expired: the context side let go
        resp = _generate(orch, gid, prompt, cpp)
        assert resp.error_msg and "expired" in resp.error_msg
        orch.wait_pools_full()


def _with_transfer_timeout(topo, seconds: float):
    gen = topo.generation_executors[0]
    gen = gen.model_copy(update={"cache_transceiver_config": gen.cache_transceiver_config.model_copy(
        update={"timeout_seconds": seconds})})
    return topo.model_copy(update={"generation_executors": [gen]})


def test_stalled_transfer_times_out_and_frees_both_sides(monkeypatch):
    # Fault injection: the generation side claims the context but never pulls.
    monkeypatch.setenv("DISAGG_FAULT_STALL_PULL", "1")
    with launch(_with_transfer_timeout(tiny_topology(1, 1), 1.0)) as orch:
        if orch is None:
            return
        prompts = tiny_prompts(3)
        gids = orch.submit([Request(p, max_tokens=6, ignore_eos=True) for p in prompts])
        finals = {}
        while len(finals) < 3:
            for gid, resp in orch.await_responses(timeout=30):
                if resp.is_final:
                    finals[gid] = resp
        for gid in gids:
            assert finals[gid].error_msg and "did not complete within 1 s" in finals[gid].error_msg
        orch.wait_pools_full(timeout=10)  # the context let go, and so did the generation side


def test_cancel_while_waiting_for_a_transfer(monkeypatch):
    monkeypatch.setenv("DISAGG_FAULT_STALL_PULL", "1")
    with launch(_with_transfer_timeout(tiny_topology(1, 1), 2.0)) as orch:
        if orch is None:
            return
        [gid] = orch.submit([Request(tiny_prompts(2)[1], max_tokens=6, ignore_eos=True)])
        moved = False
        while not moved:  # wait until the request sits on the generation side
            orch.await_responses(timeout=0.05)
            moved = orch.executor_stats()[1]["pending_transfers"] == 1
        orch.cancel_request(gid)
        final = None
        while final is None:
            for g, resp in orch.await_responses(timeout=30):
                if resp.is_final:
                    final = resp
        assert final.error_msg is None and final.result.finish_reason == "cancelled"
        orch.wait_pools_full(timeout=10)


def test_the_edge_refuses_bad_values_and_binds_the_first_tokens(tmp_path_factory):
    """Rank 0 refuses what would crash a step or overflow the control plane, keeping no state for it;
    first_gen_tokens other than the signed ones are refused and leave the context for the genuine
    request (issue 20)."""
    import json

    import numpy as np

    from disagg_mpi.api import RequestError, SamplingConfig
    from disagg_mpi.cli.run import _run_batch

    topo = tiny_topology(1, 1)
    with launch(topo) as orch:
        if orch is None:
            return
        prompt = tiny_prompts(3)[2]
        load = dict(orch.load)
        bad = [Request(prompt, sampling_config=SamplingConfig(temperature=1.0, seed=2**64)),
               Request(prompt, stop_token_ids=[2**64]), Request([5, 1024]), Request(prompt, max_tokens=2**64)]
        for r in bad:
            for enqueue in (orch.submit, orch.enqueue_context, orch.enqueue_requests):
                with pytest.raises(RequestError):
                    enqueue([Request(prompt), r])  # all or none: the good one does not start either
        first_oov = ContextPhaseParams(1, [1024], b"x")
        with pytest.raises(RequestError, match="outside the vocabulary") as err:
            orch.enqueue_generation_only([Request(prompt, context_phase_params=first_oov)])
        assert err.value.param == "context_phase_params.first_gen_tokens"
        assert orch.num_tracked == 0 and dict(orch.load) == load
        # numpy integers pass the check and are sent as plain ints (msgpack cannot pack numpy's) ...
        [r] = orch.generate([Request([np.int64(t) for t in prompt], max_tokens=np.int32(3), ignore_eos=True)])
        assert r.error_msg is None and len(r.result.output_token_ids) == 3
        # ... and a dispatch that fails anyway (here: one that skips the check) leaves no state behind
        ex, load = orch.generation_ids[0], dict(orch.load)
        raw = Request([np.int64(7)] * 12, max_tokens=2)
        gid = orch._new(raw, Flow.AUTO)
        with pytest.raises(TypeError):
            orch._dispatch_new(gid, raw, ex, "generation")
        assert orch.num_tracked == 0 and dict(orch.load) == load
        assert orch.prefix[ex].cached_tokens([7] * 13) == 0
        gid, cpp = _context(orch, prompt)
        for first in ([cpp.first_gen_tokens[0] ^ 1], cpp.first_gen_tokens + [5]):
            resp = _generate(orch, gid, prompt, ContextPhaseParams(cpp.req_id, first, cpp.opaque_state))
            assert resp.error_msg and "differ from the token(s)" in resp.error_msg, resp.error_msg
            assert resp.error_param == "context_phase_params.first_gen_tokens"
        good = _generate(orch, gid, prompt, cpp)
        assert good.error_msg is None and good.result.output_token_ids[0] == cpp.first_gen_tokens[0]
        # `disagg-mpi run`: a bad line is that line's error, the others run
        d = tmp_path_factory.mktemp("run")
        lines = [{"id": "good", "input_ids": prompt, "max_tokens": 3}, {"id": "top_k", "input_ids": prompt,
                 "top_k": 2**64, "temperature": 1.0}, {"id": "oov", "input_ids": [5, 4096]}]
        (d / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        _run_batch(orch, topo, str(d / "in.jsonl"), str(d / "out.jsonl"), timeout=60)
        out = {x["id"]: x for x in map(json.loads, (d / "out.jsonl").read_text().splitlines())}
        assert out["good"]["error"] is None and len(out["good"]["output_ids"]) == 3
        assert "sampling_config.top_k" in out["top_k"]["error"] and "vocabulary" in out["oov"]["error"]
        orch.wait_pools_full()

"""The direct hand-off (`direct_handoff`; engine/direct.py) against a scripted transport.

The notice (`ContextReady`) and rank 0's messages come from two ranks, so a live job cannot force
their order; here each test sends them in the order it needs. The real flow runs under MPI in
tests/mpi/test_direct_handoff.py.
"""

from __future__ import annotations

import time

import pytest

from disagg_mpi.api import ContextPhaseParams, Request, RequestType
from disagg_mpi.engine.direct import Notice, Parked, Parking
from disagg_mpi.orchestrator.router import direct_handoff
from disagg_mpi.protocol import ContextReady, Release
from tests.unit.test_handoff import CTX_RANK, ContextGroup, _engine, _gen_request, _ops


@pytest.fixture(scope="module")
def model_config():
    from disagg_mpi.model import load_model

    return load_model("random:tiny", seed=1).config


def _parked_request(cs):
    """The generation phase as rank 0 parks it (no params), and the params its notice brings."""
    full = _gen_request(cs)
    return Request(full.input_token_ids, max_tokens=5, request_type=RequestType.REQUEST_TYPE_GENERATION_ONLY,
                   ignore_eos=True), full.context_phase_params


def test_a_notice_is_a_granted_claim_the_pull_starts_at_once(model_config):
    eng, group, sent, cs = _engine(model_config, early=False)
    req, cpp = _parked_request(cs)
    eng.add_request(1, req, await_context=True)
    assert eng.take_responses() == [] and group.pulls == [] and not eng._meta[1].metrics.hops
    assert eng.load() == 5 and not eng.busy   # its decode counts as load; nothing to step yet
    eng.handoff.direct.on_context_ready(1, cpp, CTX_RANK)
    assert group.pulls == [1] and _ops(sent) == []   # no Claim: the grant came with the notice
    group.land(1)
    eng.housekeeping()
    assert [s.req_id for s in eng.scheduler.ready] == [1] and sent == [(CTX_RANK, Release(11, 1))]
    m = eng._meta[1].metrics
    assert m.hops["gen_admitted"] <= m.hops["claim_sent"] == m.hops["claim_granted"] <= m.hops["kv_landed"]
    assert m.kv_claim_ms == 0.0 and m.kv_claim_answer_ms == 0.0 and m.kv_transfer_bytes == 4096


def test_a_notice_that_comes_before_its_request_waits_for_it(model_config):
    eng, group, sent, cs = _engine(model_config, early=False)
    req, cpp = _parked_request(cs)
    eng.handoff.direct.on_context_ready(1, cpp, CTX_RANK)
    assert group.pulls == [] and sent == []
    eng.add_request(1, req, await_context=True)
    assert group.pulls == [1]


def test_a_request_that_left_releases_its_notice_at_once(model_config):
    """Cancelled (rank 0 cancels both phases) or refused before its notice: the context is not held
    for a lease."""
    eng, group, sent, cs = _engine(model_config, early=False)
    req, cpp = _parked_request(cs)
    eng.add_request(1, req, await_context=True)
    eng.cancel(1)
    [resp] = eng.take_responses()
    assert resp.result.is_final and resp.result.finish_reason == "cancelled"
    eng.handoff.direct.on_context_ready(1, cpp, CTX_RANK)
    assert sent == [(CTX_RANK, Release(11, 1))] and group.pulls == []
    too_long = Request(req.input_token_ids, max_tokens=10_000, request_type=req.request_type)
    eng.add_request(2, too_long, await_context=True)   # refused at admission
    assert eng.take_responses()[0].error_msg
    eng.handoff.direct.on_context_ready(2, cpp, CTX_RANK)
    assert sent[-1] == (CTX_RANK, Release(11, 2)) and eng.blocks.num_free == eng.blocks.num_blocks


@pytest.mark.parametrize("cpp_of, src, words", [
    (lambda c: ContextPhaseParams(c.req_id, c.first_gen_tokens, b"forged"), CTX_RANK, "malformed"),
    (lambda c: c, CTX_RANK + 1, f"whose leader is rank {CTX_RANK}"),
    (lambda c: ContextPhaseParams(c.req_id, [43], c.opaque_state), CTX_RANK, "first_gen_tokens"),
])
def test_a_refused_notice_fails_the_request_and_releases_the_context(model_config, cpp_of, src, words):
    eng, group, sent, cs = _engine(model_config, early=False)
    req, cpp = _parked_request(cs)
    eng.add_request(1, req, await_context=True)
    bad = cpp_of(cpp)
    eng.handoff.direct.on_context_ready(1, bad, src)
    [resp] = eng.take_responses()
    assert words in resp.error_msg and group.pulls == []
    assert sent == [(src, Release(bad.req_id, 1))] and eng.blocks.num_free == eng.blocks.num_blocks


def test_without_free_blocks_it_claims_when_it_has_them(model_config):
    """A grant is used at once or not at all: one that must wait for blocks claims as usual."""
    eng, group, sent, cs = _engine(model_config, early=False)
    req, cpp = _parked_request(cs)
    eng.add_request(1, req, await_context=True)
    eng.blocks.allocate(99, eng.blocks.num_blocks * eng.blocks.block_size)   # the pool is full
    eng.handoff.direct.on_context_ready(1, cpp, CTX_RANK)
    assert group.pulls == [] and sent == []
    eng.blocks.free(99)
    eng.housekeeping()
    assert _ops(sent) == ["claim"] and group.pulls == []
    eng.handoff.on_claim_reply(1, None)
    assert group.pulls == [1]


def test_parking_forgets_what_is_old():
    p = Parking(keep_s=1.0)
    cpp = ContextPhaseParams(3, [1], b"x")
    assert p.on_notice(5, Notice(cpp, 2, at=0.0)) == (None, False)   # early
    p.leave(6)
    assert p.expire(now=0.5) == [] and p.has_timers
    assert [rid for rid, _ in p.expire(now=time.monotonic() + 2.0)] == [5]   # to release: it never came
    assert not p.has_timers and p.park(5, Parked(None, None)) is None and len(p) == 1


def _context(model_config, notify):
    from disagg_mpi.api import CacheTransceiverConfig, ExecutorConfig, KvCacheConfig
    from disagg_mpi.engine.llm_engine import LLMEngine
    from disagg_mpi.engine.model_runner import ModelRunner
    from disagg_mpi.model import load_model
    from disagg_mpi.transfer.cache_state import CacheState

    cfg = ExecutorConfig(max_batch_size=4, max_num_tokens=64, kv_cache_config=KvCacheConfig(4, 32),
                         cache_transceiver_config=CacheTransceiverConfig(enable_cache_transceiver=True))
    mc = model_config
    cs = CacheState.create(mc.num_layers, mc.num_kv_heads, mc.head_dim, 4, "float32")
    sent = []
    eng = LLMEngine(ContextGroup(ModelRunner(load_model("random:tiny", seed=1), 32, 4, "cpu"), False), mc, cfg,
                    cs, executor_id=0, world_ranks=(CTX_RANK,), key=b"k" * 32,
                    send_peer=lambda dest, msg: sent.append((dest, msg)))
    eng.add_request(5, Request([5, 6, 7, 8, 9, 10], max_tokens=4,
                               request_type=RequestType.REQUEST_TYPE_CONTEXT_ONLY), notify=notify)
    while not (responses := eng.take_responses()):
        eng.step()
    return eng, sent, responses[0]


def test_the_context_leader_notifies_the_request_rank_0_named(model_config):
    eng, sent, resp = _context(model_config, notify=(3, 21))
    cpp = resp.result.context_phase_params
    assert sent == [(3, ContextReady(21, 5, cpp.first_gen_tokens, cpp.opaque_state))]
    assert resp.result.metrics.hops["ctx_ready_sent"] <= time.time()
    h = eng.handoff.held[5]
    assert h.claimed_by == (3, 21) and h.direct
    blocks = eng.blocks.block_table(5)
    assert "already claimed" in eng.handoff.claim_context(5, blocks, by=(3, 22))   # a replay
    assert eng.handoff.claim_context(5, blocks, by=(3, 21)) is None   # its own claimant, after a wait
    eng.cancel(5)   # rank 0's cancel: its generation side (cancelled too) releases it, maybe after a pull
    assert 5 in eng.handoff.held
    eng.handoff.release_context(5, by=(3, 22))
    assert 5 in eng.handoff.held
    eng.handoff.release_context(5, by=(3, 21))
    assert not eng.handoff.held and eng.blocks.num_free == eng.blocks.num_blocks


def test_without_notify_nobody_is_told(model_config):
    eng, sent, resp = _context(model_config, notify=None)
    assert sent == [] and eng.handoff.held[5].claimed_by is None
    assert "ctx_ready_sent" not in resp.result.metrics.hops


@pytest.mark.parametrize("ctx, gen, want", [
    ([True], [True], True), ([True, True], [True], True), ([True], [True, False], False),
    ([False], [True], False), ([], [True], False), ([True], [], False),
])
def test_rank_0_parks_generation_phases_only_when_every_executor_takes_part(ctx, gen, want):
    assert direct_handoff(ctx, gen) is want

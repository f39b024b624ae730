"""The generation side of the hand-off (engine/handoff.py) against a scripted transport.

The real flows run under MPI (tests/mpi, tests/gpu); here the claim's answer and the pull's
landing come in whatever order a test needs, which a live job cannot force. In particular an
early pull (CUDA IPC, started with the claim) must never let a request use its blocks before the
claim is granted, nor free blocks a pull still writes into.
"""
from __future__ import annotations

import time

import pytest

from disagg_mpi.api import (
    CacheTransceiverConfig,
    ContextPhaseParams,
    ExecutorConfig,
    KvCacheConfig,
    Request,
    RequestType,
)
from disagg_mpi.engine.llm_engine import LLMEngine
from disagg_mpi.model import load_model
from disagg_mpi.transfer.cache_state import CacheState
from disagg_mpi.transfer.opaque import OpaqueState

KEY = b"k" * 32
CTX_RANK = 7


class ScriptedGroup:
    """The transport: records pulls; the test says when each lands."""

    chains_decode = False
    chain_pending = False

    def __init__(self, early: bool):
        self.early = early
        self.pulls: list[int] = []
        self.in_flight: set[int] = set()
        self.copying: set[int] = set()   # landed for the engine, copy still running (GPU-ordered join)
        self._done: list[tuple[int, int, float]] = []

    def can_pull_unclaimed(self, opaque) -> bool:
        return self.early

    def start_pull(self, req_id, opaque, blocks) -> None:
        self.pulls.append(req_id)
        self.in_flight.add(req_id)

    def land(self, req_id: int, nbytes: int = 4096, settled: bool = True) -> None:
        self.in_flight.discard(req_id)
        if not settled:
            self.copying.add(req_id)
        self._done.append((req_id, nbytes, 0.0))

    def unsettled(self, req_id: int) -> bool:
        return req_id in self.copying

    def poll_transfers(self):
        out, self._done = self._done, []
        return out

    def pull_in_flight(self, req_id: int) -> bool:
        return req_id in self.in_flight

    def run_step(self, plan):
        raise AssertionError("no step in these tests")


@pytest.fixture(scope="module")
def model_config():
    return load_model("random:tiny", seed=1).config


def _engine(model_config, early):
    cfg = ExecutorConfig(max_batch_size=4, max_num_tokens=64,
                         kv_cache_config=KvCacheConfig(block_size=4, num_blocks=32),
                         cache_transceiver_config=CacheTransceiverConfig(enable_cache_transceiver=True))
    mc = model_config
    cs = CacheState.create(mc.num_layers, mc.num_kv_heads, mc.head_dim, 4, "float32")
    sent = []
    group = ScriptedGroup(early)
    eng = LLMEngine(group, mc, cfg, cs, executor_id=1, world_ranks=(2,), key=KEY,
                    send_peer=lambda dest, msg: sent.append((dest, msg)))
    return eng, group, sent, cs


def _gen_request(cs, ctx_req_id=11, prompt=(5, 6, 7, 8, 9, 10), keep_until=0.0, digest=b""):
    opaque = OpaqueState(0, (CTX_RANK,), ctx_req_id, (3, 4), len(prompt), cs, keep_until, digest, (42,))
    cpp = ContextPhaseParams(ctx_req_id, [42], opaque.encode(KEY))
    return Request(list(prompt), max_tokens=5, request_type=RequestType.REQUEST_TYPE_GENERATION_ONLY,
                   context_phase_params=cpp, ignore_eos=True)


def _ops(sent):
    return [type(m).__name__.lower() for _, m in sent]   # protocol records: Claim, Release


def test_early_pull_that_lands_first_waits_for_the_grant(model_config):
    eng, group, sent, cs = _engine(model_config, early=True)
    eng.add_request(1, _gen_request(cs))
    eng.housekeeping()
    assert _ops(sent) == ["claim"] and group.pulls == [1]   # the pull went with the claim
    group.land(1)
    eng.housekeeping()
    assert not eng.scheduler.ready and _ops(sent) == ["claim"]   # in, but not granted: not used
    time.sleep(0.02)
    eng.handoff.on_claim_reply(1, None, time.time() - 0.01)   # answered 10 ms ago by the context leader's clock
    assert [s.req_id for s in eng.scheduler.ready] == [1]
    assert _ops(sent) == ["claim", "release"]
    m = eng._meta[1].metrics
    assert 0 <= m.kv_claim_ms <= m.kv_transfer_ms and m.kv_transfer_bytes == 4096
    assert 5 <= m.kv_claim_answer_ms <= m.kv_claim_ms - 5   # the claim's wait, split at the answer


def test_early_pull_still_running_at_the_grant_finishes_as_a_normal_pull(model_config):
    eng, group, sent, cs = _engine(model_config, early=True)
    eng.add_request(1, _gen_request(cs))
    eng.housekeeping()
    eng.handoff.on_claim_reply(1, None)
    assert not eng.scheduler.ready and group.pulls == [1]   # not pulled twice
    group.land(1)
    eng.housekeeping()
    assert [s.req_id for s in eng.scheduler.ready] == [1] and _ops(sent) == ["claim", "release"]


def test_refused_claim_keeps_the_blocks_until_the_early_pull_lands(model_config):
    eng, group, sent, cs = _engine(model_config, early=True)
    free = eng.blocks.num_free
    eng.add_request(1, _gen_request(cs))
    eng.housekeeping()
    eng.handoff.on_claim_reply(1, "context request 11 was already claimed (replayed context_phase_params)")
    [resp] = eng.take_responses()
    assert resp.error_msg and "already claimed" in resp.error_msg
    assert eng.blocks.num_free < free   # the pull still writes into them
    group.land(1)
    eng.housekeeping()
    assert eng.blocks.num_free == free and not eng.scheduler.ready
    assert _ops(sent) == ["claim"]   # never released: the context is not ours


def test_cancel_during_an_early_pull_frees_only_after_it_lands(model_config):
    eng, group, sent, cs = _engine(model_config, early=True)
    free = eng.blocks.num_free
    eng.add_request(1, _gen_request(cs))
    eng.housekeeping()
    eng.cancel(1)
    assert eng.blocks.num_free < free and not eng.take_responses()
    eng.handoff.on_claim_reply(1, None)
    group.land(1)
    eng.housekeeping()
    [resp] = eng.take_responses()
    assert resp.result.finish_reason == "cancelled" and eng.blocks.num_free == free
    assert _ops(sent) == ["claim", "release"] and not eng.scheduler.ready


def test_without_early_pulls_the_pull_waits_for_the_grant(model_config):
    eng, group, sent, cs = _engine(model_config, early=False)
    eng.add_request(1, _gen_request(cs))
    eng.housekeeping()
    assert _ops(sent) == ["claim"] and group.pulls == []
    eng.handoff.on_claim_reply(1, None)
    assert group.pulls == [1]
    group.land(1)
    eng.housekeeping()
    assert [s.req_id for s in eng.scheduler.ready] == [1]


# ---- using a pull before the claim's answer (keep_until) -----------------------------------


def test_early_pull_landed_before_keep_until_is_used_before_the_answer(model_config):
    eng, group, sent, cs = _engine(model_config, early=True)
    eng.add_request(1, _gen_request(cs, keep_until=time.monotonic() + 60))
    eng.housekeeping()
    group.land(1)
    eng.housekeeping()
    assert [s.req_id for s in eng.scheduler.ready] == [1]   # joined with no answer yet
    assert _ops(sent) == ["claim", "release"]   # the release follows the claim (MPI keeps the order)
    assert sent[1][1].gen_req_id == 1   # the context leader heeds it only if request 1 claimed
    m = eng._meta[1].metrics
    assert m.kv_claim_ms is None and m.kv_transfer_bytes == 4096
    eng.handoff.on_claim_reply(1, "context request 11 was already claimed (replayed context_phase_params)")
    assert not eng.take_responses() and [s.req_id for s in eng.scheduler.ready] == [1]   # changes nothing


def test_early_pull_landed_after_keep_until_waits_for_the_answer(model_config):
    eng, group, sent, cs = _engine(model_config, early=True)
    eng.add_request(1, _gen_request(cs, keep_until=time.monotonic() - 1))
    eng.housekeeping()
    group.land(1)
    eng.housekeeping()
    assert not eng.scheduler.ready and _ops(sent) == ["claim"]
    eng.handoff.on_claim_reply(1, "context request 11 is unknown, already served, expired or freed")
    [resp] = eng.take_responses()
    assert "already served" in resp.error_msg and not eng.scheduler.ready


# ---- GPU-ordered joins: the copy is queued, the model's stream waits for it -------------------


def test_a_join_before_the_copy_settles_holds_the_release_until_it_has(model_config):
    eng, group, sent, cs = _engine(model_config, early=False)
    eng.add_request(1, _gen_request(cs))
    eng.housekeeping()
    eng.handoff.on_claim_reply(1, None)
    group.land(1, settled=False)
    eng.housekeeping()
    assert [s.req_id for s in eng.scheduler.ready] == [1]   # joins the next step at once
    assert _ops(sent) == ["claim"]   # the copy may still read the context's blocks: not released
    eng.housekeeping()
    assert _ops(sent) == ["claim"]
    group.copying.discard(1)
    eng.housekeeping()
    assert _ops(sent) == ["claim", "release"] and sent[1][1].gen_req_id == 1


def test_an_unsettled_early_pull_is_used_before_the_answer_only_well_before_keep_until(model_config):
    for settled, used in ((True, True), (False, False)):   # keep_until 50 ms away: enough only once settled
        eng, group, sent, cs = _engine(model_config, early=True)
        eng.add_request(1, _gen_request(cs, keep_until=time.monotonic() + 0.05))
        eng.housekeeping()
        group.land(1, settled=settled)
        eng.housekeeping()
        assert bool(eng.scheduler.ready) == used, settled
    eng.handoff.on_claim_reply(1, None)   # the grant: joins, and the release still waits for the copy
    assert [s.req_id for s in eng.scheduler.ready] == [1] and _ops(sent) == ["claim"]


class ContextGroup(ScriptedGroup):
    """A context executor of one rank on CPU: real steps; `exports_ipc` as the test says."""

    def __init__(self, runner, exports_ipc: bool):
        super().__init__(early=False)
        self.runner, self.exports_ipc = runner, exports_ipc

    def run_step(self, plan):
        return self.runner.execute(plan)


def _context_engine(model_config, exports_ipc: bool, keep_seconds: float):
    from disagg_mpi.engine.model_runner import ModelRunner

    cfg = ExecutorConfig(max_batch_size=4, max_num_tokens=64,
                         kv_cache_config=KvCacheConfig(block_size=4, num_blocks=32),
                         cache_transceiver_config=CacheTransceiverConfig(enable_cache_transceiver=True,
                                                                         keep_seconds=keep_seconds))
    mc = model_config
    cs = CacheState.create(mc.num_layers, mc.num_kv_heads, mc.head_dim, 4, "float32")
    runner = ModelRunner(load_model("random:tiny", seed=1), 32, 4, "cpu")
    eng = LLMEngine(ContextGroup(runner, exports_ipc), mc, cfg, cs, executor_id=0, world_ranks=(CTX_RANK,),
                    key=KEY, send_peer=lambda dest, msg: None)
    eng.add_request(5, Request([5, 6, 7, 8, 9, 10], max_tokens=4,
                               request_type=RequestType.REQUEST_TYPE_CONTEXT_ONLY))
    while not (responses := eng.take_responses()):
        eng.step()
    [resp] = responses
    return eng, OpaqueState.decode(resp.result.context_phase_params.opaque_state, KEY)


def test_context_released_before_keep_until_keeps_its_blocks_until_then(model_config):
    eng, opaque = _context_engine(model_config, exports_ipc=True, keep_seconds=0.2)
    assert opaque.keep_until > time.monotonic()
    held = eng.blocks.num_free
    assert eng.handoff.claim_context(5, list(opaque.block_ids), by=(9, 1)) is None
    eng.handoff.release_context(5, by=(9, 2))   # a refused replay on the same generation executor: not its to free
    assert not eng.handoff.held[5].released
    eng.handoff.release_context(5, by=(9, 1))
    eng.housekeeping()
    assert eng.blocks.num_free == held   # a replayed pull may still be reading them
    assert "already served" in eng.handoff.claim_context(5, list(opaque.block_ids), by=(3, 1))
    time.sleep(max(0.0, opaque.keep_until - time.monotonic()) + 0.01)
    eng.housekeeping()
    assert eng.blocks.num_free == eng.blocks.num_blocks and not eng.handoff.held


def test_context_without_ipc_promises_nothing_and_frees_on_release(model_config):
    eng, opaque = _context_engine(model_config, exports_ipc=False, keep_seconds=0.2)
    assert opaque.keep_until == 0.0
    eng.handoff.release_context(5)
    assert eng.blocks.num_free == eng.blocks.num_blocks and not eng.handoff.held


def test_a_different_prompt_of_the_same_length_is_refused(model_config):
    from disagg_mpi.transfer.opaque import prompt_digest

    eng, group, sent, cs = _engine(model_config, early=True)
    req = _gen_request(cs, digest=prompt_digest([5, 6, 7, 8, 9, 11]))   # the context phase saw ...11
    eng.add_request(1, req)
    [resp] = eng.take_responses()
    assert "prompt differs" in resp.error_msg and group.pulls == []
    assert _ops(sent) == []   # refused before any claim: the context keeps its KV for the genuine request
    eng2, group2, _, _ = _engine(model_config, early=True)
    eng2.add_request(1, _gen_request(cs, digest=prompt_digest([5, 6, 7, 8, 9, 10])))   # the right one
    eng2.housekeeping()
    assert group2.pulls == [1]


def test_keep_promise_only_with_a_generation_rank_on_the_node():
    """A context executor promises keep_until only if a generation rank shares its node (CUDA IPC
    needs one); across nodes released blocks would be held for nothing."""
    from disagg_mpi.config import parse_topology
    from disagg_mpi.runtime.worker import generation_on_node

    tc = {"cache_transceiver_config": {"enable_cache_transceiver": True}}
    topo = parse_topology({"model": {"path": "random:tiny"},
                           "context_executors": [{"participant_ids": [1], **tc}],
                           "generation_executors": [{"participant_ids": [2], **tc}, {"participant_ids": [3], **tc}]})
    assert generation_on_node(topo, ["n0", "n1", "n2", "n1"], 1)        # rank 3 shares node n1
    assert not generation_on_node(topo, ["n0", "n1", "n2", "n2"], 1)    # both generation ranks elsewhere

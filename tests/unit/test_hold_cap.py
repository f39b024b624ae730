"""Contexts held for clients (HTTP context_only) are capped to a share of the pool (engine/hold_cap.py):
the pure decision, then a real context engine on CPU (random:tiny) that refuses past the cap while
requests whose generation phase rank 0 runs itself still get in."""

from __future__ import annotations

import time

import pytest

from disagg_mpi.api import (
    CacheTransceiverConfig,
    ExecutorConfig,
    KvCacheConfig,
    Request,
    RequestError,
    RequestType,
)
from disagg_mpi.engine.hold_cap import CAUSE, HeldContextsFullError, cap_blocks, check_hold, retry_after
from disagg_mpi.engine.llm_engine import LLMEngine
from disagg_mpi.model import load_model
from disagg_mpi.transfer.cache_state import CacheState
from tests.unit.test_handoff import ContextGroup

# ---- the pure decision ---------------------------------------------------------------------------------


def test_cap_blocks_is_the_share_rounded_down():
    assert cap_blocks(256, 0.5) == 128
    assert cap_blocks(10, 0.33) == 3
    assert cap_blocks(10, 1.0) == 10
    assert cap_blocks(3, 0.7) == 2


def test_a_hold_within_the_share_passes():
    check_hold(needed=8, holding=120, num_blocks=256, fraction=0.5, lease_ends_in=[50.0])
    check_hold(needed=128, holding=0, num_blocks=256, fraction=0.5, lease_ends_in=[])


def test_past_the_share_is_refused_with_when_to_retry():
    with pytest.raises(HeldContextsFullError) as info:
        check_hold(needed=69, holding=69, num_blocks=256, fraction=0.5, lease_ends_in=[117.2, 80.1])
    assert info.value.retry_after == 81
    msg = str(info.value)
    assert CAUSE in msg and "max_held_fraction 0.5" in msg and "69 of the 128" in msg


def test_a_prompt_larger_than_the_share_is_a_plain_refusal():
    with pytest.raises(RequestError) as info:
        check_hold(needed=129, holding=0, num_blocks=256, fraction=0.5, lease_ends_in=[])
    assert not isinstance(info.value, HeldContextsFullError)  # retrying would not help: a 400, not a 429
    assert info.value.param == "input_token_ids" and "at most 128" in str(info.value)


@pytest.mark.parametrize("ends, expected", [([], 1), ([0.2], 1), ([-3.0], 1), ([4.01, 9.0], 5), ([120.0], 120)])
def test_retry_after_is_the_soonest_lease_end_in_whole_seconds(ends, expected):
    assert retry_after(ends) == expected


# ---- a real context engine -------------------------------------------------------------------------------

PROMPT = [(3 * i + 5) % 1000 for i in range(23)]  # + its first token: 24 tokens = 6 blocks of 4


@pytest.fixture(scope="module")
def runner_and_config():
    from disagg_mpi.engine.model_runner import ModelRunner

    model = load_model("random:tiny", seed=1)
    return ModelRunner(model, 32, 4, "cpu"), model.config


def _engine(runner_and_config, lease=30.0):
    runner, mc = runner_and_config
    cfg = ExecutorConfig(max_batch_size=8, max_num_tokens=256, kv_cache_config=KvCacheConfig(block_size=4, num_blocks=32),
                         cache_transceiver_config=CacheTransceiverConfig(enable_cache_transceiver=True,
                                                                         lease_seconds=lease, max_held_fraction=0.5))
    cs = CacheState.create(mc.num_layers, mc.num_kv_heads, mc.head_dim, 4, "float32")
    return LLMEngine(ContextGroup(runner, False), mc, cfg, cs, executor_id=0, world_ranks=(7,), key=b"k" * 32,
                     send_peer=lambda dest, msg: None)


def _context(rid, eng, client, prompt=PROMPT):
    eng.add_request(rid, Request(list(prompt), max_tokens=8, ignore_eos=True,
                                 request_type=RequestType.REQUEST_TYPE_CONTEXT_ONLY), client_hold=client)


def _drain(eng):
    out = []
    while eng.busy:
        eng.step()
        out += eng.take_responses()
    return out + eng.take_responses()


def test_client_holds_stop_at_the_share_and_others_still_get_in(runner_and_config):
    eng = _engine(runner_and_config)
    _context(1, eng, client=True)
    _context(2, eng, client=True)  # 12 of 16 blocks, counted while still queued
    _context(3, eng, client=True)
    [refused] = eng.take_responses()
    assert refused.request_id == 3 and refused.retry_after == 1  # no hold yet: the queued ones will be soon
    assert CAUSE in refused.error_msg
    assert {r.request_id for r in _drain(eng)} == {1, 2}
    _context(4, eng, client=True)
    [refused] = eng.take_responses()
    assert 28 <= refused.retry_after <= 30  # the soonest lease (30 s) ends then
    # A context whose generation phase rank 0 runs itself is not capped: it is claimed at once.
    _context(5, eng, client=False)
    [answer] = _drain(eng)
    assert answer.request_id == 5 and answer.result.context_phase_params is not None
    stats = eng.snapshot()
    assert stats["held_client_blocks"] == 12 and stats["held_blocks"] == 18 and stats["oldest_hold_s"] > 0
    eng.handoff.release_context(1)  # the generation phase of 1 came: room for one more
    _context(6, eng, client=True)
    assert {r.request_id for r in _drain(eng)} == {6}


def test_the_share_frees_when_a_lease_ends(runner_and_config):
    eng = _engine(runner_and_config, lease=0.3)
    _context(1, eng, client=True)
    _context(2, eng, client=True)
    _drain(eng)
    _context(3, eng, client=True)
    assert eng.take_responses()[0].retry_after == 1
    time.sleep(0.35)
    eng.housekeeping()  # the leases end: their blocks are free
    assert eng.snapshot()["held_blocks"] == 0
    _context(4, eng, client=True)
    assert {r.request_id for r in _drain(eng)} == {4}


def test_a_prompt_over_the_share_is_refused_without_retry(runner_and_config):
    eng = _engine(runner_and_config)
    _context(1, eng, client=True, prompt=PROMPT * 3)  # 70 tokens: 18 blocks > 16
    [resp] = eng.take_responses()
    assert resp.retry_after is None and resp.error_param == "input_token_ids" and "at most 16" in resp.error_msg

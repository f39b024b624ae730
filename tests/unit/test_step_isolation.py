"""A request that makes a step raise fails alone; the others finish with their own tokens.

Defense in depth behind rank 0's checks (orchestrator/admission.py): here a sequence's state is
corrupted after admission (an output token outside the vocabulary, what an unchecked
`first_gen_tokens` used to become), so the next batched step raises in the embedding.
"""
from __future__ import annotations

import pytest

from disagg_mpi.api import CacheTransceiverConfig, ExecutorConfig, KvCacheConfig, Request, RequestType
from disagg_mpi.engine.executor import Executor
from disagg_mpi.model import load_model

VOCAB = 1024  # random:tiny
PROMPTS = [[5, 17, 300, 42, 7, 99], [11, 12, 13], list(range(20, 45))]


@pytest.fixture(scope="module")
def model():
    return load_model("random:tiny", seed=11)


def make_executor(model, num_blocks=256, transceiver=False):
    return Executor(model, ExecutorConfig(
        max_batch_size=4, max_num_tokens=64, kv_cache_config=KvCacheConfig(block_size=4, num_blocks=num_blocks),
        cache_transceiver_config=CacheTransceiverConfig(enable_cache_transceiver=transceiver)))


def test_a_step_that_raises_fails_only_its_culprit(model):
    reqs = [Request(p, max_tokens=12, ignore_eos=True, streaming=(i == 0)) for i, p in enumerate(PROMPTS)]
    ref = [r.result.output_token_ids for r in make_executor(model).generate(reqs)]
    ex = make_executor(model)
    ids = ex.enqueue_requests(reqs)
    ex._engine.step()  # every prompt prefilled in one step, a first token each
    [poisoned] = [s for s in ex._engine.scheduler.running if s.req_id == ids[1]]
    poisoned.output_ids[-1] = VOCAB + 5  # the next step embeds it: IndexError
    got = {i: [] for i in ids}
    while not all(got[i] and got[i][-1].is_final for i in ids):
        for r in ex.await_responses(timeout=5):
            got[r.request_id].append(r)
    bad = got[ids[1]][-1]
    assert bad.has_error() and "internal error while running the model" in bad.error_msg
    for k in (0, 2):
        final = got[ids[k]][-1]
        assert not final.has_error(), final.error_msg
        tokens = [t for r in got[ids[k]] for t in r.result.output_token_ids]
        assert tokens == ref[k] and final.result.finish_reason == "length"
    ex.check_blocks_free()


def test_a_context_pool_refusal_speaks_of_the_clients_request(model):
    ex = make_executor(model, num_blocks=4, transceiver=True)  # 16 tokens of KV
    [r] = ex.generate([Request(list(range(1, 30)), max_tokens=500,
                               request_type=RequestType.REQUEST_TYPE_CONTEXT_ONLY)])
    assert r.has_error() and r.error_param == "input_token_ids", (r.error_msg, r.error_param)
    assert "request 1 " not in r.error_msg and "max_tokens 1" not in r.error_msg, r.error_msg
    assert "prompt 29 tokens + the first token" in r.error_msg and "pool has 4" in r.error_msg

"""Logprobs (OutputConfig.return_log_probs): the batched math, and the engine against transformers'
log-softmax in fp32 on a small random checkpoint (word_model.py)."""

from __future__ import annotations

import math

import pytest
import torch

from disagg_mpi.api import OutputConfig, Request, SamplingConfig, TokenLogprobs
from disagg_mpi.engine.logprobs import NOT_ASKED, token_logprobs


def test_rows_that_ask_get_log_softmax_and_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    tokens = [3, 7, 11, 0]
    got = token_logprobs(logits, tokens, [2, NOT_ASKED, 0, 5])
    ref = torch.log_softmax(logits.double(), -1)
    assert got[1] is None
    for i, k in ((0, 2), (2, 0), (3, 5)):
        assert got[i].logprob == pytest.approx(ref[i, tokens[i]].item(), abs=1e-5)
        assert len(got[i].top_ids) == len(got[i].top_logprobs) == k
        best = ref[i].topk(k)
        assert list(got[i].top_ids) == best.indices.tolist()
        assert got[i].top_logprobs == pytest.approx(best.values.tolist(), abs=1e-5)
    # probabilities: the top ones are in order and no more than 1 in all
    assert list(got[3].top_logprobs) == sorted(got[3].top_logprobs, reverse=True)
    assert sum(math.exp(v) for v in got[3].top_logprobs) <= 1 + 1e-6


def test_no_row_asks_nothing_computed():
    assert token_logprobs(torch.zeros(3, 8), [0, 1, 2], [NOT_ASKED] * 3) == [None] * 3
    with pytest.raises(ValueError, match="batch size"):
        token_logprobs(torch.zeros(3, 8), [0, 1], [0, 0])


def test_a_row_does_not_depend_on_its_batch():
    torch.manual_seed(1)
    logits = torch.randn(6, 40)
    tokens = list(range(6))
    batch = token_logprobs(logits, tokens, [3] * 6)
    alone = [token_logprobs(logits[i:i + 1], tokens[i:i + 1], [3])[0] for i in range(6)]
    assert batch == alone


def test_token_logprobs_wire_round_trip():
    t = TokenLogprobs(-0.5, (4, 2), (-0.25, -1.5))
    assert TokenLogprobs.from_wire(t.to_wire()) == t
    assert t.top(1) == TokenLogprobs(-0.5, (4,), (-0.25,))


# ---- the engine against transformers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.unit.word_model import write_word_model

    folder = write_word_model(tmp_path_factory.mktemp("words") / "m")
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return folder, hf


def hf_logprobs(hf, prompt: list[int], output: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each output position [len(output), V] (teacher-forced)."""
    ids = torch.tensor([prompt + output])
    with torch.no_grad():
        logits = hf(ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(output) - 1], -1)


def asks(k: int) -> dict:
    return {"output_config": OutputConfig(return_log_probs=True), "num_logprobs": k}


def test_engine_logprobs_match_transformers(checkpoint):
    from disagg_mpi.api import ExecutorConfig
    from disagg_mpi.engine.executor import Executor

    folder, hf = checkpoint
    prompts = [[5, 9, 44, 7], [100, 3, 100, 3, 8, 8, 2], [17]]
    ex = Executor(str(folder), ExecutorConfig())
    # greedy, sampled with penalties and a bias (values stay the model's), and one row that does not ask
    reqs = [Request(prompts[0], 10, ignore_eos=True, **asks(5)),
            Request(prompts[1], 10, SamplingConfig(temperature=1.3, seed=3, frequency_penalty=1.0,
                                                   logit_bias={7: 20.0}), ignore_eos=True, **asks(20)),
            Request(prompts[2], 10, ignore_eos=True, **asks(0)),
            Request(prompts[0], 10, ignore_eos=True)]
    out = [r.result for r in ex.generate(reqs)]
    assert out[3].log_probs is None
    for req, res in zip(reqs[:3], out[:3]):
        ref = hf_logprobs(hf, req.input_token_ids, res.output_token_ids)
        assert len(res.log_probs) == len(res.output_token_ids) == 10
        for pos, (tok, lp) in enumerate(zip(res.output_token_ids, res.log_probs)):
            assert abs(lp.logprob - ref[pos, tok].item()) < 2e-3
            k = req.num_logprobs
            best = ref[pos].topk(k)
            assert len(lp.top_ids) == k
            assert max(abs(a - b) for a, b in zip(lp.top_logprobs, best.values.tolist())) < 2e-3 if k else True
            assert set(lp.top_ids) == set(best.indices.tolist())
    assert out[0].output_token_ids == out[3].output_token_ids  # asking changes nothing else
    # the greedy token is the best alternative
    assert all(lp.top_ids[0] == t for t, lp in zip(out[0].output_token_ids, out[0].log_probs))
    # streamed: the same values, token by token
    s = Request(prompts[0], 10, ignore_eos=True, streaming=True, **asks(5))
    [streamed] = ex.generate([s])
    want = out[0].log_probs  # (alone, not in a batch of 4: the same within float rounding)
    assert [lp.top_ids for lp in streamed.result.log_probs] == [lp.top_ids for lp in want]
    assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(streamed.result.log_probs, want, strict=True))
    ex.shutdown()


def test_engine_refuses_too_many_logprobs(checkpoint):
    from disagg_mpi.api import ExecutorConfig
    from disagg_mpi.engine.executor import Executor

    ex = Executor(str(checkpoint[0]), ExecutorConfig())
    [resp] = ex.generate([Request([5, 9], 3, **asks(21))])
    assert resp.has_error() and "num_logprobs=21" in resp.error_msg and resp.error_param == "num_logprobs"
    ex.shutdown()


# ---- the hand-off: the first token's logprobs travel signed --------------------------------------------


def test_first_logprobs_travel_signed_and_are_cut_to_the_request():
    from disagg_mpi.api import RequestError
    from disagg_mpi.engine.handoff_check import first_logprobs
    from disagg_mpi.transfer.cache_state import CacheState
    from disagg_mpi.transfer.opaque import OpaqueState, OpaqueStateError

    key = b"k" * 32
    first = TokenLogprobs(-0.75, (9, 4, 1), (-0.5, -0.75, -3.0))
    s = OpaqueState(0, (1,), 7, (3,), 4, CacheState.create(2, 2, 16, 4, "float32"), first_tokens=(4,),
                    first_logprobs=(first,))
    back = OpaqueState.decode(s.encode(key), key)
    assert back == s and back.first_logprobs == (first,)
    assert first_logprobs(2, back) == [first.top(2)]
    assert first_logprobs(NOT_ASKED, back) == []
    with pytest.raises(RequestError, match="num_logprobs=5") as info:  # more than the context computed
        first_logprobs(5, back)
    assert info.value.param == "num_logprobs"
    blob = bytearray(s.encode(key))  # the values are signed: altering one is refused
    at = bytes(blob).find(b"\xcb")  # (the first float64 in the payload)
    blob[at + 3] ^= 1
    with pytest.raises(OpaqueStateError):
        OpaqueState.decode(bytes(blob), key)


# ---- the prompt's logprobs (Request.num_prompt_logprobs) ----------------------------------------------


def test_prompt_logprobs_in_slices_equal_one_pass():
    from disagg_mpi.engine.logprobs import prompt_logprobs

    torch.manual_seed(2)
    hidden, head = torch.randn(9, 6), torch.randn(6, 30)
    rows, targets, ks = [0, 2, 3, 4, 7], [5, 1, 29, 0, 3], [2, 2, 0, 4, 1]
    whole = prompt_logprobs(lambda h: h @ head, hidden, rows, targets, ks, slice_rows=100)
    sliced = prompt_logprobs(lambda h: h @ head, hidden, rows, targets, ks, slice_rows=2)
    assert [x.top_ids for x in sliced] == [x.top_ids for x in whole]  # (a matmul's rounding depends on its rows)
    assert [x.logprob for x in sliced] == pytest.approx([x.logprob for x in whole], abs=1e-5)
    ref = torch.log_softmax(hidden @ head, -1)
    for lp, r, t, k in zip(whole, rows, targets, ks):
        assert lp.logprob == pytest.approx(ref[r, t].item(), abs=1e-5) and len(lp.top_ids) == k


def test_prompt_rows_of_chunks_score_the_next_prompt_token():
    from disagg_mpi.engine.logprobs import prompt_rows
    from disagg_mpi.engine.sequence import Sequence

    a, b, c = Sequence(1, [10, 11, 12, 13, 14], 4), Sequence(2, [20, 21, 22], 4), Sequence(3, [30, 31], 4)
    a.num_prompt_logprobs, c.num_prompt_logprobs = 2, 0
    a.num_computed_tokens = 3  # a's second chunk: positions 3, 4 (4 is the last: its logits sample)
    rows, targets, ks, owners = prompt_rows([(a, 2), (b, 3), (c, 1)], [0, 2, 5])
    assert (rows, targets, ks) == ([0, 5], [14, 31], [2, 0]) and owners == [a, c]
    c.num_computed_tokens = 1  # c's last position: nothing more to score
    assert prompt_rows([(c, 1)], [0]) == ([], [], [], [])


def hf_prompt_logprobs(hf, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at every prompt position but the last [len(prompt) - 1, V]."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = hf(ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    return torch.log_softmax(logits[:-1], -1)


def check_prompt_logprobs(hf, prompt: list[int], got, k: int) -> None:
    ref = hf_prompt_logprobs(hf, prompt)
    assert len(got) == len(prompt) and got[0] is None
    for p in range(1, len(prompt)):
        lp, best = got[p], ref[p - 1].topk(k)
        assert abs(lp.logprob - ref[p - 1, prompt[p]].item()) < 2e-3, p
        assert len(lp.top_ids) == k and set(lp.top_ids) == set(best.indices.tolist())
        assert all(abs(a - b) < 2e-3 for a, b in zip(lp.top_logprobs, best.values.tolist()))


PROMPT_40 = [(7 * i + 3) % 500 for i in range(40)]


@pytest.mark.parametrize("reuse", [False, True])
def test_engine_prompt_logprobs_match_transformers_chunked(checkpoint, reuse):
    """A 40-token prompt prefilled in chunks (max_num_tokens 16) beside requests that do not ask and a
    one-token prompt; with prefix reuse on, a prompt whose prefix is cached is still scored in full."""
    from disagg_mpi.api import ExecutorConfig, KvCacheConfig
    from disagg_mpi.engine.executor import Executor

    folder, hf = checkpoint
    ex = Executor(str(folder), ExecutorConfig(max_batch_size=4, max_num_tokens=16,
                                              kv_cache_config=KvCacheConfig(enable_prefix_reuse=reuse)))
    if reuse:
        ex.generate([Request(PROMPT_40, 2, ignore_eos=True)])  # caches its full blocks
    reqs = [Request(PROMPT_40, 4, ignore_eos=True, num_prompt_logprobs=3, **asks(2)),
            Request(PROMPT_40[:9], 4, ignore_eos=True),
            Request([17], 3, ignore_eos=True, num_prompt_logprobs=2),
            Request(PROMPT_40, 4, ignore_eos=True)]
    out = [r.result for r in ex.generate(reqs)]
    check_prompt_logprobs(hf, PROMPT_40, out[0].prompt_log_probs, 3)
    assert out[1].prompt_log_probs is None and out[3].prompt_log_probs is None
    assert out[2].prompt_log_probs == [None]
    assert out[0].output_token_ids == out[3].output_token_ids  # asking changes nothing else
    # the first output token's logprob continues the prompt's (the same logits pass, the last position)
    ref = hf_logprobs(hf, PROMPT_40, out[0].output_token_ids)
    assert abs(out[0].log_probs[0].logprob - ref[0, out[0].output_token_ids[0]].item()) < 2e-3
    # streamed: the first response carries them, once
    s = Request(PROMPT_40[:20], 5, ignore_eos=True, streaming=True, num_prompt_logprobs=1)
    rid = ex.enqueue_request(s)
    got = []
    while not got or not got[-1].is_final:
        got += ex.await_responses(rid)
    assert [r.result.prompt_log_probs is not None for r in got] == [True] + [False] * (len(got) - 1)
    check_prompt_logprobs(hf, PROMPT_40[:20], got[0].result.prompt_log_probs, 1)
    ex.shutdown()


def test_engine_refuses_bad_prompt_logprobs(checkpoint):
    from disagg_mpi.api import ExecutorConfig
    from disagg_mpi.engine.executor import Executor

    ex = Executor(str(checkpoint[0]), ExecutorConfig())
    [resp] = ex.generate([Request([5, 9], 3, num_prompt_logprobs=21)])
    assert resp.has_error() and "num_prompt_logprobs=21" in resp.error_msg
    assert resp.error_param == "num_prompt_logprobs"
    ex.shutdown()


def test_prompt_logprobs_wire_round_trip():
    from disagg_mpi.api import Response, Result

    r = Response(3, Result([4], True, "length", prompt_log_probs=[None, TokenLogprobs(-1.5, (2,), (-0.5,))]))
    back = Response.from_dict(r.to_dict())
    assert back.result.prompt_log_probs == r.result.prompt_log_probs
    req = Request([1, 2], 3, num_prompt_logprobs=4)
    assert Request.from_dict(req.to_dict()).num_prompt_logprobs == 4
    assert "prompt_log_probs" not in Response(3, Result([4], True)).to_dict()["result"]  # not asked: nothing

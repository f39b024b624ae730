"""The in-process Executor on the real SmolLM2-135M (fp32, CPU) vs transformers greedy.

The reference tokens come from tests/oracle.py (cached on disk after the first run).
Tokenizer round trips and the chat template against transformers are covered in
test_tokenizer.py; here only the oracle prompts' ids are checked against AutoTokenizer.
"""
import pytest

from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request
from disagg_mpi.engine.executor import Executor
from disagg_mpi.model import load_model, load_tokenizer
from disagg_mpi.model.registry import default_model_path
from tests.oracle import ORACLE_PROMPTS, oracle_prompt_ids, smollm2_oracle

pytestmark = pytest.mark.oracle
NEW = 24


@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("transformers")
    return smollm2_oracle(NEW)


@pytest.fixture(scope="module")
def model():
    return load_model("smollm2")


def executor(model, max_batch_size=8, max_num_tokens=64):
    cfg = ExecutorConfig(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                         kv_cache_config=KvCacheConfig(block_size=16, num_blocks=128))
    return Executor(model, cfg)


def request(ids):
    return Request(list(ids), max_tokens=NEW, ignore_eos=True)


def test_oracle_prompts_shape(oracle):
    prompts, expected = oracle
    assert len(prompts) == len(expected) == 8
    assert max(len(p) for p in prompts) > 64  # some prompts prefill in several chunks
    assert all(len(e) == NEW for e in expected)
    eos = load_tokenizer("smollm2").eos_token_ids
    assert any(t in eos for e in expected for t in e[:-1])  # EOS mid-answer: ignore_eos matters


def test_one_at_a_time(model, oracle):
    prompts, expected = oracle
    ex = executor(model)
    tok = load_tokenizer("smollm2")
    for p, e in zip(prompts, expected):
        [r] = ex.generate([request(p)])
        assert not r.has_error(), r.error_msg
        assert r.result.output_token_ids == e, (tok.decode(r.result.output_token_ids), tok.decode(e))
        assert r.result.finish_reason == "length"
    ex.check_blocks_free()


@pytest.mark.parametrize("batched_decodes", [False, True], ids=["decodes-alone", "decodes-batched"])
def test_inflight_batch_staggered(model, oracle, monkeypatch, batched_decodes):
    """All 8 in one in-flight batch, arriving in three waves, chunked prefill (64 tokens/step).
    The later waves prefill while the earlier ones decode: with `batched_decodes` those decodes
    are attended in one padded call, as on CUDA (attention.BATCH_DECODES)."""
    from disagg_mpi.model import attention

    monkeypatch.setitem(attention.BATCH_DECODES, "cpu", batched_decodes)
    calls = []
    real = attention.DecodeRows.attend
    monkeypatch.setattr(attention.DecodeRows, "attend", lambda self, *a: calls.append(1) or real(self, *a))
    prompts, expected = oracle
    ex = executor(model, max_batch_size=8, max_num_tokens=64)
    waves = [[7, 0, 2], [4, 3], [1, 5, 6]]  # the 119-token prompt first: it prefills in 2 chunks
    ids: dict[int, int] = {}
    finals = {}
    for w, wave in enumerate(waves):
        for i in wave:
            ids[ex.enqueue_request(request(prompts[i]))] = i
        if w < len(waves) - 1:
            for _ in range(3):  # a few steps before the next wave arrives
                ex._engine.step()
                for r in ex.await_responses(timeout=0):
                    finals[r.request_id] = r
    assert ex.get_latest_iteration_stats()["num_running"] == 5
    while len(finals) < len(ids):
        for r in ex.await_responses():
            assert r.is_final
            finals[r.request_id] = r
    for rid, i in ids.items():
        assert not finals[rid].has_error(), finals[rid].error_msg
        assert finals[rid].result.output_token_ids == expected[i], f"prompt {i}"
    ex.check_blocks_free()
    assert bool(calls) == batched_decodes   # the batched path really ran (or really did not)


def test_oracle_prompt_ids_match_transformers_tokenizer():
    transformers = pytest.importorskip("transformers")
    path = default_model_path("smollm2")
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = oracle_prompt_ids(load_tokenizer(str(path)))
    for p, got in zip(ORACLE_PROMPTS, ours):
        if isinstance(p, list):
            text = hf.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        else:
            text = p
        assert got == hf.encode(text, add_special_tokens=False)

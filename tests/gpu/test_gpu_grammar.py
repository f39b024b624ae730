"""Guided decoding's masks on the GPU: the packed words go up and are unpacked there
(grammar_masks.py), with the same result as the host unpack."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from disagg_mpi.engine.grammar_masks import apply_masks
from tests.unit.test_grammar import _bits


def test_masks_applied_on_the_gpu_equal_the_host_path():
    vocab = 128_256   # not a multiple of 32 words' worth of padding: the tail bits must be cut
    allowed = [[0, 31, 32, 4_000, vocab - 1], [5], list(range(0, vocab, 97))]
    masks = _bits(allowed, vocab)
    logits = torch.randn(4, vocab)
    host = apply_masks(logits, [3, 0, 1], masks)
    gpu = apply_masks(logits.cuda(), [3, 0, 1], masks).cpu()
    assert torch.equal(host, gpu)
    assert torch.isfinite(gpu[3]).nonzero().flatten().tolist() == allowed[0]
    assert torch.equal(gpu[2], logits[2])


def test_guided_greedy_decode_runs_ahead_of_the_host_with_the_same_tokens(monkeypatch):
    """Greedy guided rows chain the next decode step behind the masked argmax on the device
    (model_runner.py), their masks filled on the host while it runs: the tokens are those of the
    steps run one at a time, every one inside the grammar."""
    import json

    from disagg_mpi.api import ExecutorConfig, GuidedDecodingParams, Request, SamplingConfig
    from disagg_mpi.engine.executor import Executor
    from disagg_mpi.engine.grammar import Grammars
    from disagg_mpi.model.tokenizer import Tokenizer
    from tests.unit.test_grammar import SCHEMA

    params = GuidedDecodingParams("json_schema", json.dumps(SCHEMA))
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [40, 41]]

    def run(overlap: bool):
        monkeypatch.setenv("DISAGG_OVERLAP_DECODE", "1" if overlap else "0")
        ex = Executor("random:tiny", ExecutorConfig(dtype="float32", device="cuda", max_batch_size=4))
        assert ex._runner.chains_decode == overlap
        resps = ex.generate([Request(p, 32, SamplingConfig(temperature=0.0), ignore_eos=False,
                                     guided_decoding=params) for p in prompts])
        assert all(r.error_msg is None for r in resps), [r.error_msg for r in resps]
        return [r.result.output_token_ids for r in resps], ex._runner.overlap_stats, ex.model.config.vocab_size

    alone, stats, vocab = run(False)
    ahead, stats_ahead, _ = run(True)
    assert stats["launched"] == 0
    assert stats_ahead["used"] >= 8, stats_ahead   # (the old code ran no guided step ahead)
    assert ahead == alone
    for out in ahead:
        Grammars(lambda: Tokenizer.bytes_only(vocab), vocab).state(params).follow(out)  # raises if outside

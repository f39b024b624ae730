"""Penalties, logit_bias, min_tokens and min_p (engine/penalties.py, engine/sampler.py): the math
against independent references (transformers' own processor for repetition), and the engine's
greedy output against a decode loop over transformers' fp32 logits of the same checkpoint."""

from __future__ import annotations

import pytest
import torch

from disagg_mpi.engine.penalties import adjust_logits
from disagg_mpi.engine.sampler import sample
from disagg_mpi.engine.sequence import SamplingParams

V = 40


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def openai_reference(row: list[float], output: list[int], frequency: float, presence: float) -> list[float]:
    """OpenAI's formula written out token by token."""
    out = list(row)
    for t in set(output):
        out[t] -= output.count(t) * frequency + presence
    return out


def test_frequency_and_presence_follow_openai():
    logits = logits_rows(1)
    prompt, output = [3, 3, 9], [5, 5, 5, 7, 3]
    p = SamplingParams(temperature=0.0, frequency_penalty=0.7, presence_penalty=-0.4)
    got = adjust_logits(logits, [p], [len(output)], [prompt + output])[0]
    want = openai_reference(logits[0].tolist(), output, 0.7, -0.4)  # the prompt's 3s and 9 do not count
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert torch.equal(logits, logits_rows(1))  # the input is not modified


def test_repetition_matches_transformers_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = logits_rows(2, seed=1)
    histories = [[1, 2, 2, 30, 39], [0, 7]]
    for penalty in (1.3, 0.6):
        p = SamplingParams(temperature=0.0, repetition_penalty=penalty)
        got = adjust_logits(logits, [p, p], [2, 1], histories)
        for i, h in enumerate(histories):
            want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([h]), logits[i:i + 1].clone())
            assert torch.allclose(got[i], want[0], atol=1e-6)


def test_logit_bias_bans_and_forces():
    logits = logits_rows(3, seed=2)
    top = logits.argmax(-1).tolist()
    ban = SamplingParams(temperature=0.0, logit_bias=((top[0], -100.0),))
    force = SamplingParams(temperature=0.0, logit_bias=((11, 100.0),))
    plain = SamplingParams(temperature=0.0)
    got = sample(logits, [ban, force, plain], [(0, 0)] * 3)
    assert got[0] != top[0] and got[1] == 11 and got[2] == top[2]
    hot = SamplingParams(temperature=1.0, seed=1, logit_bias=((11, 100.0),))
    assert sample(logits, [hot] * 3, [(s, 0) for s in range(3)]) == [11, 11, 11]


def test_min_tokens_masks_eos_until_reached():
    logits = torch.zeros(1, V)
    logits[0, 2] = 10.0  # EOS would win
    p = SamplingParams(temperature=0.0, min_tokens=3, min_tokens_mask=(2, 5))
    assert sample(logits, [p], [(0, 2)]) != [2]  # position 2 < 3: masked
    assert sample(logits, [p], [(0, 3)]) == [2]  # from the third output token on: allowed


def test_min_p_drops_unlikely_tokens():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0] + [-9.0] * (V - 4)] * 500)
    p = SamplingParams(temperature=1.0, min_p=0.2)  # p(1)/p(0) = e^-1 = 0.37 kept; p(2)/p(0) = e^-5 dropped
    got = set(sample(logits, [p] * 500, [(s, 0) for s in range(500)]))
    assert got == {0, 1}


def test_a_row_does_not_depend_on_its_batch():
    logits = logits_rows(4, seed=3)
    pen = SamplingParams(temperature=0.8, top_k=20, seed=5, frequency_penalty=1.0, presence_penalty=0.5,
                         repetition_penalty=1.2, logit_bias=((4, 3.0),))
    plain = SamplingParams(temperature=0.8, seed=5)
    keys = [(5, 3), (6, 2), (7, 3), (8, 0)]
    hist = [[1, 4, 4, 9, 4, 4], None, [2, 2, 3, 3, 1, 8], None]
    batch = sample(logits, [pen, plain, pen, plain], keys, hist)
    alone = [sample(logits[i:i + 1], [p], keys[i:i + 1], hist[i:i + 1])[0]
             for i, p in enumerate([pen, plain, pen, plain])]
    assert batch == alone


def test_params_cross_the_wire_and_refuse_bad_values():
    p = SamplingParams(temperature=0.5, seed=3, min_p=0.1, presence_penalty=1.0, frequency_penalty=-1.0,
                       repetition_penalty=1.1, logit_bias=((5, -3.0),), min_tokens=2, min_tokens_mask=(1,))
    import msgpack

    assert SamplingParams.from_wire(msgpack.unpackb(msgpack.packb(p.to_wire()))) == p
    assert not p.plain_greedy and SamplingParams(temperature=0.0).plain_greedy
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0},
                {"logit_bias": ((1, 101.0),)}, {"min_p": 1.5}, {"min_tokens": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


# ---- the engine against transformers' logits -----------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.unit.word_model import write_word_model

    folder = write_word_model(tmp_path_factory.mktemp("words") / "m")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return folder, hf


def hf_greedy(hf, prompt: list[int], n: int, frequency=0.0, presence=0.0, bias=None) -> list[int]:
    """Greedy decoding over transformers' logits with OpenAI's penalties applied by hand."""
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            row = hf(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1]
        row = row.tolist()
        for t, b in (bias or {}).items():
            row[t] += b
        row = openai_reference(row, out, frequency, presence)
        tok = max(range(len(row)), key=row.__getitem__)
        ids.append(tok)
        out.append(tok)
    return out


def test_engine_penalties_match_transformers(checkpoint):
    from disagg_mpi.api import ExecutorConfig, Request, SamplingConfig
    from disagg_mpi.engine.executor import Executor

    folder, hf = checkpoint
    prompts = [[5, 9, 5, 9, 5, 9, 44], [100, 3, 100, 3]]
    n = 14
    ex = Executor(str(folder), ExecutorConfig())
    # Negative penalties: this model seldom repeats a token by itself, so reward repeats instead
    cases = [SamplingConfig(frequency_penalty=-1.5), SamplingConfig(presence_penalty=-2.0),
             SamplingConfig(frequency_penalty=0.8, presence_penalty=-1.6, logit_bias={7: 5.0, 9: -100})]
    reqs = [Request(p, n, c, ignore_eos=True) for c in cases for p in prompts]
    rep = [Request(p, n, SamplingConfig(repetition_penalty=0.5), ignore_eos=True) for p in prompts]
    got = [r.result.output_token_ids for r in ex.generate(reqs + rep)]
    want = [hf_greedy(hf, p, n, c.frequency_penalty, c.presence_penalty, c.logit_bias) for c in cases for p in prompts]
    for p in prompts:
        x = torch.tensor([p])
        y = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                        repetition_penalty=0.5, pad_token_id=0)
        want.append(y[0, len(p):].tolist())
    assert got == want
    plain = [r.result.output_token_ids for r in ex.generate([Request(p, n, ignore_eos=True) for p in prompts])]
    changed = [g != q for g, q in zip(got, plain * 4)]
    assert all(changed), changed  # each penalty changed the output
    ex.shutdown()

"""What the `openai` SDK tests share: the prompts, the served model's name, and small helpers.

The servers (conftest.py) serve word_model.py's small random Llama, whose tokens are words, so its
output is text; greedy unless seeded. `MODEL` is set by the `folder` fixture.
"""

from __future__ import annotations

import pytest

from tests.unit.serve_server import KEY

PROMPTS = [[(5 * i + 17 * j + 3) % 500 for j in range(3 + 4 * i)] for i in range(6)]
LONG = {"max_tokens": 30, "extra_body": {"ignore_eos": True}}
MODEL = ""  # the model folder: the served model's name (set by the `folder` fixture)


def client_for(srv):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ids_of(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


def complete(client, prompt, **kw):
    args = {**LONG, **kw}
    return client.completions.create(model=MODEL, prompt=prompt, **args)


def by_index(choices):
    return sorted(choices, key=lambda ch: ch.index)


def stop_case(reference, skip: int = 0):
    """(prompt index, stop string): the end of one word, the space and the start of the next (so the
    stop spans two tokens), at its first place in the text, after some words."""
    for i, (text, _) in enumerate(reference[skip:], skip):
        for space in range(12, len(text) - 3):
            s = text[space - 1: space + 3]
            if text[space] == " " and text.find(s) == space - 1:
                return i, s
    pytest.fail(f"no stop string in the reference outputs: {reference}")


def close(a, b, tol=1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def check_offsets(c) -> None:
    """The token strings add up to the text, each at its text_offset."""
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text
    assert all(c.text[o:o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens))

"""Guided decoding (a JSON schema) through pipeline-parallel executors, disaggregated: the leader fills
the masks and the plan carries them to the last PP stage, which samples; the context executor masks
the first token and the generation executor's matcher replays it. Equal to one aggregated executor in
process, and every output follows the schema (random:tiny's tokens are bytes).

Job sizes used here: world(5)
"""

from __future__ import annotations

import json

import pytest

from disagg_mpi import Request
from disagg_mpi.api import GuidedDecodingParams, SamplingConfig
from tests.mpi.helpers import disaggregated_vs_in_process, tiny_prompts

pytestmark = pytest.mark.mpi(min_size=2)

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
          "required": ["ok", "n"], "additionalProperties": False}
GUIDES = [GuidedDecodingParams("json_schema", json.dumps(SCHEMA)), GuidedDecodingParams("json"), None]


def _requests() -> list[Request]:
    return [Request(p, max_tokens=10, sampling_config=SamplingConfig(temperature=1.0, seed=5 + i),
                    guided_decoding=g) for i, p in enumerate(tiny_prompts(3)) for g in GUIDES]


@pytest.mark.world(5)
def test_guided_through_pp2_disaggregated_equal_aggregated_in_process():
    run = disaggregated_vs_in_process(_requests)
    if run is None:
        return
    outs, wants, ex = run
    got = [o.result.output_token_ids for o in outs]
    assert got == [r.result.output_token_ids for r in wants]
    from disagg_mpi.engine.grammar import Grammars
    from disagg_mpi.model.tokenizer import load_tokenizer

    grammars = Grammars(lambda: load_tokenizer("random:tiny"), ex.model.config.vocab_size)
    for out, r in zip(got, _requests()):
        if r.guided_decoding is not None:
            grammars.state(r.guided_decoding).follow(out)  # raises if a token left the grammar
    text = bytes(t - 3 for t in got[0] if 3 <= t < 259)
    assert text.startswith(b'{"ok": '), text

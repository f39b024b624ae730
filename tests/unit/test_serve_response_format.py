"""response_format (JSON object, JSON schema) through the official `openai` SDK against `disagg-mpi
serve` with the real SmolLM2-135M-Instruct: an aggregated server (mpiexec -n 2) and a 1 context + 1
generation server (mpiexec -n 3), which must answer token for token alike (greedy). The first token is
masked on the context executor, the rest on the generation executor, whose matcher replays it.

Skipped when the model is not in the cache; max_tokens stays small so the servers answer in seconds.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from tests.unit.serve_server import AGG_TOPOLOGY, KEY, TOPOLOGY, launch


def _smollm2_cached() -> bool:
    from disagg_mpi.model.registry import DEFAULTS, cache_dir

    return (cache_dir() / Path(DEFAULTS["smollm2"]["member"]).name).is_file()


pytestmark = pytest.mark.skipif(not _smollm2_cached(), reason="SmolLM2 is not in the model cache")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}},
          "required": ["name", "age", "city"], "additionalProperties": False}
PERSON = [{"role": "user", "content": "Describe Alice, who is 30 years old and lives in Paris, as JSON."}]
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MAX_TOKENS = 40


def _topology(t: str) -> str:
    return t.replace('"random:tiny"', '"smollm2"')


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("response_format")


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def agg(workdir):
    with launch(workdir, "agg", _topology(AGG_TOPOLOGY), 2) as srv:
        yield _client(srv)


@pytest.fixture(scope="module")
def disagg(workdir, agg):  # after agg: one server starts at a time on a 2-core machine
    with launch(workdir, "disagg", _topology(TOPOLOGY), 3) as srv:
        yield _client(srv)


def chat(client, messages, response_format):
    return client.chat.completions.create(model="smollm2", messages=messages, max_tokens=MAX_TOKENS,
                                          temperature=0, response_format=response_format)


@pytest.fixture(scope="module")
def answers(agg, disagg):
    """{(mode, case): choice} for the JSON-schema and JSON-object requests on both servers."""
    cases = {"schema": (PERSON, SCHEMA_FORMAT), "object": (CAPITAL, {"type": "json_object"}),
             "plain": (PERSON, None)}
    return {(mode, case): chat(client, msgs, rf).choices[0] for mode, client in (("agg", agg), ("disagg", disagg))
            for case, (msgs, rf) in cases.items() if rf is not None or mode == "agg"}


@pytest.mark.parametrize("mode", ["agg", "disagg"])
def test_json_schema_output_validates(answers, mode):
    choice = answers[(mode, "schema")]
    assert choice.finish_reason == "stop", choice
    data = json.loads(choice.message.content)
    jsonschema.validate(data, SCHEMA)
    # Without the grammar the same greedy request gives JSON of another shape ({"type": "json", "data": ...})
    with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
        jsonschema.validate(json.loads(answers[("agg", "plain")].message.content), SCHEMA)


@pytest.mark.parametrize("mode", ["agg", "disagg"])
def test_json_object_output_parses(answers, mode):
    choice = answers[(mode, "object")]
    assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize("case", ["schema", "object"])
def test_aggregated_equals_disaggregated_token_for_token(answers, case):
    agg, dis = answers[("agg", case)], answers[("disagg", case)]
    assert agg.model_extra["token_ids"] == dis.model_extra["token_ids"]
    assert agg.message.content == dis.message.content


def test_an_invalid_schema_is_a_400_naming_response_format(agg):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    with pytest.raises(openai.BadRequestError) as err:
        chat(agg, PERSON, bad)
    assert err.value.body["param"] == "response_format", err.value.body
    assert "nonsense" in err.value.body["message"]


def test_two_phase_client_flow_continues_the_grammar_and_refuses_another(disagg, answers):
    """A client running both phases itself: the context_only answer's first token obeys the schema; a
    generation_only request with the same response_format ends as the one-call answer did, one
    without response_format is refused (the grammar is bound into the signed hand-off)."""
    def call(params, rf):
        extra = {"disaggregated_params": params}
        return disagg.chat.completions.create(model="smollm2", messages=PERSON, max_tokens=MAX_TOKENS,
                                              temperature=0, extra_body=extra,
                                              **({"response_format": rf} if rf else {}))

    ctx = call({"request_type": "context_only"}, SCHEMA_FORMAT)
    dp = ctx.model_extra["disaggregated_params"]
    gen = {"request_type": "generation_only", "first_gen_tokens": dp["first_gen_tokens"],
           "ctx_request_id": dp["ctx_request_id"], "opaque_state": dp["opaque_state"]}
    base64.b64decode(dp["opaque_state"])
    with pytest.raises(openai.BadRequestError) as err:
        call(gen, None)
    assert err.value.body["param"] == "response_format", err.value.body
    done = call(gen, SCHEMA_FORMAT).choices[0]
    assert done.model_extra["token_ids"] == answers[("agg", "schema")].model_extra["token_ids"]
    jsonschema.validate(json.loads(done.message.content), SCHEMA)

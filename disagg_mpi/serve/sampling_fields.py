"""The sampling extras of an OpenAI body: penalties, logit_bias, min_tokens, min_p, stop strings,
logprobs, response_format.

Pure functions used by `protocol.py`; each refusal is a 400 naming its field.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..api import MAX_LOGPROBS, GuidedDecodingParams, RequestError
from ..engine.grammar import grammar_of
from ..stops import check_stop_strings
from .errors import bad, is_int, is_num


def number(body: dict[str, Any], name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not is_num(v) or not (low < v if low_open else low <= v) or not v <= high:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]".replace("inf]", "inf)")
        raise bad(f"{name}={v!r} must be a number in {span}", name)
    return float(v)


def logit_bias(body: dict[str, Any], vocab: int | None) -> dict[int, float] | None:
    """OpenAI's logit_bias: a map from token id (a JSON string key) to a bias in [-100, 100]."""
    lb = body.get("logit_bias")
    if lb is None or lb == {}:
        return None
    if not isinstance(lb, dict):
        raise bad("logit_bias must be an object mapping token ids to biases in [-100, 100]", "logit_bias")
    out = {}
    for k, v in lb.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise bad(f"logit_bias key {k!r} is not a token id", "logit_bias") from None
        if tid < 0 or (vocab is not None and tid >= vocab):
            raise bad(f"logit_bias: token id {tid} is outside the vocabulary [0, {vocab})", "logit_bias")
        if not is_num(v) or not -100 <= v <= 100:
            raise bad(f"logit_bias[{k!r}]={v!r} must be a number in [-100, 100]", "logit_bias")
        out[tid] = float(v)
    return out


def extras(body: dict[str, Any], vocab: int | None, max_tokens: int) -> dict[str, Any]:
    """Penalties, logit_bias, min_tokens and min_p as SamplingConfig fields."""
    min_tokens = body.get("min_tokens")
    min_tokens = 0 if min_tokens is None else min_tokens
    if not is_int(min_tokens) or not 0 <= min_tokens <= max_tokens:
        raise bad(f"min_tokens={min_tokens!r} must be an integer in [0, max_tokens={max_tokens}]", "min_tokens")
    return {"presence_penalty": number(body, "presence_penalty", 0.0, -2.0, 2.0),
            "frequency_penalty": number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            "repetition_penalty": number(body, "repetition_penalty", 1.0, 0.0, math.inf, low_open=True),
            "min_p": number(body, "min_p", 0.0, 0.0, 1.0), "logit_bias": logit_bias(body, vocab),
            "min_tokens": min_tokens}


def stop_fields(body: dict[str, Any]) -> tuple[list[str], bool]:
    """`stop` (a string or up to 4) and vLLM's `include_stop_str_in_output`."""
    stop = body.get("stop")
    try:
        stops = check_stop_strings([] if stop == "" else stop)
    except ValueError as err:
        raise bad(str(err), "stop") from None
    include = body.get("include_stop_str_in_output", False)
    if include is None:
        include = False
    if not isinstance(include, bool):
        raise bad(f"include_stop_str_in_output={include!r} must be true or false", "include_stop_str_in_output")
    return stops, include


def logprob_fields(body: dict[str, Any], kind: str) -> int | None:
    """How many top alternatives each token's logprobs list, or None when not asked: completions'
    `logprobs: k`, chat's `logprobs: true` with `top_logprobs: k` (k in [0, 20])."""
    if kind == "completion":
        k = body.get("logprobs")
        if k is None or k is False:
            return None
        if not is_int(k) or not 0 <= k <= MAX_LOGPROBS:
            raise bad(f"logprobs={k!r} must be an integer in [0, {MAX_LOGPROBS}] (top alternatives per token)",
                      "logprobs")
        return k
    on, k = body.get("logprobs"), body.get("top_logprobs")
    if on not in (None, True, False):
        raise bad(f"logprobs={on!r} must be true or false (top_logprobs says how many alternatives)", "logprobs")
    if k is not None and (not is_int(k) or not 0 <= k <= MAX_LOGPROBS):
        raise bad(f"top_logprobs={k!r} must be an integer in [0, {MAX_LOGPROBS}]", "top_logprobs")
    if not on:
        if k:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        return None
    return k or 0


_FORMATS = ("text", "json_object", "json_schema")


def response_format(body: dict[str, Any]) -> GuidedDecodingParams | None:
    """OpenAI's response_format -> guided decoding: {"type": "json_object"} (any JSON object) or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; "text" (the default) is none.
    The schema is compiled here (no tokenizer needed), so a bad one is a 400 before any rank works."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in _FORMATS:
        shown = rf.get("type") if isinstance(rf, dict) else rf
        raise bad(f"response_format type {shown!r} must be one of {', '.join(_FORMATS)}", "response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        params = GuidedDecodingParams("json")
    else:
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise bad("response_format.json_schema must be an object {name, schema, strict} whose schema is a "
                      "JSON schema object", "response_format")
        if not isinstance(js.get("name", ""), str) or not isinstance(js.get("strict", False), (bool, type(None))):
            raise bad("response_format.json_schema: name must be a string and strict true or false",
                      "response_format")
        params = GuidedDecodingParams("json_schema", json.dumps(js["schema"]))
    try:
        grammar_of(params, "response_format")
    except RequestError as err:
        raise bad(str(err), "response_format") from None
    return params

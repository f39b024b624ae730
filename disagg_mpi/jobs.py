"""Batch jobs as JSONL: parse input lines into requests, format output lines.

A bad line becomes an output line with `finish_reason: "error"` and a message
that names the field; it never stops the other lines.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .api import MAX_LOGPROBS, OutputConfig, Request, Response, SamplingConfig
from .hops import durations_ms
from .serve.errors import ApiError
from .serve.sampling_fields import response_format
from .stops import check_stop_strings


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class InputLine(BaseModel):
    # Strict ints (true is not token 1) and finite floats (Infinity is not a temperature).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    id: str
    prompt: str | None = None
    messages: list[Message] | None = None
    input_ids: list[StrictInt] | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop_token_ids: list[StrictInt] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    min_p: float = Field(0.0, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None
    min_tokens: int = Field(0, ge=0)
    stop: str | list[str] | None = None  # stop strings (Request.stop_words), applied on rank 0
    include_stop_str_in_output: bool = False
    # top alternatives per output token: the output line gets `logprobs` (see output_line)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # top alternatives per prompt token (vLLM's `prompt_logprobs`): the output line gets `prompt_logprobs`,
    # one entry per prompt token, the first null (nothing precedes it)
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # as OpenAI's: {"type": "json_object"} | {"type": "json_schema", "json_schema": {...}} (guided decoding)
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        return check_stop_strings(v)

    @model_validator(mode="after")
    def _one_input(self) -> InputLine:
        given = [k for k in ("prompt", "messages", "input_ids") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of prompt, messages, input_ids (got {given or 'none'})")
        return self


class LineError(ValueError):
    def __init__(self, line_id: str, message: str):
        super().__init__(message)
        self.line_id = line_id


def _pydantic_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "line"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = ("unknown field; allowed: id, prompt | messages | input_ids, max_tokens, temperature, "
                   "top_k, top_p, min_p, seed, presence_penalty, frequency_penalty, repetition_penalty, "
                   "logit_bias, min_tokens, stop_token_ids, stop, include_stop_str_in_output, ignore_eos, stream, logprobs, "
                   "prompt_logprobs, response_format")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_line(raw: str, lineno: int, tokenizer: Any) -> tuple[str, Request]:
    """One JSONL line -> (id, Request); raises LineError with the id (or 'line N')."""
    fallback = f"line {lineno}"
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LineError(fallback, f"{fallback} is not valid JSON: {err.msg}") from None
    except RecursionError:
        raise LineError(fallback, f"{fallback} is nested too deeply") from None
    if not isinstance(data, dict):
        raise LineError(fallback, f"{fallback} must be a JSON object")
    line_id = str(data.get("id", fallback))
    try:
        line = InputLine.model_validate(data)
    except ValidationError as err:
        raise LineError(line_id, _pydantic_message(err)) from None
    try:
        if line.input_ids is not None:
            ids = list(line.input_ids)
        elif line.messages is not None:
            text = tokenizer.apply_chat_template([m.model_dump() for m in line.messages],
                                                 add_generation_prompt=True)
            ids = tokenizer.encode(text)
        else:
            ids = tokenizer.encode(line.prompt)
    except (TypeError, ValueError, UnicodeError) as err:
        raise LineError(line_id, f"the text cannot be tokenized ({err}); send valid UTF-8 text") from None
    if not ids:
        raise LineError(line_id, "the prompt is empty; send at least one token")
    try:  # the HTTP server's reading of the field: one schema compiler, one set of messages
        guided = response_format({"response_format": line.response_format})
    except ApiError as err:
        raise LineError(line_id, f"response_format: {err.message}") from None
    sc = SamplingConfig(1, line.temperature, line.top_k, line.top_p, line.seed, line.min_p, line.presence_penalty,
                        line.frequency_penalty, line.repetition_penalty, line.logit_bias, line.min_tokens)
    req = Request(ids, line.max_tokens, sc,
                  streaming=line.stream, stop_token_ids=line.stop_token_ids, ignore_eos=line.ignore_eos,
                  client_id=line.id, stop_words=list(line.stop or []),
                  include_stop_str_in_output=line.include_stop_str_in_output,
                  output_config=OutputConfig(return_log_probs=line.logprobs is not None), num_logprobs=line.logprobs or 0,
                  num_prompt_logprobs=line.prompt_logprobs, guided_decoding=guided)
    return line.id, req


def output_line(line_id: str, resp: Response | None, tokenizer: Any, error: str | None = None,
                text: str | None = None) -> dict:
    """`text`: the output text when it is not the decoded tokens (cut at a stop string)."""
    if resp is not None and resp.error_msg is None and resp.result is not None:
        r = resp.result
        reason = r.finish_reason or "length"
        if text is None:
            text = tokenizer.decode(r.output_token_ids)
        out = {"id": line_id, "output_ids": r.output_token_ids, "text": text,
               "finish_reason": reason, "error": None, "metrics": _round(r.metrics.to_dict())}
        if r.metrics.hops:  # where the time went, between consecutive hops (stamps in metrics.hops)
            out["hops_ms"] = _round(durations_ms(r.metrics.hops))
        if r.log_probs is not None:  # per output token: its logprob and the top [id, logprob] pairs
            out["logprobs"] = [_logprob_entry(lp) for lp in r.log_probs]
        if r.prompt_log_probs is not None:  # per prompt token, the same (the first: null)
            out["prompt_logprobs"] = [None if lp is None else _logprob_entry(lp) for lp in r.prompt_log_probs]
        return out
    msg = error if error is not None else (resp.error_msg if resp is not None else "unknown error")
    metrics = _round(resp.result.metrics.to_dict()) if resp is not None and resp.result is not None else {}
    return {"id": line_id, "output_ids": [], "text": "", "finish_reason": "error", "error": msg,
            "metrics": metrics}


def _logprob_entry(lp: Any) -> dict[str, Any]:
    return {"logprob": lp.logprob, "top": [[i, v] for i, v in zip(lp.top_ids, lp.top_logprobs)]}


def _round(m: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}

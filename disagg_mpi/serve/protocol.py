"""OpenAI request bodies -> engine requests (the responses are in `responses.py`).

Pure functions (no aiohttp, no MPI), so they can be unit tested alone.
Anything that cannot be served raises `ApiError` with the HTTP status and an
OpenAI-style message naming the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..api import OutputConfig, Request, RequestError
from ..orchestrator.admission import ModelLimits, check_request
from ..sample_group import SampleGroup
from .completion_fields import (  # noqa: F401 - CONTEXT_ONLY: re-exported for the server's modules
    BENCHMARK_FIELD,
    CONTEXT_AND_GENERATION,
    CONTEXT_ONLY,
    GENERATION_ONLY,
    benchmark_field,
    best_of_field,
    disagg_fields,
    max_tokens_and_sampling,
    n_field,
    stream_fields,
    token_list,
)
from .errors import ApiError, bad, error_body  # noqa: F401 - ApiError, error_body: re-exported
from .sampling_fields import logprob_fields, response_format, stop_fields

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 128

# Fields of each endpoint. Engine fields are used; the "OpenAI fields we accept"
# must hold their default value (or anything, for `user`), else the request is refused.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos",
           "stream", "stream_options", "disaggregated_params", "n", "user", "logprobs", "stop",
           "presence_penalty", "frequency_penalty", "logit_bias", "include_stop_str_in_output",
           "repetition_penalty", "min_tokens", "min_p", "response_format", BENCHMARK_FIELD}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice"}


@dataclass
class ParsedRequest:
    """What a handler needs to run one OpenAI request: one engine request per choice."""

    kind: str  # "completion" | "chat"
    request: Request  # the first choice's (the only one without batching or n)
    stream: bool
    include_usage: bool
    mode: str  # CONTEXT_AND_GENERATION | CONTEXT_ONLY | GENERATION_ONLY
    model: str
    id: str = field(default_factory=lambda: "")
    created: int = field(default_factory=lambda: int(time.time()))
    requests: list[Request] = field(default_factory=list)  # choice i is requests[i]: prompt i // n
    n: int = 1
    # best_of > n: requests holds best_of candidates per prompt, the n best are returned (best_of.py)
    best_of: int = 1
    show_logprobs: bool = False  # the client asked for logprobs (best_of computes them to rank anyway)
    echo: list[str] = field(default_factory=list)  # per choice, the prompt text `echo` puts first
    # max_tokens 0 with echo (vLLM's way to score a prompt): the executors compute one token, which the
    # client never sees; the answer is the prompt (and its logprobs), finish_reason "length".
    score_only: bool = False

    def __post_init__(self) -> None:
        if not self.requests:
            self.requests = [self.request]

    @property
    def per_prompt(self) -> int:
        """Engine requests per prompt: the candidates when best_of > n, else the n choices."""
        return max(self.n, self.best_of)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.input_token_ids) for r in self.requests[:: self.per_prompt])


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise bad("the request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad(f"the request body is not valid JSON: {err}") from None
    except RecursionError:  # (the parser recurses once per level: 100,000 levels overflow it)
        raise bad("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def _text(v: str, param: str) -> str:
    """`v`, if it is valid Unicode text: JSON's \\ud800 escapes decode to lone UTF-16 surrogates, which
    no tokenizer can encode."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as err:
        raise bad(f"{param} holds a lone UTF-16 surrogate ({v[err.start]!r} at character {err.start}); "
                  "send valid Unicode text", param) from None
    return v


def _check_fields(body: dict[str, Any], allowed: set[str], endpoint: str) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r} for {endpoint}" + (f" (also {unknown[1:]})" if unknown[1:] else "")
                  + f"; allowed: {', '.join(sorted(allowed))}", unknown[0], "unknown_field")


def _check_defaults(body: dict[str, Any]) -> None:
    """OpenAI fields we accept only at their default value."""
    if body.get("echo") not in (None, False, True):
        raise bad(f"echo={body.get('echo')!r} must be true or false", "echo")
    if body.get("suffix") not in (None, ""):
        raise bad("suffix (insertion after the completion) is not supported: these models have no fill-in-the-"
                  "middle mode; leave suffix out", "suffix")
    if body.get("tools") not in (None, []) or body.get("tool_choice") not in (None, "none"):
        name = "tools" if body.get("tools") not in (None, []) else "tool_choice"
        raise bad("tools and tool_choice are not supported (this server has no function calling); "
                  "leave them out", name)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user must be a string", "user")


def check_benchmark_allowed(p: ParsedRequest, allowed: bool) -> None:
    """A benchmark request reserves KV blocks without computing anything: a client could hold a pool
    cheaply, so only a server started for benchmarks takes one."""
    if not allowed and any(r.benchmark_generation_only for r in p.requests):
        raise bad(f"{BENCHMARK_FIELD} (generation-only benchmark requests) is not enabled on this server; start "
                  "it with `disagg-mpi serve --allow-benchmark-requests` (or server.allow_benchmark_requests: "
                  "true in its config) to allow it", BENCHMARK_FIELD, "benchmark_requests_disabled")


def _check_model(body: dict[str, Any], model_names: tuple[str, ...]) -> str:
    model = body.get("model")
    if model is None:
        return model_names[0]
    if not isinstance(model, str):
        raise bad("model must be a string", "model")
    if model not in model_names:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_names[0]!r}",
                       "model", "model_not_found")
    return model


def _choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j's seed: the request's seed for choice 0, a distinct well-mixed one for the others,
    so seeded choices differ from each other and repeat with the same seed."""
    if seed is None or j == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + j * 0xBF58476D1CE4E5B9) % (2**63)


def _finish(kind: str, body: dict[str, Any], prompts: list[list[int]], vocab: int | None,
            default_max_tokens: int, model: str, max_tokens_field: str = "max_tokens",
            echo: list[str] | None = None) -> ParsedRequest:
    for ids in prompts:
        if not ids:
            raise bad("the prompt is empty; send at least one token", "prompt" if kind == "completion" else "messages")
        if vocab is not None:
            out = [t for t in ids if not 0 <= t < vocab]
            if out:
                raise bad(f"prompt token ids {out[:5]} are outside the vocabulary [0, {vocab})", "prompt")
    stream, include_usage = stream_fields(body)
    mode, cpp = disagg_fields(body, stream)
    fake_context = benchmark_field(body, mode)
    n = n_field(body, len(prompts))
    if mode != CONTEXT_AND_GENERATION and len(prompts) * n > 1:
        raise bad("disaggregated_params takes one prompt and n=1", "disaggregated_params")
    mt, sc, stop_ids, ignore_eos = max_tokens_and_sampling(body, default_max_tokens, max_tokens_field, vocab,
                                                           echo is not None)
    stop_words, include_stop = stop_fields(body)
    k = logprob_fields(body, kind)
    # echo with logprobs: the prompt's too (the context phase computes them)
    prompt_k = k if echo is not None and k is not None else None
    if prompt_k is not None and mode == GENERATION_ONLY:
        raise bad("echo with logprobs needs the prompt's logprobs, which the context_only request computes; "
                  "a generation_only request cannot return them: leave echo out", "echo")
    guided = response_format(body)
    best_of = best_of_field(body, n, len(prompts), stream, mode) if kind == "completion" else 1
    per = max(n, best_of)
    keys = [secrets.randbits(63) for _ in prompts]  # the executors compute each prompt once (sample_group.py)
    reqs = [Request(list(ids), max(mt, 1), dataclasses.replace(sc, seed=_choice_seed(sc.seed, j)), streaming=stream,
                    context_phase_params=cpp, stop_token_ids=list(stop_ids), ignore_eos=ignore_eos,
                    stop_words=list(stop_words), include_stop_str_in_output=include_stop,
                    output_config=OutputConfig(return_log_probs=k is not None or best_of > 1), num_logprobs=k or 0,
                    num_prompt_logprobs=prompt_k, guided_decoding=guided, benchmark_generation_only=fake_context,
                    sample_group=SampleGroup(keys[i], j, per) if per > 1 else None)
            for i, ids in enumerate(prompts) for j in range(per)]
    prefix = "cmpl-" if kind == "completion" else "chatcmpl-"
    echoes = [e for e in (echo or [""] * len(prompts)) for _ in range(per)]
    return ParsedRequest(kind, reqs[0], stream, include_usage, mode, model, prefix + uuid.uuid4().hex,
                         requests=reqs, n=n, echo=echoes, score_only=mt == 0, best_of=best_of,
                         show_logprobs=k is not None)


def _prompts(prompt: Any, tokenizer: Any, vocab: int | None) -> tuple[list[list[int]], list[str]]:
    """OpenAI's four prompt shapes -> token ids and text of each prompt: a string, a list of strings,
    a list of token ids, a list of such lists."""
    if isinstance(prompt, str):
        return [tokenizer.encode(_text(prompt, "prompt"))], [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt must be a string, a list of strings, a list of token ids or a list of token id lists"
                  + (" (the list is empty)" if prompt == [] else f", got {type(prompt).__name__}"), "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [tokenizer.encode(_text(p, f"prompt[{i}]")) for i, p in enumerate(prompt)], list(prompt)
    if all(isinstance(p, list) for p in prompt):
        ids = [token_list(p, f"prompt[{i}]", vocab) for i, p in enumerate(prompt)]
        return ids, [tokenizer.decode(p) for p in ids]
    ids = token_list(prompt, "prompt", vocab)
    return [ids], [tokenizer.decode(ids)]


def parse_completion(body: dict[str, Any], tokenizer: Any, model_names: tuple[str, ...],
                     vocab: int | None = None) -> ParsedRequest:
    _check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    _check_defaults(body)
    model = _check_model(body, model_names)
    if "prompt" not in body or body["prompt"] is None:
        raise bad("the field 'prompt' is required (a string or a list of token ids)", "prompt", "missing_field")
    ids, texts = _prompts(body["prompt"], tokenizer, vocab)
    echo = texts if body.get("echo") else None
    return _finish("completion", body, ids, vocab, COMPLETION_DEFAULT_MAX_TOKENS, model, echo=echo)


_ROLES = ("system", "user", "assistant", "tool", "developer")


def _messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content", where)
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise bad(f"{where}.role={role!r} must be one of {', '.join(_ROLES)}", f"{where}.role")
        if isinstance(content, list):  # content parts: only text
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise bad(f"{where}.content[{j}] must be {{'type': 'text', 'text': str}} (only text is "
                              "supported)", f"{where}.content")
                parts.append(p["text"])
            content = "".join(parts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        _text(content, f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_chat(body: dict[str, Any], tokenizer: Any, model_names: tuple[str, ...],
               vocab: int | None = None) -> ParsedRequest:
    _check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    _check_defaults(body)
    model = _check_model(body, model_names)
    if "messages" not in body:
        raise bad("the field 'messages' is required", "messages", "missing_field")
    messages = _messages(body["messages"])
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(text)
    return _finish("chat", body, [ids], vocab, CHAT_DEFAULT_MAX_TOKENS, model, "max_completion_tokens")


# The fields of `Request` (admission.py's names) under their names in an OpenAI body.
_HTTP_PARAMS = {
    "max_tokens": "max_tokens", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
    "streaming": "stream", "context_phase_params": "disaggregated_params",
    "context_phase_params.req_id": "disaggregated_params.ctx_request_id",
    "context_phase_params.first_gen_tokens": "disaggregated_params.first_gen_tokens",
    "context_phase_params.opaque_state": "disaggregated_params.opaque_state",
    "num_logprobs": "logprobs", "output_config": "logprobs",
    "guided_decoding": "response_format", "benchmark_generation_only": BENCHMARK_FIELD,
}


def http_param(param: str | None, kind: str) -> str | None:
    """A `Request` field name (RequestError.param) as the OpenAI body names it."""
    if param is None:
        return None
    if param == "input_token_ids":
        return "prompt" if kind == "completion" else "messages"
    if param.startswith("sampling_config."):
        return param.removeprefix("sampling_config.")
    return _HTTP_PARAMS.get(param, param)


def check_limits(p: ParsedRequest, limits: ModelLimits | None) -> None:
    """The edge check of every choice's values against the model (vocabulary, context) and 64-bit
    ranges (orchestrator/admission.py), with OpenAI's field names."""
    if limits is None:
        return
    for r in p.requests:
        try:
            check_request(r, limits, p.mode == GENERATION_ONLY)
        except RequestError as err:
            raise bad(str(err), http_param(err.param, p.kind)) from None

"""Guided decoding (JSON, JSON schema): grammars, each request's matcher, and the token masks.

The library is llguidance (Microsoft's guidance team; the structured-output backend of vLLM, SGLang
and llama.cpp's JSON schemas): one abi3 wheel with no dependencies at all, so it installs beside
torch==2.13.0 on any Python >= 3.9 without pinning torch, triton or transformers (xgrammar 0.2 pulls
triton and transformers in; outlines-core compiles a whole-vocabulary automaton per schema up front).
It reads our tokenizer as it is (the `tokenizers` JSON of HF folders and of GGUF vocabularies) and
computes a mask lazily, per step, for the rows that have a grammar; rows without one cost nothing.

Where the state lives: on the executor's leader, next to the sequence (`Sequence.grammar`). Before
each step the leader brings the matcher up to the sequence's output (`GrammarState.follow`) and fills
the row's bitmask; the plan carries the masks to the rank that samples (`StepPlan.masks`), which sets
the other tokens to -inf (`grammar_masks.apply_masks`; this module needs no torch, so rank 0 checks
schemas with it). So the first token obeys the grammar on the context
executor, and the generation executor rebuilds the matcher by replaying the output it receives (the
first token): only the grammar's spec crosses the hand-off, inside the request.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import llguidance
import msgpack

from ..api import GuidedDecodingParams, RequestError

if TYPE_CHECKING:
    import torch

# Compact JSON with the separators of Python's json.dumps: flexible whitespace (JSON's default)
# lets a small model emit blank lines until max_tokens (SmolLM2-135M did, on "any JSON object").
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = {"type": "object"}


def grammar_of(params: Any, param: str = "guided_decoding") -> str:
    """The llguidance grammar of `params` (a GuidedDecodingParams); RequestError naming `param` if it
    is malformed or its schema cannot be compiled. Needs no tokenizer, so rank 0 checks it at the edge."""
    if not isinstance(params, GuidedDecodingParams):
        raise RequestError(f"{param} must be a GuidedDecodingParams, got {type(params).__name__}", param)
    return _grammar(params.guide_type, params.guide, param)


@functools.lru_cache(maxsize=256)
def _grammar(guide_type: Any, guide: Any, param: str) -> str:
    if guide_type == "json":
        schema: Any = _ANY_OBJECT
    elif guide_type == "json_schema":
        if not isinstance(guide, str):
            raise RequestError(f"{param}.guide must be the JSON schema as a string, got {type(guide).__name__}",
                               param)
        try:
            schema = json.loads(guide)
        except (json.JSONDecodeError, RecursionError) as err:
            raise RequestError(f"{param}.guide is not valid JSON: {err}", param) from None
        if not isinstance(schema, dict):
            raise RequestError(f"{param}: a JSON schema must be an object, got {type(schema).__name__}", param)
    else:
        raise RequestError(f"{param}.guide_type={guide_type!r} must be one of "
                           f"{', '.join(GuidedDecodingParams.GUIDE_TYPES)}", param)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as err:
        raise RequestError(f"{param}: the JSON schema cannot be used: {err}", param) from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise RequestError(f"{param}: the JSON schema cannot be used: {error}", param)
    return grammar


def guide_digest(params: GuidedDecodingParams | None) -> bytes:
    """16 bytes naming a request's grammar (b"" without one), signed into the hand-off state."""
    if params is None:
        return b""
    return hashlib.sha256(msgpack.packb([params.guide_type, params.guide])).digest()[:16]


def mask_width(vocab: int) -> int:
    return -(-vocab // 32)


class GrammarState:
    """One request's matcher. It follows the sequence's output by consuming the tokens it has not
    seen yet, so a generation executor starts from the context's first token(s) by replaying them."""

    def __init__(self, matcher: llguidance.LLMatcher, params: GuidedDecodingParams):
        self.matcher = matcher
        self.params = params
        self.consumed = 0  # output tokens the matcher has taken

    def follow(self, output_ids: Sequence[int]) -> None:
        """Consume output_ids[consumed:]; RequestError if the grammar does not allow one of them."""
        for pos in range(self.consumed, len(output_ids)):
            if not self.matcher.consume_token(int(output_ids[pos])):
                raise RequestError(f"output token {output_ids[pos]} at position {pos} does not follow the "
                                   f"guided_decoding grammar: {self.matcher.get_error()}", "guided_decoding")
            self.consumed = pos + 1

    def fill(self, row: torch.Tensor) -> None:
        """Write the next token's bitmask (bit t of word t // 32 set: token t allowed) into `row`,
        a contiguous int32 CPU tensor of mask_width(vocab) words."""
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


class Grammars:
    """An executor's matcher factory. The llguidance tokenizer is built on the first guided request
    (loading the model's tokenizer: about 3 s for the GGUF default), never for an executor without one."""

    def __init__(self, load_tokenizer: Callable[[], Any] | None, vocab_size: int):
        self._load = load_tokenizer
        self.vocab_size = vocab_size
        self._ll: llguidance.LLTokenizer | None = None

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll is None:
            if self._load is None:
                raise RequestError("guided decoding needs the model's tokenizer, and this executor was built "
                                   "from a model object: give it the model's path", "guided_decoding")
            try:  # (a failure here must fail the request, not the executor's loop)
                tok = self._load()
                # The `tokenizers` JSON of our tokenizer; n_vocab: the model's logits width (may exceed it).
                self._ll = llguidance.LLTokenizer(tok.tok.to_str(), n_vocab=self.vocab_size,
                                                  eos_token=list(tok.eos_token_ids))
            except Exception as err:  # noqa: BLE001 - whatever the loader raises
                raise RequestError(f"guided decoding: the model's tokenizer cannot be used: "
                                   f"{type(err).__name__}: {err}", "guided_decoding") from None
        return self._ll

    def state(self, params: GuidedDecodingParams) -> GrammarState:
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar_of(params), log_level=0)
        if matcher.is_error():
            raise RequestError(f"guided_decoding: {matcher.get_error()}", "guided_decoding")
        return GrammarState(matcher, params)

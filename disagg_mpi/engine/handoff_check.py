"""Whether a generation-only request is the one its signed hand-off state was made for.

The client sends back `ContextPhaseParams` next to its prompt; everything the
generation side uses must equal what the context side signed (the prompt, by
length and digest; the first token(s); the context's request id; the grammar of guided
decoding, by digest). A mismatch is
refused here, before the request claims or pulls anything, so the context's KV
is untouched and the genuine request still works. Pure: no engine state.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..api import ContextPhaseParams, RequestError, TokenLogprobs
from ..transfer.opaque import OpaqueState, prompt_digest


def check_handoff(cpp: ContextPhaseParams, opaque: OpaqueState, prompt_ids: Sequence[int],
                  guide_digest: bytes = b"") -> None:
    """Raise RequestError naming the field that differs from the signed state `opaque`."""
    if opaque.ctx_req_id != cpp.req_id:
        raise RequestError(f"context_phase_params.req_id={cpp.req_id} does not match its opaque state "
                           "(send the context-only response's values unchanged)", "context_phase_params.req_id")
    if not opaque.first_tokens or list(cpp.first_gen_tokens) != list(opaque.first_tokens):
        raise RequestError(f"context_phase_params.first_gen_tokens={list(cpp.first_gen_tokens)[:8]} differ from "
                           "the token(s) the context phase sampled (send the context-only response's "
                           "first_gen_tokens unchanged)", "context_phase_params.first_gen_tokens")
    if opaque.num_tokens != len(prompt_ids):
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens but the context phase computed "
                           f"{opaque.num_tokens}; send the same input_token_ids", "input_token_ids")
    if opaque.prompt_digest and prompt_digest(list(prompt_ids)) != opaque.prompt_digest:
        raise RequestError("the prompt differs from the one the context phase computed (same length, other "
                           "tokens); send the same input_token_ids", "input_token_ids")
    if guide_digest != opaque.guide_digest:
        raise RequestError("guided_decoding differs from the one the context phase sampled under (send the "
                           "same response_format, or none if the context request had none)", "guided_decoding")


def first_logprobs(k: int, opaque: OpaqueState) -> list[TokenLogprobs]:
    """The first token's logprobs as the context phase computed them (signed), cut to the alternatives
    this request asks for; refused if it asks for more than the context phase computed."""
    if k < 0:  # (logprobs.NOT_ASKED)
        return []
    if not opaque.first_logprobs or len(opaque.first_logprobs[0].top_ids) < k:
        have = len(opaque.first_logprobs[0].top_ids) if opaque.first_logprobs else None
        raise RequestError(f"num_logprobs={k}: the context phase computed "
                           + ("no logprobs" if have is None else f"{have} alternatives") + " for the first token; "
                           "send its context-only request with the same output_config and num_logprobs",
                           "num_logprobs")
    return [opaque.first_logprobs[0].top(k)]

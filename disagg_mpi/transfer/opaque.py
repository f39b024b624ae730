"""The opaque state inside `ContextPhaseParams`: where a context's KV lives.

Context-only responses leave the job (over HTTP), so the state is signed with
a key made at launch (HMAC-SHA256); the generation side refuses forged or
altered params before any byte moves, and the context leader refuses replays
(a context is claimed once).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import msgpack

from ..api import TokenLogprobs
from .cache_state import CacheState


class OpaqueStateError(ValueError):
    """Params that are malformed, forged or altered."""


@dataclass(frozen=True)
class OpaqueState:
    executor_id: int  # which context executor (index in the topology)
    world_ranks: tuple[int, ...]  # its ranks, in executor-local order
    ctx_req_id: int  # the context request that owns the blocks
    block_ids: tuple[int, ...]  # the blocks holding the prompt's KV, in order
    num_tokens: int  # tokens of KV in those blocks
    cache_state: CacheState
    # The context side reuses none of these blocks before this time.monotonic() (released or not);
    # 0: no such promise. Same-node readers only (one clock): see engine/handoff.py.
    keep_until: float = 0.0
    prompt_digest: bytes = b""  # of the prompt whose KV this is (prompt_digest()); b"": not checked
    # The token(s) the context phase sampled: the generation side decodes on from these and no others
    # (a client's first_gen_tokens must equal them: engine/handoff_check.py).
    first_tokens: tuple[int, ...] = ()
    # Their logprobs, when the request asked (OutputConfig.return_log_probs): the generation side's
    # first output carries them, so the disaggregated output equals the aggregated one. Signed like
    # the rest: a client cannot make the server report values the model did not give.
    first_logprobs: tuple[TokenLogprobs, ...] = ()
    # The grammar the first token(s) obeyed (engine/grammar.py: guide_digest; b"": none): the generation
    # side must continue under the same one, or its output silently stops matching the schema.
    guide_digest: bytes = b""

    def _payload(self) -> bytes:
        return msgpack.packb([self.executor_id, list(self.world_ranks), self.ctx_req_id,
                              list(self.block_ids), self.num_tokens, self.cache_state.to_dict(),
                              self.keep_until, self.prompt_digest, list(self.first_tokens),
                              [t.to_wire() for t in self.first_logprobs], self.guide_digest])

    def encode(self, key: bytes) -> bytes:
        payload = self._payload()
        sig = hmac.new(key, payload, hashlib.sha256).digest()
        return msgpack.packb({"v": 1, "p": payload, "s": sig})

    @classmethod
    def decode(cls, blob: bytes, key: bytes) -> OpaqueState:
        try:
            outer = msgpack.unpackb(blob)
            payload, sig = outer["p"], outer["s"]
            # Only the exact envelope `encode` writes: a bit flipped in its version field (or an
            # extra key) keeps the signed payload, and such altered params were served (taking the
            # context from the genuine request: seen in the soak test).
            canonical = msgpack.packb({"v": 1, "p": payload, "s": sig}) == blob
        except Exception:  # noqa: BLE001 - any garbage is the same error to the client
            raise OpaqueStateError("context_phase_params.opaque_state is malformed") from None
        if not canonical:
            raise OpaqueStateError("context_phase_params.opaque_state is malformed (altered envelope)")
        want = hmac.new(key, payload, hashlib.sha256).digest()
        if not isinstance(sig, bytes) or not hmac.compare_digest(sig, want):
            raise OpaqueStateError("context_phase_params.opaque_state has a bad signature "
                                   "(forged, altered, or from another job)")
        ex, ranks, rid, blocks, ntok, cs, keep, digest, first, first_lps, guide = msgpack.unpackb(payload)
        return cls(ex, tuple(ranks), rid, tuple(blocks), ntok, CacheState.from_dict(cs), keep, digest,
                   tuple(first), tuple(TokenLogprobs.from_wire(t) for t in first_lps), guide)


def prompt_digest(token_ids: list[int]) -> bytes:
    """16 bytes naming a prompt: the generation side checks it is given the prompt whose KV it pulls."""
    return hashlib.sha256(msgpack.packb(list(token_ids))).digest()[:16]

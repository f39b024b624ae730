"""One request's state inside an engine: tokens, progress, sampling and stop rules.

The scheduler is phase-free (vLLM v1): a sequence only knows how many of its
tokens already have KV in the cache (`num_computed_tokens`). Prefill, chunked
prefill and decode all follow from comparing that with `num_tokens`.
"""

from __future__ import annotations

import enum
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, no blocks yet
    RUNNING = "running"  # blocks reserved, scheduled every step
    FINISHED_STOPPED = "finished_stopped"  # eos or a stop token
    FINISHED_LENGTH = "finished_length"  # reached max_tokens
    FINISHED_ABORTED = "finished_aborted"  # cancelled by the client or the engine

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    SequenceStatus.FINISHED_STOPPED,
    SequenceStatus.FINISHED_LENGTH,
    SequenceStatus.FINISHED_ABORTED,
}

FINISH_STATUS = {
    "stop": SequenceStatus.FINISHED_STOPPED,
    "length": SequenceStatus.FINISHED_LENGTH,
    "abort": SequenceStatus.FINISHED_ABORTED,
}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. Frozen so one instance can be shared safely.

    `seed=None` means "no seed given": whoever creates the request must draw one
    then, because the sampler's randomness is keyed by (seed, output position)
    and every rank that might sample this request has to agree on it.

    The logits adjustments (penalties.py) depend only on the prompt and the output so far, so a
    generation executor recomputes them from what it receives (the first token is in its output).
    """

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None
    min_p: float = 0.0  # 0 = off
    presence_penalty: float = 0.0  # OpenAI's, over the output tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # transformers', over prompt and output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # `min_tokens_mask` cannot be sampled before this many output tokens
    min_tokens_mask: tuple[int, ...] = ()  # EOS and stop tokens
    guided: bool = False  # a grammar masks this row's tokens (StepPlan.masks; grammar.py)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_history(self) -> bool:
        """Its logits depend on the tokens so far (StepPlan.histories carries them)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        return self.needs_history or bool(self.logit_bias) or (self.min_tokens > 0 and bool(self.min_tokens_mask))

    @property
    def masked_greedy(self) -> bool:
        """The argmax of the model's logits, a grammar's mask aside: the runner can take it on the
        device and chain the next decode step behind it (overlap.py)."""
        return self.greedy and not self.adjusts_logits

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the model's logits as they are (what CUDA-graph decode computes in the graph)."""
        return self.greedy and not self.adjusts_logits and not self.guided

    @functools.cached_property
    def _wire(self) -> tuple:
        return (self.temperature, self.top_k, self.top_p, self.seed, self.min_p, self.presence_penalty,
                self.frequency_penalty, self.repetition_penalty, self.logit_bias, self.min_tokens,
                self.min_tokens_mask, self.guided)

    def to_wire(self) -> tuple:
        """A hashable tuple (msgpack sends it as a list); computed once per instance."""
        return self._wire

    @classmethod
    def from_wire(cls, w: Any) -> SamplingParams:
        # Every step rebuilds each row's params from the plan: cached, so a decode step at batch 64
        # costs 64 dict lookups, not 64 validations.
        try:
            return _from_wire(w)
        except TypeError:  # lists, as msgpack gives them back: make it hashable
            t, k, p, s, min_p, pres, freq, rep, bias, min_tokens, mask, guided = w
            return _from_wire((t, k, p, s, min_p, pres, freq, rep, tuple((int(i), float(b)) for i, b in bias),
                               min_tokens, tuple(mask), guided))

    def validate(self) -> None:
        if not self.temperature >= 0.0:  # `not >=` also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0.0 or math.isinf(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        bad = [(i, b) for i, b in self.logit_bias if not -100.0 <= b <= 100.0]
        if bad:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bad[:3]}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")


@functools.lru_cache(maxsize=4096)
def _from_wire(w: tuple) -> SamplingParams:
    return SamplingParams(*w)


@dataclass(eq=False)  # identity equality: two requests with equal fields are still two
class Sequence:
    req_id: int
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: set[int] = field(default_factory=set)
    eos_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # 'stop' | 'length' | 'abort'
    arrival_time: float = field(default_factory=time.monotonic)
    # Context-only requests hand their KV to a generation executor, so the
    # scheduler leaves their blocks allocated at finish; the caller frees them.
    keep_blocks: bool = False
    full_max_tokens: int = 0  # context-only (max_tokens 1 here): the client's max_tokens, for its answer
    # A context-only request whose generation phase a client sends (HTTP context_only): its hold
    # counts against `max_held_fraction` (handoff.py).
    held_for_client: bool = False
    bypassed: int = 0  # waiting: times a later request was admitted before it (scheduler.may_pass)
    # Logprobs (OutputConfig.return_log_probs): top alternatives per token, logprobs.NOT_ASKED = none;
    # `logprobs[i]` belongs to output_ids[i] (the generation side gets the first one in the hand-off).
    num_logprobs: int = -1
    logprobs: list[Any] = field(default_factory=list)  # [api.TokenLogprobs]
    # Prompt logprobs (Request.num_prompt_logprobs): k, or NOT_ASKED; `prompt_logprobs[i]` belongs to
    # prompt_ids[i] (the first is None), filled chunk by chunk as the prompt is prefilled, sent once.
    num_prompt_logprobs: int = -1
    prompt_logprobs: list[Any] = field(default_factory=list)  # [api.TokenLogprobs | None]
    prompt_logprobs_sent: bool = False
    # Guided decoding: the matcher (grammar.GrammarState), on the leader only; it follows output_ids
    grammar: Any = None
    # A generation-only benchmark request (engine/benchmark.py): the prompt's KV is reserved, never
    # computed, and its blocks never enter the prefix cache.
    fake_context: bool = False
    # Parallel sampling (sample_groups.py): the request's sample_group.SampleGroup, and, once it shares
    # the prompt's KV of another member, that member's req_id (its first token comes from that row).
    group: Any = None
    fork_of: int | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"request {self.req_id}: the prompt is empty")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.req_id}: max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= len(self.prompt_ids)

    @property
    def remaining_prefill(self) -> int:
        return max(0, len(self.prompt_ids) - self.num_computed_tokens)

    @property
    def max_total_tokens(self) -> int:
        """Tokens the cache must hold at most; what admission reserves blocks for."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def remaining_tokens(self) -> int:
        """Work left (prefill to compute + tokens to generate): the router's load."""
        return self.remaining_prefill + max(0, self.max_tokens - len(self.output_ids))

    def sample_key(self) -> tuple[int, int]:
        """(seed, output position) of the token sampled next."""
        seed = self.sampling.seed
        if seed is None:
            if not self.sampling.greedy:
                raise ValueError(
                    f"request {self.req_id}: sampling without a seed; draw one when "
                    "the request is created so every rank samples the same token"
                )
            seed = 0  # greedy ignores the key
        return seed, len(self.output_ids)

    def check_stop(self, token: int) -> str | None:
        """Why the sequence ends after `token` (already appended), or None.

        'stop' wins over 'length' when both hold: the model did finish its answer.
        """
        if token in self.stop_token_ids:
            return "stop"
        if token in self.eos_token_ids and not self.ignore_eos:
            return "stop"
        if len(self.output_ids) >= self.max_tokens:
            return "length"
        return None

    def finish(self, reason: str) -> None:
        self.status = FINISH_STATUS[reason]
        self.finish_reason = reason

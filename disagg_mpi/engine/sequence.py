"""One request's state inside an engine: tokens, progress, sampling and stop rules.

The scheduler is phase-free (vLLM v1): a sequence only knows how many of its
tokens already have KV in the cache (`num_computed_tokens`). Prefill, chunked
prefill and decode all follow from comparing that with `num_tokens`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


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
    """

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        if not self.temperature >= 0.0:  # `not >=` also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


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

"""What a step leaves behind for whoever locates a stall: one JSON line per engine step
(`DISAGG_STEP_LOG=<folder>`), and each request's first-chunk and first-token hops (hops.py).

A serving stall is one step that took much longer than its neighbours; which one and on which
shape (how many sequences, how many tokens, the longest prefill chunk) tells a compile or a
capture on the serving path apart from a long prefill. Off by default: nothing is timed or
written. Each executor's leader writes `<folder>/executor<id>.jsonl`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO

from ..api import RequestType
from ..hops import Hop
from ..knobs import env_value


def step_record(t_start: float, seconds: float, chunks: list[int]) -> dict:
    """The line for one step: `chunks` holds each scheduled sequence's token count (1: decode)."""
    return {"t": round(t_start, 6), "ms": round(seconds * 1e3, 3), "seqs": len(chunks),
            "tokens": sum(chunks), "decode": sum(1 for n in chunks if n == 1),
            "max_chunk": max(chunks, default=0)}


class StepLog:
    """Appends `step_record` lines; `None` from `open` when the knob is unset."""

    def __init__(self, out: IO[str]):
        self._out = out

    @classmethod
    def open(cls, executor_id: int) -> StepLog | None:
        folder = env_value("DISAGG_STEP_LOG")
        if not folder:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(open(Path(folder) / f"executor{executor_id}.jsonl", "a", buffering=1))

    def write(self, t_start: float, t_end: float, chunks: list[int]) -> None:
        self._out.write(json.dumps(step_record(t_start, t_end - t_start, chunks)) + "\n")


def mark_first_chunks(items, metas: dict) -> None:
    """Stamp FIRST_CHUNK on the step's sequences that start their prefill (`items`: (seq, n))."""
    for seq in (s for s, _ in items if not s.is_prefill_done):  # (decode rows cost nothing here)
        if (meta := metas.get(seq.req_id)) and not meta.metrics.passed(Hop.FIRST_CHUNK):
            meta.metrics.stamp(Hop.FIRST_CHUNK)


def mark_first_tokens(sampled: dict[int, int], metas: dict) -> None:
    """Stamp FIRST_TOKEN on the requests whose first token this step sampled (a context-only
    request's first token is its answer: ctx_answer_sent marks it)."""
    now = time.perf_counter()
    for rid in sampled:
        meta = metas.get(rid)
        if meta and meta.first_token_time is None:
            meta.first_token_time = now
            if meta.request_type != RequestType.REQUEST_TYPE_CONTEXT_ONLY:
                meta.metrics.stamp(Hop.FIRST_TOKEN)

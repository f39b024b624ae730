"""Per-request hop timestamps: where one request's time went, rank by rank (issue 23).

Each place a request passes stamps `RequestMetrics.hops[hop] = time.time()` (wall clock: the
stamps come from separate processes, whose wall clocks agree on one node; across nodes they are
only as good as the hosts' clock sync, e.g. NTP or PTP). The executors' stamps travel back in
their final `Response`'s metrics (`protocol.Responses`), rank 0 merges them into the request's
metrics and adds its own, and the HTTP server adds its own before it writes them out.

The hops, in causal order (the chain `durations` walks); "before it" is the kind of time spent
between the previous hop of the chain and this one (what `by_kind` sums):

| hop | stamped by | when | before it |
| --- | --- | --- | --- |
| http_in | HTTP server (rank 0) | the handler started reading the request | - |
| arrival | rank 0 | the orchestrator took the parsed request (submit) | rank0 |
| dispatch | rank 0 | the first phase's Enqueue went out (context, or the only phase) | rank0 |
| admitted | first phase's executor | its leader admitted the request (add_request) | message |
| first_chunk | first phase's executor | the step computing its first prefill chunk started | queue |
| ctx_answer_sent | context executor | its answer (first token, params) went to rank 0 | compute |
| ctx_answer_received | rank 0 | that answer arrived | message |
| gen_enqueued | rank 0 | the generation phase's Enqueue went out | rank0 |
| gen_admitted | generation executor | its leader admitted it (params checked) | message |
| claim_sent | generation executor | blocks allocated, the Claim sent to the context leader | queue |
| claim_granted | generation executor | the context leader's grant arrived (absent when a CUDA IPC pull landed first) | message |
| kv_landed | generation executor | every rank of it has the KV | copy |
| first_token | the decoding executor | it sampled its first token (aggregated: output token 0; disaggregated: the first after the hand-off) | compute |
| final | rank 0 | the final response arrived (all tokens, metrics) | compute |
| http_out | HTTP server | the response's last write started (the JSON body, or the final SSE event) | rank0 |

The direct hand-off (`cache_transceiver_config.direct_handoff`) takes another chain, `DIRECT_CHAIN`
(`chain_of` picks it when `ctx_ready_sent` is stamped): rank 0 sends the parked generation phase first
(`gen_enqueued`, then `dispatch`), and the context leader's `ContextReady` goes straight to the
generation leader, so no rank-0 hop lies between the context and the generation side:
arrival -> gen_enqueued -> dispatch -> admitted -> first_chunk -> ctx_ready_sent -> gen_admitted ->
claim_sent -> claim_granted -> kv_landed -> first_token -> final -> http_out, where `ctx_ready_sent`
(context executor: its `ContextReady` went to the generation leader; compute before it) is stamped
only on this path, `gen_admitted` is when the generation leader checked the params it brought, and
`claim_sent` = `claim_granted` = when its blocks were allocated and the pull started (the grant came
with the notice; a generation side that had to wait for blocks claims as usual, and they differ).
`ctx_answer_sent` and `ctx_answer_received` are still stamped (rank 0 records the context's metrics)
but lie off that chain: they run beside the hand-off.

Outside the chain: `sse_first` (HTTP server: the first SSE event's write started), and two plain
fields of `RequestMetrics`, `sse_events` (SSE events written for the choice, its final one included)
and `sse_max_gap_ms` (the longest time between two of them), a summary of constant size however long
the output is.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol


class Hop(str, enum.Enum):
    """A place a request passes; the value is its name in `RequestMetrics.hops` (see the table above)."""

    HTTP_IN = "http_in"
    ARRIVAL = "arrival"
    DISPATCH = "dispatch"
    ADMITTED = "admitted"
    FIRST_CHUNK = "first_chunk"
    CTX_READY_SENT = "ctx_ready_sent"  # the direct hand-off's chain only (DIRECT_CHAIN)
    CTX_ANSWER_SENT = "ctx_answer_sent"
    CTX_ANSWER_RECEIVED = "ctx_answer_received"
    GEN_ENQUEUED = "gen_enqueued"
    GEN_ADMITTED = "gen_admitted"
    CLAIM_SENT = "claim_sent"
    CLAIM_GRANTED = "claim_granted"
    KV_LANDED = "kv_landed"
    FIRST_TOKEN = "first_token"
    FINAL = "final"
    HTTP_OUT = "http_out"
    SSE_FIRST = "sse_first"  # outside the chain


class Kind(str, enum.Enum):
    """What the time between two hops of the chain was spent on."""

    RANK0 = "rank0"  # rank 0's own work: parsing, admission checks, routing, delivery to the socket
    MESSAGE = "message"  # a control message between ranks, and the receiver's loop getting to it
    QUEUE = "queue"  # waiting in an executor: for a batch slot, for KV blocks
    COMPUTE = "compute"  # model steps: prefill, decode
    COPY = "copy"  # the KV moving between executors


# The chain, in causal order, with the kind of time spent before each hop (None: the start).
CHAIN: tuple[tuple[Hop, Kind | None], ...] = (
    (Hop.HTTP_IN, None),
    (Hop.ARRIVAL, Kind.RANK0),
    (Hop.DISPATCH, Kind.RANK0),
    (Hop.ADMITTED, Kind.MESSAGE),
    (Hop.FIRST_CHUNK, Kind.QUEUE),
    (Hop.CTX_ANSWER_SENT, Kind.COMPUTE),
    (Hop.CTX_ANSWER_RECEIVED, Kind.MESSAGE),
    (Hop.GEN_ENQUEUED, Kind.RANK0),
    (Hop.GEN_ADMITTED, Kind.MESSAGE),
    (Hop.CLAIM_SENT, Kind.QUEUE),
    (Hop.CLAIM_GRANTED, Kind.MESSAGE),
    (Hop.KV_LANDED, Kind.COPY),
    (Hop.FIRST_TOKEN, Kind.COMPUTE),
    (Hop.FINAL, Kind.COMPUTE),
    (Hop.HTTP_OUT, Kind.RANK0),
)
# The direct hand-off's chain (see above): rank 0's context-answer hops run beside it.
DIRECT_CHAIN: tuple[tuple[Hop, Kind | None], ...] = (
    (Hop.HTTP_IN, None),
    (Hop.ARRIVAL, Kind.RANK0),
    (Hop.GEN_ENQUEUED, Kind.RANK0),
    (Hop.DISPATCH, Kind.RANK0),
    (Hop.ADMITTED, Kind.MESSAGE),
    (Hop.FIRST_CHUNK, Kind.QUEUE),
    (Hop.CTX_READY_SENT, Kind.COMPUTE),
    (Hop.GEN_ADMITTED, Kind.MESSAGE),
    (Hop.CLAIM_SENT, Kind.QUEUE),
    (Hop.CLAIM_GRANTED, Kind.MESSAGE),
    (Hop.KV_LANDED, Kind.COPY),
    (Hop.FIRST_TOKEN, Kind.COMPUTE),
    (Hop.FINAL, Kind.COMPUTE),
    (Hop.HTTP_OUT, Kind.RANK0),
)
HOP_NAMES = frozenset(h.value for h in Hop)


def chain_of(hops: Mapping[str, float]) -> tuple[tuple[Hop, Kind | None], ...]:
    """The chain a request's hops follow: DIRECT_CHAIN if it took the direct hand-off, else CHAIN."""
    return DIRECT_CHAIN if Hop.CTX_READY_SENT.value in hops else CHAIN


def handoff_ms(hops: Mapping[str, float]) -> float | None:
    """The KV hand-off, from the context leader's first message about the held context (its
    ContextReady on the direct path, else its answer to rank 0) to the KV landed on the generation
    side; None for a request without one."""
    start = hops.get(Hop.CTX_READY_SENT.value, hops.get(Hop.CTX_ANSWER_SENT.value))
    end = hops.get(Hop.KV_LANDED.value)
    return None if start is None or end is None else (end - start) * 1e3


def check_hops(hops: Mapping[str, float]) -> dict[str, float]:
    """`hops` as RequestMetrics keeps them; ValueError names a hop that is not one of `Hop`."""
    bad = sorted(str(k) for k in hops if k not in HOP_NAMES)
    if bad:
        raise ValueError(f"unknown hops {bad}; allowed: {sorted(HOP_NAMES)}")
    return {str(k): float(v) for k, v in hops.items()}


def durations(hops: Mapping[str, float]) -> list[tuple[str, str, float]]:
    """Where the time went: (from hop, to hop, ms) between consecutive hops of the chain that are
    present (a hop the request did not pass is skipped: an aggregated request goes first_chunk ->
    first_token). A negative duration is kept: it shows clocks that disagree (ranks on two hosts)."""
    present = [h.value for h, _ in chain_of(hops) if h.value in hops]
    return [(a, b, (hops[b] - hops[a]) * 1e3) for a, b in pairwise(present)]


# Table order of segments: the classic chain, ctx_ready_sent where the context's answer would be.
_POS = {h.value: i for i, h in enumerate([h for h, _ in CHAIN[:5]] + [Hop.CTX_READY_SENT]
                                         + [h for h, _ in CHAIN[5:]])}


def segment_name(a: str, b: str) -> str:
    return f"{a}->{b}"


def segment_key(name: str) -> tuple[int, int]:
    """Sorts segment names ("a->b") in chain order."""
    a, b = name.split("->")
    return _POS[a], _POS[b]


def durations_ms(hops: Mapping[str, float]) -> dict[str, float]:
    """`durations` as {"a->b": ms}, in chain order (JSON output, bench rows)."""
    return {segment_name(a, b): ms for a, b, ms in durations(hops)}


def by_kind(hops: Mapping[str, float]) -> dict[str, float]:
    """The request's time between its first and last chain hop, summed per `Kind` (ms): e.g. how much
    of a hand-off was control messages, waiting, or the copy."""
    out: dict[str, float] = {}
    kinds = dict(chain_of(hops))
    for _, b, ms in durations(hops):
        kind = kinds[Hop(b)].value
        out[kind] = out.get(kind, 0.0) + ms
    return out


class Stampable(Protocol):
    """What the HTTP server stamps (api.RequestMetrics, which imports this module)."""

    sse_events: int | None
    sse_max_gap_ms: float | None

    def stamp(self, hop: Hop, when: float | None = None) -> None: ...


def stamp_http_body(m: Stampable, http_in: float | None) -> None:
    """A non-streamed response: its body is about to be written now."""
    if http_in is not None:
        m.stamp(Hop.HTTP_IN, http_in)
    m.stamp(Hop.HTTP_OUT)


@dataclass
class SseWrites:
    """One choice's SSE writes, summarized as they happen (constant memory however long the output)."""

    count: int = 0
    first: float | None = None
    last: float | None = None
    max_gap_s: float = 0.0

    def wrote(self, now: float | None = None) -> None:
        """An SSE event of the choice is about to be written (stamped before the write: a client
        that reads slowly shows up as the gap to the next one)."""
        now = time.time() if now is None else now
        if self.last is not None:
            self.max_gap_s = max(self.max_gap_s, now - self.last)
        if self.first is None:
            self.first = now
        self.count += 1
        self.last = now

    def stamp_into(self, m: Stampable, http_in: float | None) -> None:
        """A streamed choice's HTTP hops, on the metrics its final event carries (after `wrote` for it)."""
        if http_in is not None:
            m.stamp(Hop.HTTP_IN, http_in)
        if self.first is not None and self.last is not None:
            m.stamp(Hop.SSE_FIRST, self.first)
            m.stamp(Hop.HTTP_OUT, self.last)
        m.sse_events = self.count
        m.sse_max_gap_ms = self.max_gap_s * 1e3

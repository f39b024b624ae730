"""Benchmark metric math. Pure functions over per-request records.

Definitions (all times in ms, taken on the client):
- ttft: request sent -> first chunk that carries output.
- e2e: request sent -> the stream's end.
- tpot (time per output token, after the first): (e2e - ttft) / (n_out - 1);
  undefined (None) for a single-token output.
- itl (inter-token latency): gaps between consecutive output chunks' arrival
  times; every gap of every request is one sample.
- throughput: over the benchmark's wall time (first send -> last completion).
- goodput: requests/s that finished without error and met every SLO given
  (ttft <= slo_ttft_ms, tpot <= slo_tpot_ms; a one-token request has no tpot and
  meets the tpot SLO). None when no SLO is given.
- kv_transfer_gbps: per request, kv_transfer_bytes / kv_transfer_ms, in GB/s
  (10^9 bytes/s, as in scripts/bench_transfer.py).
- hops.handoff_ms: the KV hand-off per request, context leader's first message about the held context
  (ContextReady on the direct path, else its answer to rank 0) -> KV landed (hops.handoff_ms)
- hops (taken on the server, when it reports `metrics.hops`; disagg_mpi/hops.py): per segment
  between consecutive hops ("ctx_answer_sent->ctx_answer_received"), and per kind of time
  (message, queue, compute, copy, rank0) summed over a request's segments, the mean and
  percentiles over the requests that passed it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

from ..hops import by_kind, durations_ms, handoff_ms, segment_key

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    idx: int
    input_len: int
    output_len_requested: int
    ok: bool = False
    error: str | None = None
    start: float = 0.0                 # perf_counter seconds at send
    chunk_times: list[float] = field(default_factory=list)   # perf_counter seconds of each output chunk
    end: float = 0.0
    output_tokens: int = 0             # usage.completion_tokens when the server reports it, else tokens counted
    server_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def ttft_ms(self) -> float | None:
        return (self.chunk_times[0] - self.start) * 1e3 if self.ok and self.chunk_times else None

    @property
    def e2e_ms(self) -> float | None:
        return (self.end - self.start) * 1e3 if self.ok else None

    @property
    def tpot_ms(self) -> float | None:
        if not self.ok or self.ttft_ms is None:
            return None
        return tpot_ms(self.e2e_ms, self.ttft_ms, self.output_tokens)

    @property
    def itl_ms(self) -> list[float]:
        return itl_ms(self.chunk_times) if self.ok else []

    @property
    def hops(self) -> dict[str, float]:
        """The server's hop timestamps of this request (empty when it reports none)."""
        h = self.server_metrics.get("hops")
        return h if isinstance(h, dict) else {}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("chunk_times")
        d.update(ttft_ms=self.ttft_ms, tpot_ms=self.tpot_ms, e2e_ms=self.e2e_ms, itl_ms=self.itl_ms)
        if self.hops:  # where the server spent its time (the raw stamps are in server_metrics.hops)
            d["hops_ms"] = durations_ms(self.hops)
        return d


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default 'linear' method); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} must be in [0, 100]")
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Iterable[float | None]) -> dict[str, float | None]:
    """mean, p50, p90, p99 of the values that are not None (all None when there are none)."""
    xs = [float(v) for v in values if v is not None]
    out: dict[str, float | None] = {"mean": sum(xs) / len(xs) if xs else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q)
    return out


def tpot_ms(e2e_ms: float, ttft_ms: float, n_out: int) -> float | None:
    """Time per output token after the first: (e2e - ttft) / (n_out - 1)."""
    if n_out is None or n_out < 2:
        return None
    return (e2e_ms - ttft_ms) / (n_out - 1)


def itl_ms(chunk_times: Sequence[float]) -> list[float]:
    """Gaps between consecutive chunk arrivals (seconds in, ms out)."""
    return [(b - a) * 1e3 for a, b in pairwise(chunk_times)]


def meets_slo(ttft: float | None, tpot: float | None, slo_ttft_ms: float | None,
              slo_tpot_ms: float | None) -> bool:
    if ttft is None:
        return False
    if slo_ttft_ms is not None and ttft > slo_ttft_ms:
        return False
    return not (slo_tpot_ms is not None and tpot is not None and tpot > slo_tpot_ms)


def goodput(records: Sequence[RequestRecord], duration_s: float, slo_ttft_ms: float | None,
            slo_tpot_ms: float | None) -> float | None:
    """Requests/s that succeeded and met the SLOs; None when no SLO is set."""
    if slo_ttft_ms is None and slo_tpot_ms is None:
        return None
    if duration_s <= 0:
        return 0.0
    good = sum(1 for r in records if r.ok and meets_slo(r.ttft_ms, r.tpot_ms, slo_ttft_ms, slo_tpot_ms))
    return good / duration_s


def hop_summary(records: Sequence[RequestRecord]) -> dict[str, Any] | None:
    """Where the server's time went over the requests that report hops: each segment between
    consecutive hops (in chain order) and each kind of time, summarized with its count `n`
    (a segment only some requests pass, e.g. the hand-off's, counts only those); None when no
    request reports hops (another server)."""
    per = [r.hops for r in records if r.ok and r.hops]
    if not per:
        return None
    segments: dict[str, list[float]] = {}
    kinds: dict[str, list[float]] = {}
    handoffs = [ms for h in per if (ms := handoff_ms(h)) is not None]
    for h in per:
        for name, ms in durations_ms(h).items():
            segments.setdefault(name, []).append(ms)
        for kind, ms in by_kind(h).items():
            kinds.setdefault(kind, []).append(ms)

    return {"num_requests": len(per),
            "segments_ms": {k: {**summarize(segments[k]), "n": len(segments[k])} for k in sorted(segments, key=segment_key)},
            "kinds_ms": {k: {**summarize(v), "n": len(v)} for k, v in sorted(kinds.items())},
            "handoff_ms": {**summarize(handoffs), "n": len(handoffs)} if handoffs else None}


def kv_gbps(nbytes: float | None, ms: float | None) -> float | None:
    if nbytes is None or ms is None or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / 1e9


def bench_duration(records: Sequence[RequestRecord]) -> float:
    """First send -> last completion, seconds (0 with no records)."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def aggregate(records: Sequence[RequestRecord], duration_s: float | None = None,
              slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict[str, Any]:
    """The per-configuration summary of a set of request records."""
    if duration_s is None:
        duration_s = bench_duration(records)
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_len for r in ok)
    dur = duration_s if duration_s > 0 else float("nan")
    kv_ms = [r.server_metrics.get("kv_transfer_ms") for r in ok]
    kv_bytes = [r.server_metrics.get("kv_transfer_bytes") for r in ok]
    kv_rates = [kv_gbps(b, m) for b, m in zip(kv_bytes, kv_ms)]
    have_kv = any(v is not None for v in kv_ms)
    itls = [g for r in ok for g in r.itl_ms]
    return {
        "num_requests": len(records),
        "num_samples": len(ok),
        "num_errors": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "seq_throughput": len(ok) / dur if ok else 0.0,
        "token_throughput": out_tokens / dur if ok else 0.0,
        "input_token_throughput": in_tokens / dur if ok else 0.0,
        "goodput": goodput(records, duration_s, slo_ttft_ms, slo_tpot_ms),
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "ttft_ms": summarize(r.ttft_ms for r in ok),
        "tpot_ms": summarize(r.tpot_ms for r in ok),
        "itl_ms": summarize(itls),
        "e2e_ms": summarize(r.e2e_ms for r in ok),
        "kv_transfer_ms": summarize(kv_ms) if have_kv else None,
        "kv_transfer_gbps": summarize(kv_rates) if have_kv else None,
        "kv_transfer_bytes_total": sum(b for b in kv_bytes if b is not None) if have_kv else None,
        "hops": hop_summary(ok),
    }


DIST_METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "kv_transfer_ms", "kv_transfer_gbps")
SCALAR_METRICS = ("num_requests", "num_samples", "num_errors", "duration_s", "seq_throughput",
                  "token_throughput", "goodput")


def flatten(summary: dict[str, Any]) -> dict[str, Any]:
    """One flat row: scalars as they are, distributions as name_stat (None where a distribution is None)."""
    row: dict[str, Any] = {}
    for k, v in summary.items():
        if k in DIST_METRICS:
            for stat in ("mean", *(f"p{q}" for q in PERCENTILES)):
                row[f"{k}_{stat}"] = None if v is None else v.get(stat)
        elif k == "hops" and v:  # the p50 of each segment and kind of time
            row.update({f"hop_{seg}_p50": x["p50"] for seg, x in v["segments_ms"].items()})
            row.update({f"hop_kind_{kind}_p50": x["p50"] for kind, x in v["kinds_ms"].items()})
            if v.get("handoff_ms"):
                row["hop_handoff_p50"] = v["handoff_ms"]["p50"]
        elif not isinstance(v, (dict, list)):
            row[k] = v
    return row

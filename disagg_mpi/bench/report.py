"""Benchmark output: the side-by-side table, results.json, results.csv, requests.jsonl and PNG plots."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..hops import segment_key
from .metrics import DIST_METRICS, PERCENTILES, flatten

STATS = ("mean", *(f"p{q}" for q in PERCENTILES))

_ROWS: list[tuple[str, str]] = [
    ("num_samples", "num_samples"),
    ("num_errors", "num_errors"),
    ("duration_s", "duration (s)"),
    ("seq_throughput", "seq_throughput (req/s)"),
    ("token_throughput", "token_throughput (tok/s)"),
    ("goodput", "goodput (req/s)"),
]
_DIST_TITLES = {"ttft_ms": "ttft (ms)", "tpot_ms": "tpot (ms)", "itl_ms": "itl (ms)", "e2e_ms": "e2e (ms)",
                "kv_transfer_ms": "kv_transfer (ms)", "kv_transfer_gbps": "kv_transfer (GB/s)"}


def _mode(r: dict[str, Any]) -> str | None:
    """A result's benchmark mode when it is not the default one (runner.MODES: generation-only)."""
    m = r.get("bench_mode", "full")
    return None if m == "full" else m


def load_label(r: dict[str, Any]) -> str:
    parts = [_mode(r)] if _mode(r) else []
    rate = r.get("request_rate")
    if rate is not None:
        parts.append(f"rate={'inf' if math.isinf(rate) else f'{rate:g}'}")
    if r.get("concurrency"):
        parts.append(f"conc={r['concurrency']}")
    return ",".join(parts)


def column_name(r: dict[str, Any], many_loads: bool) -> str:
    if many_loads:
        return f"{r['label']} @{load_label(r)}"
    return r["label"] + (f" ({_mode(r)})" if _mode(r) else "")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf"
        a = abs(v)
        return f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:.3f}"
    return str(v)


def table_rows(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (metric, value per result) of the side-by-side table."""
    loads = {load_label(r) for r in results}
    header = ["metric", *(column_name(r, len(loads) > 1) for r in results)]
    rows = []
    for key, title in _ROWS:
        rows.append([title, *(_fmt(r.get(key)) for r in results)])
    for key in DIST_METRICS:
        if all(r.get(key) is None for r in results):
            rows.append([f"{_DIST_TITLES[key]}", *("-" for _ in results)])
            continue
        for stat in STATS:
            rows.append([f"{_DIST_TITLES[key]} {stat}",
                         *(_fmt(None if r.get(key) is None else r[key].get(stat)) for r in results)])
    return header, rows + hop_rows(results)


def hop_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Where the server's time went (metrics.hop_summary): the p50 of each kind of time, then of each
    segment between hops, for what any result reports (none for servers that report no hops)."""
    hops = [r.get("hops") or {} for r in results]
    kinds = sorted({k for h in hops for k in h.get("kinds_ms", {})})
    segments = sorted({k for h in hops for k in h.get("segments_ms", {})}, key=segment_key)

    def p50(h: dict, part: str, name: str) -> str:
        return _fmt(h.get(part, {}).get(name, {}).get("p50"))

    handoff = ([["KV hand-off p50 (ms)", *(_fmt((h.get("handoff_ms") or {}).get("p50")) for h in hops)]]
               if any(h.get("handoff_ms") for h in hops) else [])
    return (handoff + [[f"server time: {k} p50 (ms)", *(p50(h, "kinds_ms", k) for h in hops)] for k in kinds]
            + [[f"hop {s} p50 (ms)", *(p50(h, "segments_ms", s) for h in hops)] for s in segments])


def format_table(results: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    header, rows = table_rows(results)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    return "\n".join(lines)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


CSV_LEAD = ("label", "config", "url", "bench_mode", "request_rate", "concurrency")


def write_outputs(out_dir: str | Path, results: Sequence[dict[str, Any]], meta: dict[str, Any],
                  request_rows: Sequence[dict[str, Any]], plots: bool = True) -> list[Path]:
    """results.json, results.csv, requests.jsonl, table.md and the plots; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / "results.json"
    p.write_text(json.dumps(_jsonable({**meta, "results": list(results)}), indent=2) + "\n")
    written.append(p)
    flat = [flatten(r) for r in results]
    cols = list(CSV_LEAD)
    for row in flat:
        cols += [k for k in row if k not in cols]
    p = out / "results.csv"
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for row in flat:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    written.append(p)
    p = out / "requests.jsonl"
    with open(p, "w") as f:
        for row in request_rows:
            f.write(json.dumps(_jsonable(row)) + "\n")
    written.append(p)
    p = out / "table.md"
    p.write_text(format_table(results, markdown=True) + "\n")
    written.append(p)
    if plots:
        written += plot_latency_cdfs(out / "latency_cdf.png", results, request_rows)
        written += plot_throughput_vs_load(out / "throughput_vs_load.png", results)
    return written


def _cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def plot_latency_cdfs(path: Path, results: Sequence[dict[str, Any]],
                      request_rows: Sequence[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len({load_label(r) for r in results}) > 1
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("TTFT", "TPOT", "E2E latency")):
        for r in results:
            vals = [q[key] for q in request_rows
                    if q["run"] == r["run"] and q.get("ok") and q.get(key) is not None]
            if vals:
                xs, ys = _cdf(vals)
                ax.step(xs, ys, where="post", label=column_name(r, many))
        ax.set_title(f"{title} CDF")
        ax.set_xlabel(f"{title.split()[0]} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_throughput_vs_load(path: Path, results: Sequence[dict[str, Any]]) -> list[Path]:
    """Only when some configuration ran more than one load point (a sweep)."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in results:   # a line per target and mode
        by_label.setdefault(r["label"] + (f" {_mode(r)}" if _mode(r) else ""), []).append(r)
    if max((len(v) for v in by_label.values()), default=0) < 2:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_rate = len({r.get("request_rate") for r in results}) > 1
    xkey = "request_rate" if sweep_rate else "concurrency"
    xs_all = sorted({r.get(xkey) for r in results}, key=lambda v: (v is None, v))
    pos = {x: i for i, x in enumerate(xs_all)}
    ticks = ["inf" if isinstance(x, float) and math.isinf(x) else f"{x:g}" if isinstance(x, float) else str(x)
             for x in xs_all]
    panels = [("token_throughput", None, "output tokens/s"), ("seq_throughput", None, "requests/s"),
              ("ttft_ms", "p50", "TTFT p50 (ms)"), ("tpot_ms", "p50", "TPOT p50 (ms)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (key, stat, title) in zip(axes, panels):
        for label, rs in by_label.items():
            rs = sorted(rs, key=lambda r: pos[r.get(xkey)])
            ys = [(r.get(key) or {}).get(stat) if stat else r.get(key) for r in rs]
            (line,) = ax.plot([pos[r.get(xkey)] for r in rs], [float("nan") if y is None else y for y in ys],
                              marker="o", label=label)
            if key == "seq_throughput" and any(r.get("goodput") is not None for r in rs):
                ax.plot([pos[r.get(xkey)] for r in rs],
                        [float("nan") if r.get("goodput") is None else r["goodput"] for r in rs],
                        marker="x", linestyle="--", color=line.get_color(), label=f"{label} goodput")
        ax.set_xticks(range(len(xs_all)), ticks)
        ax.set_xlabel("request rate (req/s)" if sweep_rate else "concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]

"""Run a benchmark over targets (configurations to serve, or a running server) and load points."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .client import run_load
from .metrics import aggregate
from .server import ServeProcess
from .workload import BenchRequest

log = logging.getLogger("disagg_mpi.bench")


@dataclass
class Target:
    label: str
    config: str | None = None      # a topology to serve
    url: str | None = None         # or a running server
    requests: list[BenchRequest] | None = None   # overrides BenchSettings.requests (e.g. another vocabulary)
    warmup: list[BenchRequest] | None = None


# What a load point measures. "full": every request prefills and decodes (the serving benchmark).
# "generation-only": no context phase (TensorRT-LLM's generation-only benchmark): each request carries
# `disagg_benchmark: "generation_only"`, so the executor that decodes reserves the prompt's KV without
# computing it and decodes from a fixed first token (meaningless text, real decode cost); TTFT is then
# the wait for a place in the decode batch, TPOT/ITL the decode side alone. The server must allow it
# (serve --allow-benchmark-requests, which `bench` passes to the servers it starts).
MODES = ("full", "generation-only")
_MODE_BODY = {"full": {}, "generation-only": {"disagg_benchmark": "generation_only"}}


def parse_modes(value: str) -> list[str]:
    """'full', 'generation-only' or both, comma-separated (each load point runs in each mode)."""
    modes = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise ValueError(f"--mode {value!r}: give {' or '.join(MODES)}, or both comma-separated, each once")
    return modes


@dataclass
class LoadPoint:
    request_rate: float = math.inf
    concurrency: int | None = None
    mode: str = "full"   # one of MODES

    @property
    def body(self) -> dict[str, Any]:
        """What this mode adds to every request body."""
        return _MODE_BODY[self.mode]


@dataclass
class BenchSettings:
    requests: list[BenchRequest]
    warmup: list[BenchRequest]
    loads: list[LoadPoint]
    seed: int = 0
    temperature: float = 0.0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    request_timeout: float = 600.0
    startup_timeout: float = 900.0
    stop_grace: float = 30.0
    host: str = "127.0.0.1"
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    log_dir: Path | None = None


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled, unit="req", leave=True,
                dynamic_ncols=True)


def run_point(url: str, s: BenchSettings, load: LoadPoint, desc: str) -> tuple[list, float]:
    bar = _bar(len(s.requests), desc, s.progress)
    errors = [0]

    def done(rec):
        if not rec.ok:
            errors[0] += 1
            bar.set_postfix(errors=errors[0])
        bar.update(1)

    try:
        return asyncio.run(run_load(url, s.requests, load.request_rate, load.concurrency, s.seed, s.temperature,
                                    s.request_timeout, {**s.extra_body, **load.body}, s.headers, done))
    finally:
        with contextlib.suppress(OSError):   # the terminal may have hung up (SIGHUP)
            bar.close()


def warm_up(url: str, s: BenchSettings, load: LoadPoint) -> None:
    if not s.warmup:
        return
    conc = load.concurrency or len(s.warmup)
    recs, _ = asyncio.run(run_load(url, s.warmup, math.inf, conc, s.seed, s.temperature, s.request_timeout,
                                   {**s.extra_body, **load.body}, s.headers))
    bad = [r for r in recs if not r.ok]
    if bad:
        log.warning("%d of %d warm-up requests failed: %s", len(bad), len(recs), bad[0].error)


def bench_url(target: Target, url: str, s: BenchSettings, echo: Callable[[str], None],
              results: list | None = None, rows: list | None = None) -> tuple[list, list]:
    """Every load point against `url`; each point's result and request rows are appended to
    `results` / `rows` (new lists by default) as soon as it ends, so an interrupted sweep keeps them."""
    results = [] if results is None else results
    rows = [] if rows is None else rows
    if target.requests is not None:
        s = replace(s, requests=target.requests, warmup=target.warmup or [])
    warm_up(url, s, s.loads[0])
    for load in s.loads:
        desc = f"{target.label}" + (f" {load.mode}" if load.mode != "full" else "")
        if len(s.loads) > 1 or not math.isinf(load.request_rate) or load.concurrency:
            desc += f" rate={load.request_rate:g}" + (f" conc={load.concurrency}" if load.concurrency else "")
        records, duration = run_point(url, s, load, desc)
        summary = aggregate(records, duration, s.slo_ttft_ms, s.slo_tpot_ms)
        mode_tag = "" if load.mode == "full" else f"|{load.mode}"
        run_id = f"{target.label}|{load.request_rate}|{load.concurrency}{mode_tag}"
        res = {"run": run_id, "label": target.label, "config": target.config, "url": url,
               "bench_mode": load.mode, "request_rate": load.request_rate, "concurrency": load.concurrency,
               **summary}
        errors = [r.error for r in records if not r.ok]
        if errors:
            res["first_errors"] = errors[:5]
            echo(f"{target.label}: {len(errors)} of {len(records)} requests failed; first: {errors[0]}")
        mismatch = sum(1 for r in records if r.ok and r.output_tokens != r.output_len_requested)
        if mismatch:
            res["output_len_mismatches"] = mismatch
            echo(f"{target.label}: {mismatch} requests returned a different number of tokens than asked "
                 "(does the server honour ignore_eos?)")
        for r in records:
            rows.append({"run": run_id, "label": target.label, "bench_mode": load.mode,
                         "request_rate": load.request_rate, "concurrency": load.concurrency, **r.to_dict()})
        results.append(res)
        echo(point_line(desc, res))
    return results, rows


def point_line(desc: str, res: dict[str, Any]) -> str:
    """One line per finished load point (a long sweep shows its progress, and what it had if cut)."""
    def p50(key: str) -> str:
        v = (res.get(key) or {}).get("p50")
        return "-" if v is None else f"{v:.1f}"

    line = (f"{desc}: {res.get('token_throughput', 0.0):.1f} tok/s, TTFT p50 {p50('ttft_ms')} ms, "
            f"TPOT p50 {p50('tpot_ms')} ms")
    if res.get("goodput") is not None:
        line += f", goodput {res['goodput']:.2f} req/s"
    return line + (f", {res['num_errors']} errors" if res.get("num_errors") else "")


def run_benchmark(targets: Sequence[Target], s: BenchSettings, echo: Callable[[str], None] = print,
                  results: list | None = None, rows: list | None = None,
                  servers: list | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """Every target in turn (serving configs one at a time); returns (results, request rows, server
    info). Given lists are filled as points end: after an interrupt they hold what finished."""
    results = [] if results is None else results
    rows = [] if rows is None else rows
    servers = [] if servers is None else servers
    for t in targets:
        if t.url:
            bench_url(t, t.url, s, echo, results, rows)
            continue
        log_path = (s.log_dir / f"serve-{_safe(t.label)}.log") if s.log_dir else None
        allow = ("--allow-benchmark-requests",) if any(ld.mode != "full" for ld in s.loads) else ()
        srv = ServeProcess(t.config, log_path, host=s.host, startup_timeout=s.startup_timeout, grace=s.stop_grace,
                           extra_args=allow)
        echo(f"{t.label}: starting disagg-mpi serve --config {t.config}")
        try:
            with srv:
                echo(f"{t.label}: serving on {srv.url}")
                bench_url(t, srv.url, s, echo, results, rows)
        finally:
            rc = srv.proc.returncode if srv.proc else None
            echo(f"{t.label}: server stopped (exit code {rc})")
            servers.append({"label": t.label, "config": t.config, "exit_code": rc, "clean_exit": srv.clean_exit,
                            "log": str(srv.log_path) if log_path else None})
    return results, rows, servers


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)

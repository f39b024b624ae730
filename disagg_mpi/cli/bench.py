"""`disagg-mpi bench`: the serving benchmark (the counterpart of TensorRT-LLM's disaggServerBenchmark).

For each `--config` in turn it starts `disagg-mpi serve` on a free port, waits
for `/health`, drives the workload through `POST /v1/completions` (streaming,
`ignore_eos`), stops the server with SIGTERM, and finally prints the
configurations side by side. `--url` benchmarks a server that is already
running instead. `--mode generation-only` times the decode side alone (no
context phase: bench/runner.py MODES).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import click


def _parse_kv_json(value: str | None, what: str) -> dict:
    if not value:
        return {}
    try:
        d = json.loads(value)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"{what} is not valid JSON: {err.msg}") from None
    if not isinstance(d, dict):
        raise click.BadParameter(f"{what} must be a JSON object")
    return d


@click.command()
@click.option("--config", "configs", multiple=True, type=click.Path(),
              help="YAML topology to serve and benchmark; repeat to compare several.")
@click.option("--label", "labels", multiple=True, help="Name of each --config/--url in the table (in order).")
@click.option("--url", "urls", multiple=True, help="Benchmark a running server (http://host:port) instead.")
@click.option("--model", "model_spec", default=None,
              help="Tokenizer/vocabulary for the workload (default: the config's model; smollm2 with --url).")
@click.option("--dataset", type=click.Path(), default=None,
              help="JSONL (prompt | messages | input_ids [, max_tokens] per line) or ShareGPT JSON.")
@click.option("--num-requests", type=int, default=32, show_default=True)
@click.option("--input-len", type=int, default=256, show_default=True, help="Synthetic prompt tokens.")
@click.option("--output-len", type=int, default=None,
              help="Output tokens per request [default: 32; with --dataset, the data's own lengths].")
@click.option("--input-len-dist", default=None,
              help="Instead of --input-len: uniform:A:B | normal:MU:SIGMA | lognormal:MEAN:SD | exponential:MEAN.")
@click.option("--output-len-dist", default=None, help="Instead of --output-len, as --input-len-dist.")
@click.option("--shared-prefix-ratio", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of every synthetic prompt that is one common prefix.")
@click.option("--max-input-len", type=int, default=None, help="Dataset: skip longer prompts.")
@click.option("--max-output-len", type=int, default=None, help="Dataset: cap output lengths.")
@click.option("--request-rate", default=None,
              help="Poisson arrivals in req/s; 'inf' sends all at once; '1,2,4' sweeps. [default: inf]")
@click.option("--concurrency", default=None, help="At most this many requests in flight; '1,4,8' sweeps.")
@click.option("--mode", "mode", default="full", show_default=True,
              help="full: every request prefills and decodes. generation-only: no context phase (TensorRT-LLM's "
                   "generation-only benchmark): the decoding executor reserves each prompt's KV without computing "
                   "it, so TTFT is the wait for the decode batch and TPOT/ITL the decode side alone (meaningless "
                   "text); started servers get --allow-benchmark-requests, a --url server must allow it. "
                   "'full,generation-only' runs both.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Uncounted requests sent first.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True)
@click.option("--slo-ttft-ms", type=float, default=None, help="Goodput SLO on time to first token.")
@click.option("--slo-tpot-ms", type=float, default=None, help="Goodput SLO on time per output token.")
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="Write results.json, results.csv, requests.jsonl, table.md, PNG plots and server logs here.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG plots.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface the started servers bind.")
@click.option("--startup-timeout", type=float, default=900.0, show_default=True,
              help="Seconds a started server may take to become healthy.")
@click.option("--stop-grace", type=float, default=30.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when stopping a server.")
@click.option("--request-timeout", type=float, default=600.0, show_default=True)
@click.option("--extra-body", default=None, help="JSON merged into every request body.")
@click.option("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
@click.option("--prompt-format", type=click.Choice(["auto", "ids", "text"]), default="auto", show_default=True,
              help="--url targets: send prompts as token ids or as text (decoded with --model's tokenizer); "
                   "auto asks each server with one 1-token request (llama.cpp's server takes text only).")
@click.option("--log-level", default="warning", type=click.Choice(["debug", "info", "warning", "error"]))
def bench(configs, labels, urls, model_spec, dataset, num_requests, input_len, output_len, input_len_dist,
          output_len_dist, shared_prefix_ratio, max_input_len, max_output_len, request_rate, concurrency, mode,
          warmup, seed, temperature, slo_ttft_ms, slo_tpot_ms, out_dir, no_plots, no_progress, host,
          startup_timeout, stop_grace, request_timeout, extra_body, api_key, log_level, prompt_format):
    """Benchmark serving: each --config served in turn (or --url), one workload, a side-by-side table."""
    from .common import require_extra

    require_extra("bench", "aiohttp", "matplotlib")
    import logging

    from ..bench.runner import BenchSettings, LoadPoint, Target, parse_modes
    from ..bench.workload import parse_int_list, parse_rates

    logging.basicConfig(level=getattr(logging, log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    if not configs and not urls:
        raise click.UsageError("give --config (one or more) or --url")
    if num_requests < 1:
        raise click.BadParameter("must be >= 1", param_hint="--num-requests")
    names = [*configs, *urls]
    if labels and len(labels) != len(names):
        raise click.BadParameter(f"{len(labels)} labels for {len(names)} targets; give one per --config/--url "
                                 "(configs first, then urls)", param_hint="--label")
    try:
        rates = parse_rates(request_rate) if request_rate else [math.inf]
        concs = parse_int_list(concurrency, "--concurrency") if concurrency else [None]
        modes = parse_modes(mode)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None
    loads = [LoadPoint(r, c, m) for m in modes for r in rates for c in concs]

    targets = _targets(configs, urls, labels, Target)
    workload_meta = {"num_requests": num_requests, "seed": seed, "warmup": warmup, "temperature": temperature,
                     "modes": modes}
    workload_meta.update(_attach_workloads(
        targets, model_spec, lambda spec: _workload(spec, dataset, num_requests, warmup, input_len, output_len,
                                                    input_len_dist, output_len_dist, shared_prefix_ratio,
                                                    max_input_len, max_output_len, seed)))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for t in targets:
        if t.url and _prompts_as_text(t, prompt_format, headers):
            _as_text(t, _model_of(t, model_spec))

    out = Path(out_dir) if out_dir else None
    settings = BenchSettings(
        requests=[], warmup=[], loads=loads, seed=seed, temperature=temperature, slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms, request_timeout=request_timeout, startup_timeout=startup_timeout,
        stop_grace=stop_grace, host=host, extra_body=_parse_kv_json(extra_body, "--extra-body"),
        headers=headers, progress=not no_progress,
        log_dir=out)
    click.echo(f"workload: {workload_meta['workload']}, {num_requests} requests (+{warmup} warm-up), "
               f"mean input {workload_meta['mean_input_len']:.0f} / output {workload_meta['mean_output_len']:.0f} "
               f"tokens; load points: " + "; ".join(_load_desc(ld) for ld in loads), err=True)
    _run_and_report(targets, settings, workload_meta, slo_ttft_ms, slo_tpot_ms, out, no_plots)


def _prompts_as_text(target, prompt_format: str, headers: dict[str, str]) -> bool:
    if prompt_format != "auto":
        return prompt_format == "text"
    import asyncio

    from ..bench.client import takes_token_ids

    ids = asyncio.run(takes_token_ids(target.url, headers))
    _say(f"{target.label}: the server {'takes token ids' if ids else 'refuses token ids: sending text prompts'}")
    return not ids


def _as_text(target, spec: str) -> None:
    """Give the target's requests their prompts as text (its server takes no token ids)."""
    import dataclasses

    from ..model.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    target.requests = [dataclasses.replace(r, prompt_text=tok.decode(r.prompt_ids)) for r in target.requests]
    target.warmup = [dataclasses.replace(r, prompt_text=tok.decode(r.prompt_ids)) for r in target.warmup or []]


def _targets(configs, urls, labels, target_cls) -> list:
    """One target per --config (served in turn) and per --url, labelled."""
    targets = []
    for i, cfg in enumerate(configs):
        targets.append(target_cls(labels[i] if labels else Path(cfg).stem, config=cfg))
    for j, url in enumerate(urls):
        label = labels[len(configs) + j] if labels else url
        targets.append(target_cls(label, url=url if "://" in url else f"http://{url}"))
    if len({t.label for t in targets}) != len(targets):
        raise click.BadParameter("labels must differ; pass --label for each target", param_hint="--label")
    return targets


def _model_of(target, model_spec: str | None) -> str:
    if model_spec:
        return model_spec
    if not target.config:
        return "smollm2"
    from ..config import ConfigError, load_topology

    try:
        return load_topology(target.config).model.path
    except ConfigError as err:
        raise click.ClickException(str(err)) from None


def _attach_workloads(targets: list, model_spec: str | None, make) -> dict:
    """Give each target the workload of its model (one per model: a workload per vocabulary);
    returns the workload's description for the results."""
    meta: dict = {}
    cache: dict[str, tuple] = {}
    for t in targets:
        spec = _model_of(t, model_spec)
        if spec not in cache:
            try:
                cache[spec] = make(spec)
            except (ValueError, FileNotFoundError) as err:
                raise click.ClickException(str(err)) from None
        t.requests, t.warmup, desc = cache[spec]
        meta.setdefault("workload", desc)
    first = targets[0].requests
    meta.update(mean_input_len=sum(r.input_len for r in first) / len(first),
                mean_output_len=sum(r.output_len for r in first) / len(first))
    return meta


def _run_and_report(targets, settings, workload_meta: dict, slo_ttft_ms, slo_tpot_ms, out: Path | None,
                    no_plots: bool) -> None:
    """Run every load point on every target; write the files and print the table, even when
    interrupted (then exit 130); exit 1 if any request failed."""
    from ..bench.report import format_table, write_outputs
    from ..bench.runner import run_benchmark
    from ..bench.server import ServerError

    started = time.time()
    load_before = _loadavg()
    results, rows, servers = [], [], []
    interrupted = False
    restore = _interrupt_on_signals()
    try:
        try:
            run_benchmark(targets, settings, _say, results, rows, servers)
        except ServerError as err:
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: keep the load points that finished
            if not results:
                raise
            interrupted = True
            _say(f"interrupted: reporting the {len(results)} load point(s) that finished")
        if out is not None:  # files first: after a hang-up the terminal may be gone
            meta = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": "disagg-mpi " + " ".join(sys.argv[1:]), "wall_s": time.time() - started,
                    "workload": workload_meta, "servers": servers,
                    "host": {"cpu_count": os.cpu_count(), "loadavg_before": load_before,
                             "loadavg_after": _loadavg(), "platform": platform.platform()},
                    "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms}, "interrupted": interrupted}
            paths = write_outputs(out, results, meta, rows, plots=not no_plots)
            _say("wrote " + ", ".join(str(p) for p in paths))
        with contextlib.suppress(OSError):
            click.echo(format_table(results))
    finally:
        restore()
    if interrupted:
        sys.exit(130)
    if any(r["num_errors"] for r in results):
        sys.exit(1)


def _say(message: str) -> None:
    """Progress on stderr; a terminal that hung up (SIGHUP) does not end the run."""
    with contextlib.suppress(OSError):
        click.echo(message, err=True)


def _interrupt_on_signals():
    """Ctrl-C, SIGTERM and SIGHUP (a `timeout`, a job scheduler, a closed terminal) interrupt the run
    (KeyboardInterrupt), so the servers it started, which run in sessions of their own and would
    otherwise live on holding their GPUs, are stopped on the way out. Later signals are ignored
    until then, so the stopping is not cut short. Returns what restores the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.getsignal(s) for s in sigs}

    def interrupt(_sig, _frame):
        for s in sigs:
            signal.signal(s, signal.SIG_IGN)
        raise KeyboardInterrupt

    for s in sigs:
        signal.signal(s, interrupt)

    def restore() -> None:
        for s, handler in old.items():
            signal.signal(s, handler)

    return restore


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _load_desc(ld) -> str:
    rate = "inf" if math.isinf(ld.request_rate) else f"{ld.request_rate:g}"
    mode = f"{ld.mode}, " if ld.mode != "full" else ""
    return f"{mode}rate {rate} req/s" + (f", concurrency {ld.concurrency}" if ld.concurrency else "")


def _workload(spec, dataset, num_requests, warmup, input_len, output_len, input_len_dist, output_len_dist,
              shared_prefix_ratio, max_input_len, max_output_len, seed):
    from ..bench.workload import dataset_requests, load_dataset_entries, parse_dist, synthetic_requests
    from ..model.tokenizer import load_tokenizer

    tok = load_tokenizer(spec)
    if dataset:
        entries = load_dataset_entries(dataset)
        reqs = dataset_requests(entries, tok, num_requests, output_len, seed, max_input_len, max_output_len)
        wu = dataset_requests(entries, tok, warmup, output_len, seed + 1, max_input_len,
                              max_output_len) if warmup else []
        return reqs, wu, f"dataset {dataset}"
    in_d = parse_dist(input_len_dist or input_len)
    out_d = parse_dist(output_len_dist or (output_len if output_len is not None else 32))
    specials = [tok.bos_token_id, *tok.eos_token_ids]
    vocab = tok.vocab_size
    try:   # ids the model can embed (the server refuses others)
        from ..model.loader import load_model_config

        vocab = min(vocab, load_model_config(spec).vocab_size)
    except Exception as err:  # noqa: BLE001 - the tokenizer's size is a fine fallback
        logging.getLogger("disagg_mpi.bench").debug("no model config for %s (%s); vocab from the tokenizer",
                                                    spec, err)
    reqs = synthetic_requests(num_requests, in_d, out_d, vocab, seed, shared_prefix_ratio, specials)
    wu = synthetic_requests(warmup, in_d, out_d, vocab, seed + 1, shared_prefix_ratio,
                            specials) if warmup else []
    desc = f"synthetic input {in_d} output {out_d}"
    if shared_prefix_ratio:
        desc += f" shared prefix {shared_prefix_ratio:g}"
    return reqs, wu, desc

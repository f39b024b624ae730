"""`disagg-mpi run`: a batch of JSONL requests through the topology.

It starts its own `mpiexec -n N` when not already inside an MPI job, so a user types one
command; inside a job (mpiexec, srun) it runs directly.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click

from .common import check_model_or_exit, inside_mpi_job, load_topology_or_exit, relaunch, setup_logging


@click.command()
@click.option("--config", "config", required=True, type=click.Path(), help="YAML topology (see configs/).")
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="JSONL requests: {id, prompt|messages|input_ids, max_tokens, ...} per line.")
@click.option("--output", "output_path", type=click.Path(), default=None,
              help="JSONL results, one line per input line; printed as text when left out.")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="After SIGINT/SIGTERM/SIGUSR2, seconds to let in-flight requests finish before cancelling "
                   "the rest.")
@click.option("--log-level", default="warning", type=click.Choice(["debug", "info", "warning", "error"]))
def run(config: str, input_path: str, output_path: str | None, timeout: float | None, grace: float,
        log_level: str) -> None:
    """Run a batch of requests through the topology and exit."""
    topo = load_topology_or_exit(config)
    if not Path(input_path).is_file():
        raise click.ClickException(f"input file {input_path!r} does not exist")
    if not inside_mpi_job():
        check_model_or_exit(topo)
        sys.exit(relaunch(topo.world_size, sys.argv[1:]))
    setup_logging(log_level)
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() != topo.world_size:
        raise click.ClickException(f"this MPI job has {MPI.COMM_WORLD.Get_size()} ranks but {config} needs "
                                   f"{topo.world_size}")
    from ..spmd import launch

    drain = _drain_on_signals(MPI.COMM_WORLD.Get_rank(), grace)
    with launch(topo) as orch:
        if orch is not None:
            _run_batch(orch, topo, input_path, output_path, timeout, drain)


def _drain_on_signals(rank: int, grace: float):
    """SIGINT/SIGTERM/SIGUSR2: rank 0 lets requests run `grace` more seconds, then cancels the rest.

    The launcher passes the signal to every rank (runtime/signals.py); only rank 0 acts on it,
    the executor ranks keep serving until rank 0 leaves the job cleanly.
    """
    from ..runtime import signals

    if rank != 0:
        signals.ignore_stop_signals()
        return lambda: False
    deadline: list[float] = []

    def on_signal(sig, _frame):
        if not deadline:
            click.echo(f"disagg-mpi: {signal.Signals(sig).name}: finishing in-flight requests for up to "
                       f"{grace:g} s, then cancelling the rest", err=True)
            deadline.append(time.perf_counter() + grace)

    for s in signals.STOP_SIGNALS:
        signal.signal(s, on_signal)
    early = signals.requested()
    if early is not None:  # asked during start-up: the grace runs from then
        when, sig = early
        on_signal(sig, None)
        deadline[0] -= time.monotonic() - when
    return lambda: bool(deadline) and time.perf_counter() >= deadline[0]


def _run_batch(orch, topo, input_path: str, output_path: str | None, timeout: float | None,
               cancel_when=None) -> None:
    from ..api import RequestError
    from ..jobs import LineError, output_line, parse_line
    from ..model.tokenizer import load_tokenizer
    from ..orchestrator.admission import check_request, model_limits
    from ..stops import follow_stops

    tok = load_tokenizer(topo.model.path)
    limits = model_limits(str(topo.model.path))
    lines, order, requests, ids = [], [], [], []
    with open(input_path) as f:
        raw_lines = [ln for ln in f.read().splitlines() if ln.strip()]
    results: dict[int, dict] = {}
    for n, raw in enumerate(raw_lines, 1):
        try:
            line_id, req = parse_line(raw, n, tok)
            try:  # rank 0's edge check, line by line: the orchestrator refuses a batch holding a bad one
                check_request(req, limits)
            except RequestError as err:
                raise LineError(line_id, str(err)) from None
            requests.append(req)
            ids.append((n, line_id))
        except LineError as err:
            results[n] = output_line(err.line_id, None, tok, error=str(err))
        order.append(n)
    for (n, line_id), req in zip(ids, requests):
        req.client_id = f"{line_id}#{n}"  # unique, so that stop strings find their line's responses
    outputs, on_response = follow_stops(tok, requests, orch.cancel_request)
    t0 = time.perf_counter()
    responses = orch.generate(requests, timeout=timeout, cancel_when=cancel_when,
                              on_response=on_response) if requests else []
    wall = time.perf_counter() - t0
    for (n, line_id), req, resp in zip(ids, requests, responses):
        out = outputs.get(req.client_id)
        if out is not None and (out.stopped or resp.error_msg is None):
            results[n] = output_line(line_id, out.final_response(resp), tok, text=out.text)
        else:
            results[n] = output_line(line_id, resp, tok)
    lines = [results[n] for n in order]
    if output_path:
        with open(output_path, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    ok = sum(1 for ln in lines if ln["error"] is None)
    gen_tokens = sum(len(ln["output_ids"]) for ln in lines)
    if not output_path:
        for ln in lines:
            _print_line(ln, topo)
    click.echo(f"{ok}/{len(lines)} requests ok, {gen_tokens} tokens in {wall:.2f} s "
               f"({gen_tokens / max(wall, 1e-9):.1f} tokens/s)" + (f"; results in {output_path}" if output_path else ""))


def _print_line(ln: dict, topo) -> None:
    m = ln["metrics"]
    if ln["error"]:
        click.echo(f"[{ln['id']}] error: {ln['error']}")
        return
    if "context_executor" in m:
        ctx, gen = m["context_executor"], m.get("generation_executor", m["context_executor"])
        where = (f"context on executor {ctx} (ranks {topo.executors[ctx].participant_ids}) -> "
                 f"generation on executor {gen} (ranks {topo.executors[gen].participant_ids}), "
                 f"KV {m.get('kv_transfer_bytes', 0) / 1024:.0f} KiB in {m.get('kv_transfer_ms', 0):.1f} ms")
    else:
        gen = m.get("generation_executor", 0)
        where = f"both phases on executor {gen} (ranks {topo.executors[gen].participant_ids})"
    click.echo(f"[{ln['id']}] {where}; ttft {m.get('ttft_ms', 0):.0f} ms, {ln['finish_reason']}")
    click.echo(f"    {ln['text']!r}")
    if ln.get("hops_ms"):  # where the time went (docs/architecture.md, "Lifecycle of a request")
        click.echo("    hops (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in ln["hops_ms"].items()))

"""`disagg-mpi`: the command line.

`run` (and `serve`) start their own `mpiexec -n N` when they are not already
inside an MPI job, so a user types one command; inside a job (mpiexec, srun)
they run directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from .config import ConfigError, load_topology

_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def inside_mpi_job() -> bool:
    """Started by a launcher? Decided from the environment, before MPI initialises."""
    return any(v in os.environ for v in _MPI_ENV)


def mpiexec_path() -> str:
    """The mpiexec of this environment (the mpich wheel puts one beside python)."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec") or shutil.which("mpirun")
    if not found:
        raise click.ClickException("no mpiexec found: pip install mpich (or load your cluster's MPI)")
    return found


def relaunch(world_size: int, args: list[str]) -> int:
    """Run this CLI again under `mpiexec -n world_size`; returns its exit code.

    The job's output passes through as it comes; if the job fails, the rank
    that died is named (mpiexec itself only names a PID).
    """
    import tempfile
    import threading

    from .runtime import rankmap, signals

    mpiexec = mpiexec_path()
    family = signals.probe_launcher(mpiexec)
    cmd = [mpiexec, "-n", str(world_size), sys.executable, "-m", "mpi4py", "-m", "disagg_mpi.cli", *args]
    with tempfile.TemporaryDirectory(prefix="disagg-ranks-") as folder:
        env = {**os.environ, rankmap.ENV: folder}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace", preexec_fn=signals.stop_with_parent)  # noqa: PLW1509
        tail: list[str] = []

        def pump(src, dst) -> None:
            for line in src:
                dst.write(line)
                dst.flush()
                tail.append(line)
                del tail[:-200]

        threads = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, sys.stderr), daemon=True)]
        watcher = rankmap.Watcher(folder)
        threads.append(threading.Thread(target=watcher.run, daemon=True))
        for t in threads:
            t.start()
        def forward(sig, _frame):  # the launcher passes it to the ranks: rank 0 drains, then all exit
            if proc.poll() is None:
                proc.send_signal(signals.for_launcher(sig, family))

        previous = {s: signal.signal(s, forward) for s in signals.STOP_SIGNALS}
        try:
            rc = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        watcher.stop()
        for t in threads:
            t.join(timeout=5)
        if rc != 0:
            msg = watcher.explain(rc)
            if msg:
                click.echo(msg, err=True)
        return rc


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")


def _load_topology_or_exit(config: str):
    try:
        return load_topology(config)
    except ConfigError as err:
        raise click.ClickException(str(err)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="disagg-mpi")
def cli() -> None:
    """Disaggregated LLM serving: context and generation executors in one MPI job."""
    if inside_mpi_job():
        from .runtime import signals

        signals.catch_early(os.environ)


@cli.command()
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
    topo = _load_topology_or_exit(config)
    if not Path(input_path).is_file():
        raise click.ClickException(f"input file {input_path!r} does not exist")
    if not inside_mpi_job():
        _fetch_if_default(topo.model.path)
        sys.exit(relaunch(topo.world_size, sys.argv[1:]))
    _setup_logging(log_level)
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() != topo.world_size:
        raise click.ClickException(f"this MPI job has {MPI.COMM_WORLD.Get_size()} ranks but {config} needs "
                                   f"{topo.world_size}")
    from .runtime.launch import launch

    drain = _drain_on_signals(MPI.COMM_WORLD.Get_rank(), grace)
    with launch(topo) as orch:
        if orch is not None:
            _run_batch(orch, topo, input_path, output_path, timeout, drain)


def _drain_on_signals(rank: int, grace: float):
    """SIGINT/SIGTERM/SIGUSR2: rank 0 lets requests run `grace` more seconds, then cancels the rest.

    The launcher passes the signal to every rank (runtime/signals.py); only rank 0 acts on it,
    the executor ranks keep serving until rank 0 leaves the job cleanly.
    """
    from .runtime import signals

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
    from .jobs import LineError, output_line, parse_line
    from .model.tokenizer import load_tokenizer
    from .stops import follow_stops

    tok = load_tokenizer(topo.model.path)
    lines, order, requests, ids = [], [], [], []
    with open(input_path) as f:
        raw_lines = [ln for ln in f.read().splitlines() if ln.strip()]
    results: dict[int, dict] = {}
    for n, raw in enumerate(raw_lines, 1):
        try:
            line_id, req = parse_line(raw, n, tok)
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


def _fetch_if_default(path: str) -> None:
    from .model.registry import DEFAULTS, default_model_path

    if path in DEFAULTS:
        try:
            default_model_path(path)
        except RuntimeError as err:
            raise click.ClickException(str(err)) from None


@cli.group()
def model() -> None:
    """Manage models (the embedded default is smollm2)."""


@model.command("fetch")
@click.argument("name", default="smollm2")
def model_fetch(name: str) -> None:
    """Download a registered model into the user cache (done automatically on first use)."""
    from .model.registry import default_model_path

    try:
        click.echo(default_model_path(name))
    except (RuntimeError, ValueError) as err:
        raise click.ClickException(str(err)) from None


@model.command("info")
@click.argument("spec", default="smollm2")
def model_info(spec: str) -> None:
    """Print a model's shape (smollm2, a HF folder, a .gguf file or random:<preset>)."""
    from dataclasses import asdict

    from .model.loader import load_model_config

    try:
        click.echo(json.dumps(asdict(load_model_config(spec)), indent=2))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None


def require_extra(extra: str, *modules: str) -> None:
    """A clear error when an optional dependency group is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(f"this command needs {', '.join(missing)}: pip install 'disagg-mpi[{extra}]'")


def main() -> None:
    cli()


def _register_commands() -> None:
    """Commands that live in their own modules (they import their heavy dependencies lazily)."""
    from .cli_bench import bench
    from .cli_serve import serve
    from .cli_slurm import slurm, validate

    for command in (serve, bench, slurm, validate):
        cli.add_command(command)


if __name__ == "__main__":
    # `python -m disagg_mpi.cli` (how ranks are started): run the package's module, not this
    # copy of it, so the command modules and this one import each other once.
    from disagg_mpi.cli import main as _main

    _main()
else:
    _register_commands()

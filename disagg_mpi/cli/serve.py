"""`disagg-mpi serve`: the OpenAI-compatible HTTP server (rank 0) over the executors."""

from __future__ import annotations

import signal
import sys

import click

from .common import (
    check_model_or_exit,
    inside_mpi_job,
    load_topology_or_exit,
    relaunch,
    require_extra,
    setup_logging,
)


def _say(msg: str) -> None:
    """Start-up takes 20-30 s on CPU (more with graphs on GPU): say what is happening meanwhile."""
    click.echo(f"disagg-mpi serve: {msg}", err=True)


@click.command()
@click.option("--config", "config", required=True, type=click.Path(), help="YAML topology (see configs/).")
@click.option("--host", default=None, help="Address to bind (default: server.host of the config, 127.0.0.1).")
@click.option("--port", type=int, default=None,
              help="TCP port (default: server.port of the config, 8000); 0 picks a free one.")
@click.option("--api-key", default=None, envvar="DISAGG_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (default: server.api_key of the config).")
@click.option("--port-file", type=click.Path(), default=None, help="Write the bound port to this file once ready.")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="Seconds to let in-flight requests finish after SIGINT/SIGTERM/SIGUSR2 before cancelling them.")
@click.option("--served-model-name", default=None, help="The model name clients use (default: model.path).")
@click.option("--allow-benchmark-requests", is_flag=True,
              help="Take generation-only benchmark requests (the disagg_benchmark field; `disagg-mpi bench --mode "
                   "generation-only`): they hold KV blocks without computing them, so leave this off for the public "
                   "(default: server.allow_benchmark_requests of the config, false).")
@click.option("--log-level", default="warning", type=click.Choice(["debug", "info", "warning", "error"]))
def serve(config: str, host: str | None, port: int | None, api_key: str | None, port_file: str | None,
          grace: float, served_model_name: str | None, allow_benchmark_requests: bool, log_level: str) -> None:
    """Serve the topology over an OpenAI-compatible HTTP API until SIGINT/SIGTERM/SIGUSR2.

    Under a hand-started Open MPI `mpirun`, send SIGUSR2 to drain: its SIGTERM kills the job.

    Endpoints: POST /v1/completions, POST /v1/chat/completions (stream: true for
    server-sent events), GET /v1/models, GET /health, GET /metrics (Prometheus).
    """
    require_extra("serve", "aiohttp", "prometheus_client")
    topo = load_topology_or_exit(config)
    if allow_benchmark_requests:
        topo = topo.model_copy(update={"server": topo.server.model_copy(update={"allow_benchmark_requests": True})})
    if port is not None and not 0 <= port <= 65535:
        raise click.ClickException(f"--port {port} must be in 0..65535")
    if not inside_mpi_job():
        check_model_or_exit(topo)
        _say(f"starting {topo.world_size} ranks with mpiexec (rank 0: the HTTP server and orchestrator; "
             f"ranks 1-{topo.world_size - 1}: the executors of {config})")
        sys.exit(relaunch(topo.world_size, sys.argv[1:]))
    setup_logging(log_level)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() != topo.world_size:
        raise click.ClickException(f"this MPI job has {world.Get_size()} ranks but {config} needs "
                                   f"{topo.world_size}")
    from ..runtime import signals

    if world.Get_rank() != 0:
        # The launcher passes stop signals to every rank; only rank 0 acts on them (it drains,
        # then tells the executors to stop), so the executors keep serving until then.
        signals.ignore_stop_signals()
    else:
        # Until the server loop installs its handlers, a signal just means "stop after startup".
        for s in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(s, signal.default_int_handler)
    import asyncio

    from ..spmd import launch

    s = topo.server
    with launch(topo, progress=_say) as orch:
        if orch is not None and signals.requested() is not None:  # asked before the handlers were in
            click.echo("disagg-mpi: asked to stop during start-up; not serving", err=True)
        elif orch is not None:
            from ..serve.app import serve_async

            try:
                asyncio.run(serve_async(orch, topo, host or s.host, s.port if port is None else port,
                                        api_key if api_key is not None else s.api_key, port_file, grace,
                                        served_model_name))
            except KeyboardInterrupt:
                pass

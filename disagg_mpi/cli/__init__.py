"""`disagg-mpi`: the command line. One module a command (run, serve, bench, model, slurm and
validate); `common.py` holds what they share. Commands import their heavy dependencies lazily."""

from __future__ import annotations

import os

import click

from .bench import bench
from .common import inside_mpi_job
from .model import model
from .run import run
from .serve import serve
from .slurm import slurm, validate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="disagg-mpi")
def cli() -> None:
    """Disaggregated LLM serving: context and generation executors in one MPI job."""
    if inside_mpi_job():
        from ..runtime import signals

        signals.catch_early(os.environ)


for _command in (run, serve, bench, model, slurm, validate):
    cli.add_command(_command)


def main() -> None:
    cli()

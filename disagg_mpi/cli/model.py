"""`disagg-mpi model`: fetch the default model, print a model's shape."""

from __future__ import annotations

import json

import click


@click.group()
def model() -> None:
    """Manage models (the embedded default is smollm2)."""


@model.command("fetch")
@click.argument("name", default="smollm2")
def model_fetch(name: str) -> None:
    """Download a registered model into the user cache (done automatically on first use)."""
    from ..model.registry import default_model_path

    try:
        click.echo(default_model_path(name))
    except (RuntimeError, ValueError) as err:
        raise click.ClickException(str(err)) from None


@model.command("info")
@click.argument("spec", default="smollm2")
def model_info(spec: str) -> None:
    """Print a model's shape (smollm2, a HF folder, a .gguf file or random:<preset>)."""
    from dataclasses import asdict

    from ..model.loader import load_model_config

    try:
        click.echo(json.dumps(asdict(load_model_config(spec)), indent=2))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None

"""`disagg-mpi slurm` and `disagg-mpi validate`.

Both are plain click commands that `disagg_mpi.cli` registers; neither starts MPI ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..config import ConfigError, Topology, check_model, load_topology
from ..placement import default_gpus_per_node, plan_placement
from ..slurm import options_from_environment, render_sbatch
from .common import EXIT_BAD_CONFIG


def summary_line(topology: Topology) -> str:
    """One line: the world size, then each executor's role, TP/PP and ranks."""
    n_ctx = len(topology.context_executors)
    parts = []
    for i, ex in enumerate(topology.executors):
        name = f"context[{i}]" if i < n_ctx else f"generation[{i - n_ctx}]"
        where = f" gpus {ex.device_ids}" if ex.device_ids is not None else ""
        ranks = ",".join(str(r) for r in ex.participant_ids)
        ep = f" EP={ex.expert_parallel_size}" if ex.expert_parallel_size > 1 else ""
        parts.append(f"{name} TP={ex.tensor_parallel_size}{ep} PP={ex.pipeline_parallel_size} "
                     f"ranks {ranks}{where}")
    mode = "disaggregated" if topology.disaggregated else "aggregated"
    return f"ok: world size {topology.world_size} ({mode}; rank 0 orchestrator; " + "; ".join(parts) + ")"


def expert_lines(topology: Topology, num_experts: int, moe_ffn: int) -> list[str]:
    """One line per executor with expert parallelism: which ranks hold which experts."""
    from ..model.expert_parallel import describe_layout

    n_ctx, out = len(topology.context_executors), []
    for i, ex in enumerate(topology.executors):
        tp, ep = ex.tensor_parallel_size, ex.expert_parallel_size
        if ep > 1:
            name = f"context[{i}]" if i < n_ctx else f"generation[{i - n_ctx}]"
            stages = [ex.participant_ids[s:s + tp] for s in range(0, len(ex.participant_ids), tp)]
            out.append(f"  {name} {describe_layout(tp, ep, num_experts, moe_ffn, stages)}")
    return out


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_CONFIG)


def _load(config: str) -> Topology:
    try:
        return load_topology(config)
    except ConfigError as err:
        _fail(str(err))
        raise AssertionError("unreachable") from None


@click.command("validate")
@click.option("--config", "config", required=True, metavar="CONFIG", help="Topology YAML file.")
@click.option("--world-size", type=int, default=None, metavar="N",
              help="Also require this MPI world size (e.g. \"$SLURM_NTASKS\" in a batch script).")
def validate(config: str, world_size: int | None) -> None:
    """Check a topology without starting anything.

    Prints a one-line summary (world size, every executor's TP/PP and ranks), then for each
    executor with expert_parallel_size > 1 which ranks hold which experts.
    Exits 2 with the reason on a bad config; on a model that is missing or that we do
    not support (its architecture, options or checkpoint tensor names, read without
    loading weights); on a TP, PP or layer_split the model cannot take (TP must divide
    its heads, layer_split must add up to its layers; expert_parallel_size must divide TP and
    the expert count, and is refused on a dense model); or when --world-size differs
    from the world size the topology needs. `run` and `serve` make the same checks.
    """
    topology = _load(config)
    try:
        mc = check_model(topology)
    except ConfigError as err:
        _fail(str(err))
    if world_size is not None and world_size != topology.world_size:
        _fail(f"{config} needs a world size of {topology.world_size} (rank 0 plus "
              f"{topology.world_size - 1} executor ranks) but the job has {world_size}; "
              f"launch {topology.world_size} tasks (sbatch --ntasks={topology.world_size}) "
              "or fix participant_ids")
    click.echo(summary_line(topology))
    for line in expert_lines(topology, mc.num_experts, mc.moe_intermediate_size):
        click.echo(line)


@click.command("slurm", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config", required=True, metavar="CONFIG", help="Topology YAML file.")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Nodes to allocate; ranks fill them in blocks of ceil(world/nodes).")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=None, metavar="G",
              help="GPUs per node (adds --gres=gpu:G when G > 0). Default: the highest device id "
                   "in the topology + 1, or 0 when every executor runs on CPU.")
@click.option("--partition", default=None, help="SLURM partition (#SBATCH --partition).")
@click.option("--time", "time_limit", default=None, metavar="T",
              help="Time limit, e.g. 01:00:00 (#SBATCH --time).")
@click.option("--account", default=None, help="Account to charge (#SBATCH --account).")
@click.option("--mpi", type=click.Choice(["pmi2", "pmix", "auto"]), default="auto", show_default=True,
              help="srun --mpi plugin; auto picks pmi2 for MPICH, pmix for Open MPI, from the MPI "
                   "library mpi4py loads here.")
@click.option("--command", "command", type=click.Choice(["run", "serve"]), default="run",
              show_default=True, help="disagg-mpi command the job runs.")
@click.option("--overcommit", is_flag=True,
              help="Allow more tasks than CPUs (sbatch/srun --overcommit), for CPU test nodes.")
@click.option("--job-name", default="disagg-mpi", show_default=True, help="#SBATCH --job-name.")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False), default=None,
              help="Write the script here (default: standard output). The plan goes to stderr.")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def slurm(config: str, nodes: int, gpus_per_node: int | None, partition: str | None,
          time_limit: str | None, account: str | None, mpi: str, command: str, overcommit: bool,
          job_name: str, output: str | None, extra: tuple[str, ...]) -> None:
    """Render a SLURM batch script that runs CONFIG as one MPI job.

    One task per rank; the script activates this virtual environment, exports
    DISAGG_MPI_CACHE, validates the topology against $SLURM_NTASKS, then runs
    `srun --mpi=... python -m mpi4py -m disagg_mpi.cli <command> --config CONFIG`
    with the arguments after `--`, e.g.

        disagg-mpi slurm --config topo.yaml --nodes 2 --gpus-per-node 8 -o job.sbatch
        -- --input prompts.jsonl --output out.jsonl

    Prints the placement plan (node, local rank and GPU of every rank) and
    warns when a TP group or a context/generation pair spans nodes.
    """
    topology = _load(config)
    gpus = default_gpus_per_node(topology) if gpus_per_node is None else gpus_per_node
    try:
        placement = plan_placement(topology, nodes, gpus)
        options = options_from_environment(
            nodes=nodes, gpus_per_node=gpus, partition=partition, time=time_limit, account=account,
            job_name=job_name, mpi=mpi, overcommit=overcommit, command=command, command_args=extra)
        # An absolute path: the job may start in another folder (sbatch --chdir, a user's edit).
        text = render_sbatch(topology, Path(config).resolve(), options)
    except (ConfigError, ValueError) as err:
        _fail(str(err))
        return
    click.echo(placement.format(), err=True)
    click.echo(f"srun --mpi={options.mpi}", err=True)
    if output:
        Path(output).write_text(text)
        click.echo(f"wrote {output}; submit it with: sbatch {output}", err=True)
    else:
        click.echo(text, nl=False)

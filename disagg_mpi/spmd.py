"""The SPMD entry point: `with disagg_mpi.launch(config) as orchestrator:`.

Every rank of the job enters the block. Rank 0 gets the orchestrator; every
other rank runs its executor until rank 0 leaves the block, then gets None,
so scripts read `if orchestrator: ...`.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mpi4py import MPI

from .config import Topology, check_model, load_topology
from .orchestrator.orchestrator import DisaggOrchestrator
from .runtime.comms import build_comms
from .runtime.devices import node_name

log = logging.getLogger(__name__)


def threads_per_rank(cores: int, computing_ranks_on_node: int) -> int:
    """Torch threads for an executor rank: the node's cores shared among the ranks that compute.
    Rank 0 and waiting ranks sleep between polls (runtime/comms.py: Backoff), so they cost no core."""
    return max(1, cores // max(1, computing_ranks_on_node))


def configure_threads(world, topo: Topology) -> None:
    """Share the node's cores between its executor ranks (torch would give each rank all of them).

    Oversubscribed cores make every rank slower than running fewer threads (seen under srun: 15x).
    OMP_NUM_THREADS, when set, wins (documented in the README)."""
    import os

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    computes = topo.executor_of_rank(world.Get_rank()) is not None
    computing = sum(node.allgather(computes))
    node.Free()
    if os.environ.get("OMP_NUM_THREADS") or not computes:
        return
    import torch  # (executor ranks only: rank 0 runs no model and never loads torch)

    torch.set_num_threads(threads_per_rank(os.cpu_count() or 1, computing))


def shared_gpus(placements: list[tuple[str, int | None, int | None]]) -> dict[tuple[str, int], list[int]]:
    """(node, gpu) -> executors using it, for GPUs that more than one executor uses."""
    users: dict[tuple[str, int], set[int]] = {}
    for node, executor, gpu in placements:
        if executor is not None and gpu is not None:
            users.setdefault((node, gpu), set()).add(executor)
    return {k: sorted(v) for k, v in users.items() if len(v) > 1}


def _warn_shared_gpus(topo: Topology, world) -> None:
    """Executors on one GPU time-slice it (the one-GPU way to disaggregate): say so."""
    found = topo.executor_of_rank(world.Get_rank())
    gpu = None
    if found is not None and found[1].device_ids is not None:
        gpu = found[1].device_ids[found[1].participant_ids.index(world.Get_rank())]
    placements = world.gather((MPI.Get_processor_name(), found[0] if found else None, gpu), root=0)
    if world.Get_rank() == 0:
        for (node, g), executors in shared_gpus(placements).items():
            log.warning("executors %s share GPU %d on %s: they time-slice it (fine for trying "
                        "disaggregation on one GPU; give each executor its own GPU for speed)", executors, g, node)


def startup_plan(topo: Topology) -> str:
    """What the executors do before they report ready, said while rank 0 waits for them."""
    from .knobs import env_value

    n = len(topo.executors)
    msg = f"loading {topo.model.path} on {n} executor{'s' if n > 1 else ''} (ranks 1-{topo.world_size - 1})"
    gpu_gen = [ex.max_batch_size for ex in topo.generation_executors if ex.on_gpu]
    if gpu_gen and env_value("DISAGG_CUDA_GRAPHS") and env_value("DISAGG_GRAPH_CAPTURE") == "startup":
        msg += (", then capturing CUDA decode graphs on the GPU generation executors "
                f"(batch sizes up to {max(gpu_gen)})")
    return msg


def ready_line(topo: Topology, executor: int, device: str, seconds: float) -> str:
    kind = "context" if topo.is_context(executor) else "generation"
    ranks = topo.executors[executor].participant_ids
    return f"executor {executor} ({kind}, ranks {ranks}) ready on {device} after {seconds:.0f} s"


def _topology(config: str | Path | Topology) -> Topology:
    return config if isinstance(config, Topology) else load_topology(config)


@contextlib.contextmanager
def launch(config: str | Path | Topology, world=None,
           progress: Callable[[str], None] | None = None) -> Iterator[DisaggOrchestrator | None]:
    """Collective over the world: start executors, yield the orchestrator on rank 0.

    `progress` (rank 0): called with a line as start-up advances (what loads, each executor ready)."""
    world = world or MPI.COMM_WORLD
    topo = _topology(config)
    from .runtime import rankmap

    rankmap.record(world.Get_rank(), rankmap.role_of(topo, world.Get_rank()))
    check_model(topo)  # the CLI ran it already; a script under mpiexec reaches it here
    comms = build_comms(topo, world)
    configure_threads(world, topo)
    # The key that signs context params: made on rank 0, known to every rank.
    key = world.bcast(secrets.token_bytes(32) if comms.rank == 0 else None, root=0)
    nodes = world.allgather(node_name())
    _warn_shared_gpus(topo, world)
    try:
        if comms.rank == 0:
            orch = DisaggOrchestrator(topo, comms)
            say = progress or log.info
            t0 = time.perf_counter()
            try:
                say(startup_plan(topo))
                orch.wait_ready(on_ready=lambda ex, dev: say(ready_line(topo, ex, dev, time.perf_counter() - t0)))
                yield orch
            finally:
                orch.shutdown()
        else:
            from .runtime.worker import run_executor_rank  # (torch: executor ranks only)

            run_executor_rank(topo, comms, key, nodes)
            yield None
    finally:
        world.Barrier()
        comms.free()

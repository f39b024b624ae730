"""Where the ranks of a topology land: node, node-local rank and GPU.

Two halves:

* `plan_placement` is a pure function of a topology and a cluster shape. It
  reproduces SLURM's default *block* distribution (ranks 0..k-1 on node 0,
  k..2k-1 on node 1, ... with k = ntasks-per-node = ceil(world / nodes)) so a
  user sees, before submitting, which executor sits where, and it warns about
  layouts that put traffic on the network (a TP group spanning nodes, a
  context and a generation executor on different nodes).
* `local_rank` and `device_for_rank` answer the same questions for the running
  process.

The GPU rule (the same in both halves): an executor's `device_ids` are
*node-local* GPU ids, one per participant, in the same order as
`participant_ids`: rank `participant_ids[i]` uses GPU `device_ids[i]` of the
node it runs on. So a two-node job reuses ids 0..G-1 on each node; an id must
be < the node's GPU count (`--gpus-per-node`). Rank 0, the orchestrator, uses
no GPU; an executor without `device_ids` runs on CPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .config import ConfigError, Topology

if TYPE_CHECKING:
    from mpi4py import MPI

Role = Literal["orchestrator", "context", "generation"]


class PlacementError(ConfigError):
    """The topology cannot be placed on the requested nodes; the message names the fix."""


@dataclass(frozen=True)
class RankPlacement:
    rank: int
    node: int                 # index into the allocation's node list (0-based)
    local_rank: int           # rank among the tasks of its node (SLURM_LOCALID)
    gpu: int | None           # node-local GPU id; None on CPU (and for rank 0)
    role: Role
    executor: int | None      # index into Topology.executors; None for rank 0
    executor_local_rank: int | None  # pp_stage * tp_size + tp_rank inside the executor
    label: str = "orch"       # short name for tables: orch, ctx0, gen1, ...


@dataclass(frozen=True)
class Placement:
    world_size: int
    nodes: int
    ntasks_per_node: int
    gpus_per_node: int
    ranks: tuple[RankPlacement, ...]
    warnings: tuple[str, ...] = field(default=())

    def node_of(self, rank: int) -> int:
        return self.ranks[rank].node

    def ranks_on_node(self, node: int) -> list[int]:
        return [p.rank for p in self.ranks if p.node == node]

    def format(self) -> str:
        """A human-readable table, one line per node, then the warnings."""
        lines = [(f"placement: {self.world_size} ranks on {self.nodes} node(s), "
                  f"{self.ntasks_per_node} task(s) per node, block distribution, "
                  f"{self.gpus_per_node} GPU(s) per node")]
        for node in range(self.nodes):
            cells = []
            for rank in self.ranks_on_node(node):
                p = self.ranks[rank]
                where = "cpu" if p.gpu is None else f"gpu{p.gpu}"
                cells.append(f"r{rank}:{p.label}/{where}")
            lines.append(f"  node {node}: " + (" ".join(cells) or "(empty)"))
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def ntasks_per_node(world_size: int, nodes: int) -> int:
    return math.ceil(world_size / nodes)


def _executor_roles(topology: Topology) -> list[tuple[str, Role]]:
    n_ctx = len(topology.context_executors)
    return [(f"context_executors[{i}]", "context") if i < n_ctx
            else (f"generation_executors[{i - n_ctx}]", "generation")
            for i in range(len(topology.executors))]


def default_gpus_per_node(topology: Topology) -> int:
    """The fewest GPUs per node that the topology's device ids need (0 if all CPU)."""
    ids = [d for e in topology.executors for d in (e.device_ids or [])]
    return max(ids) + 1 if ids else 0


def plan_placement(topology: Topology, nodes: int, gpus_per_node: int) -> Placement:
    """Place every rank of `topology` on `nodes` nodes with `gpus_per_node` GPUs each.

    Raises `PlacementError` when SLURM could not run it as asked (a node left
    without tasks, a device id the node does not have); returns warnings for
    layouts that run but move data over the network.
    """
    world = topology.world_size
    if nodes < 1:
        raise PlacementError(f"--nodes {nodes}: need at least 1 node")
    if gpus_per_node < 0:
        raise PlacementError(f"--gpus-per-node {gpus_per_node}: must be >= 0")
    if nodes > world:
        raise PlacementError(f"--nodes {nodes} exceeds the world size {world} (one task per rank); "
                             f"use --nodes {world} or fewer")
    per_node = ntasks_per_node(world, nodes)
    used_nodes = math.ceil(world / per_node)
    if used_nodes < nodes:
        raise PlacementError(
            f"world size {world} on {nodes} nodes gives {per_node} tasks per node, which fills only "
            f"{used_nodes} node(s) and leaves the rest empty; use --nodes {used_nodes}")

    names = _executor_roles(topology)
    owner: dict[int, tuple[int, int]] = {}  # rank -> (executor id, index in participant_ids)
    for ex_id, ex in enumerate(topology.executors):
        for i, rank in enumerate(ex.participant_ids):
            owner[rank] = (ex_id, i)

    ranks: list[RankPlacement] = []
    for rank in range(world):
        node, local = divmod(rank, per_node)
        if rank == 0:
            ranks.append(RankPlacement(0, node, local, None, "orchestrator", None, None))
            continue
        ex_id, idx = owner[rank]
        ex = topology.executors[ex_id]
        gpu = device_for_rank(ex.device_ids, idx, local)
        if gpu is not None and gpu >= gpus_per_node:
            raise PlacementError(
                f"{names[ex_id][0]}.device_ids[{idx}] = {gpu} (rank {rank}) but a node has "
                f"{gpus_per_node} GPU(s) (ids 0..{gpus_per_node - 1}); device_ids are node-local: "
                f"lower it or pass --gpus-per-node {default_gpus_per_node(topology)} or more")
        role = names[ex_id][1]
        n_ctx = len(topology.context_executors)
        label = f"ctx{ex_id}" if role == "context" else f"gen{ex_id - n_ctx}"
        ranks.append(RankPlacement(rank, node, local, gpu, role, ex_id, idx, label))

    return Placement(world, nodes, per_node, gpus_per_node, tuple(ranks),
                     tuple(_warnings(topology, ranks, names)))


def _warnings(topology: Topology, ranks: Sequence[RankPlacement],
              names: list[tuple[str, Role]]) -> list[str]:
    warnings: list[str] = []
    nodes_of: list[set[int]] = []
    for ex_id, ex in enumerate(topology.executors):
        tp = ex.tensor_parallel_size
        nodes_of.append({ranks[r].node for r in ex.participant_ids})
        for stage in range(ex.pipeline_parallel_size):
            group = ex.participant_ids[stage * tp:(stage + 1) * tp]
            group_nodes = sorted({ranks[r].node for r in group})
            if len(group_nodes) > 1:
                where = ", ".join(f"rank {r} on node {ranks[r].node}" for r in group)
                warnings.append(f"{names[ex_id][0]} pipeline stage {stage}: its tensor-parallel group "
                                f"spans nodes {group_nodes} ({where}); every layer's all-reduce crosses "
                                "the network")
            sharing: dict[tuple[int, int], list[int]] = {}
            for r in group:
                if ranks[r].gpu is not None:
                    sharing.setdefault((ranks[r].node, ranks[r].gpu), []).append(r)
            for (node, gpu), members in sharing.items():
                if len(members) > 1:
                    warnings.append(f"{names[ex_id][0]}: ranks {members} of one tensor-parallel group share "
                                    f"GPU {gpu} of node {node} (NCCL cannot form a communicator over two "
                                    "processes on one GPU)")
    n_ctx = len(topology.context_executors)
    for c in range(n_ctx):
        for g in range(n_ctx, len(topology.executors)):
            if len(nodes_of[c] | nodes_of[g]) > 1:
                warnings.append(f"{names[c][0]} (nodes {sorted(nodes_of[c])}) and {names[g][0]} "
                                f"(nodes {sorted(nodes_of[g])}) are not on one node: KV caches routed "
                                "between them cross the network")
    return warnings


# --- the running process -------------------------------------------------------------------------

def local_rank(comm: MPI.Comm | None = None) -> int:
    """This process's rank among the processes of its node.

    `SLURM_LOCALID` when srun started us (no communication); otherwise the
    rank in a split of `comm` (default `MPI.COMM_WORLD`) by shared memory.
    The split is collective: under mpiexec every rank of `comm` must call this.
    """
    env = os.environ.get("SLURM_LOCALID")
    if env is not None and env.strip().isdigit():
        return int(env)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node_comm.Get_rank()
    finally:
        node_comm.Free()


def device_for_rank(device_ids: Sequence[int] | None, executor_local_index: int,
                    local_rank: int | None = None) -> int | None:
    """The node-local GPU id of the executor's `executor_local_index`-th participant.

    `device_ids[i]` belongs to `participant_ids[i]`; ids are node-local (see
    the module docstring), so the result does not depend on the node. None
    means CPU. `local_rank` (the process's rank on its node) only serves the
    error message: the id does not follow from it, so two nodes may use the
    same ids and a node's ranks need not be packed in GPU order.
    """
    if device_ids is None:
        return None
    if not 0 <= executor_local_index < len(device_ids):
        raise PlacementError(f"executor-local index {executor_local_index} is outside device_ids "
                             f"{list(device_ids)} (local rank {local_rank})")
    gpu = device_ids[executor_local_index]
    if gpu < 0:
        raise PlacementError(f"device id {gpu} (local rank {local_rank}) is negative; device_ids are "
                             "node-local GPU ids >= 0")
    return gpu

"""Communicators of one job, split from the world by the YAML topology.

```
world ─┬─ ctl  (dup): control messages, typed by tag
       ├─ kv   (dup): KV bytes, so data tags never meet control tags
       ├─ executor (Split by executor id): its TP x PP ranks, leader = local 0
       │    └─ tp (Split by PP stage): the ranks that all-reduce together
       └─ phase (Split): all context ranks / all generation ranks
```
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mpi4py import MPI

from .. import protocol
from ..config import ConfigError, Topology


@dataclass
class Comms:
    world: Any
    ctl: Any
    kv: Any
    executor: Any | None  # None on rank 0
    tp: Any | None
    phase: Any | None
    executor_id: int | None
    local_rank: int  # rank inside the executor (pp_stage * tp + tp_rank)

    @property
    def rank(self) -> int:
        return self.world.Get_rank()

    def free(self) -> None:
        flush_sends()
        for c in (self.tp, self.executor, self.phase, self.kv, self.ctl):
            if c is not None and c != MPI.COMM_NULL:
                c.Free()


def build_comms(topo: Topology, world: Any = None) -> Comms:
    """Collective over `world`: every rank must call it."""
    world = world or MPI.COMM_WORLD
    if world.Get_size() != topo.world_size:
        raise ConfigError(
            f"the MPI job has {world.Get_size()} ranks but the topology needs {topo.world_size} "
            f"(1 orchestrator + {topo.world_size - 1} executor ranks); run mpiexec -n {topo.world_size}")
    rank = world.Get_rank()
    ctl, kv = world.Dup(), world.Dup()
    found = topo.executor_of_rank(rank)
    if found is None:
        ex_id, local, color, phase_color = None, 0, MPI.UNDEFINED, MPI.UNDEFINED
    else:
        ex_id, spec = found
        local = spec.participant_ids.index(rank)
        color, phase_color = ex_id, (0 if topo.is_context(ex_id) else 1)
    executor = world.Split(color, local)
    phase = world.Split(phase_color, rank)
    tp = None
    if ex_id is not None:
        tp_size = topo.executors[ex_id].tensor_parallel_size
        tp = executor.Split(local // tp_size, local % tp_size)
    return Comms(world, ctl, kv, None if ex_id is None else executor, tp,
                 None if ex_id is None else phase, ex_id, local)


# Control messages leave with MPI_Isend, never MPI_Send. A standard send may wait for its receiver
# once the message is past the MPI library's eager limit (Open MPI's shared memory: 4 KiB; the
# enqueue of a generation request with a 2,048-token prompt is more), and every rank posts its
# receives only between its own sends: two leaders each in such a send to the other wait for ever
# (seen on two H100s: the orchestrator enqueueing to the generation executor while it sent
# responses back). So `send` returns at once and the unfinished sends are kept here, completed by
# later calls: every loop turn polls `recv_ready`.
_OUTBOX: list[Any] = []


def send(comm: Any, msg: protocol.Message, dest: int, wait: bool = False) -> None:
    """Send a control record (on its own tag) without waiting for its receiver, unless `wait`.

    `wait` is for a leader's messages to its own executor's ranks (step, pull): they return to
    their loop at once, and the leader must not run ahead into a step whose collectives they
    join while they sit in the receive of a message only the leader can progress."""
    payload, tag = protocol.encode(msg), msg.TAG
    if wait:
        comm.send(payload, dest=dest, tag=tag)
        return
    _OUTBOX.append(comm.isend(payload, dest=dest, tag=tag))  # MPI keeps the order of posting
    progress_sends()


def progress_sends() -> int:
    """Complete the sends that can be; returns how many are still waiting for their receiver."""
    if _OUTBOX:
        _OUTBOX[:] = [r for r in _OUTBOX if not r.Test()]
    return len(_OUTBOX)


def flush_sends(timeout: float = 10.0) -> bool:
    """Wait (polling) until every send has been received, at most `timeout` seconds; at shutdown,
    what is still unreceived then is cancelled, so finalizing MPI does not hang on it."""
    deadline = time.monotonic() + timeout
    while progress_sends():
        if time.monotonic() > deadline:
            for r in _OUTBOX:
                r.Cancel()
                r.Free()
            _OUTBOX.clear()
            return False
        time.sleep(1e-4)
    return True


def recv_ready(comm: Any, source: int, tag: protocol.Tag) -> tuple[protocol.Message, int] | None:
    """A waiting record, or None; never blocks. Progresses this rank's unfinished sends first.
    A message that is not a record of `tag` raises protocol.ProtocolError, naming it."""
    if _OUTBOX:
        progress_sends()
    status = MPI.Status()
    if not comm.Iprobe(source=source, tag=tag, status=status):
        return None
    src = status.Get_source()
    return protocol.decode(comm.recv(source=src, tag=tag), tag), src


GPU_IDLE_CAP = 200e-6


class Backoff:
    """Sleep a little longer each idle turn, so waiting ranks leave the cores free.

    MPICH's blocking calls spin; on 2 cores with 3-8 ranks that starves the ranks
    doing work (FACTS.md), so every waiting loop polls and sleeps instead.
    """

    def __init__(self, start: float = 50e-6, cap: float = 2e-3):
        self.start, self.cap, self.delay = start, cap, start

    @classmethod
    def for_devices(cls, gpu: bool) -> Backoff:
        """2 ms cap where ranks share a few cores (CPU runs, CI); 0.2 ms on GPU nodes, whose
        ranks have cores to spare and where each idle hop of the hand-off (context answer,
        routing, claim) otherwise adds up to the cap to the generation side's first token."""
        return cls(cap=GPU_IDLE_CAP if gpu else 2e-3)

    def idle(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.cap, self.delay * 2)

    def busy(self) -> None:
        self.delay = self.start

"""What rank 0 knows of its executors, and what it says to them outside a request's two phases.

Each executor is known by its index in the topology (context executors first) and reached through
its leader's world rank. Rank 0 keeps, per executor, the load and prefix cache it expects there
(counted as it dispatches, corrected by the load and free blocks every `Responses` reports), the
device each one loaded its model on, the counters it last sent (`ExecutorStats`), and whether all
of them take the direct hand-off. Start-up (`wait_ready`), the counters (`StatsRequest`) and
`Shutdown` go to every leader alike.

`DisaggOrchestrator` owns one `Fleet` and reads its tables; the fleet never looks at a request's
track, so the two-phase flow (orchestrator.py) and this bookkeeping change apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..api import CacheTransceiverConfig, Request
from ..config import Topology
from ..protocol import Message, ProtocolError, Ready, Shutdown, StatsRequest, Tag
from ..runtime.comms import Backoff, Comms, recv_ready, send
from .prefix_index import PrefixIndex
from .router import direct_handoff


class Fleet:
    def __init__(self, topo: Topology, comms: Comms):
        self.comms = comms
        n_ctx = len(topo.context_executors)
        self.context_ids = list(range(n_ctx))
        self.generation_ids = list(range(n_ctx, len(topo.executors)))
        self.leaders = {i: e.participant_ids[0] for i, e in enumerate(topo.executors)}
        self.load: dict[int, int] = {i: 0 for i in self.leaders}
        self.free_blocks: dict[int, int] = {}
        self.devices: dict[int, str] = {}
        self.prefix = {i: PrefixIndex(e.kv_cache.block_size, e.kv_cache.num_blocks)
                       for i, e in enumerate(topo.executors)}
        self.stats: dict[int, dict] = {}  # executor -> its latest counters (ExecutorStats)
        self.backoff = Backoff.for_devices(any(e.device_ids for e in topo.executors))
        flags = [(e.cache_transceiver_config.to_api() if e.cache_transceiver_config else CacheTransceiverConfig()
                  .with_env_overrides()).direct_handoff for e in topo.executors]
        self.direct_handoff = direct_handoff(flags[:n_ctx], flags[n_ctx:])  # (router.py)

    def send(self, msg: Message, executor: int) -> None:
        send(self.comms.ctl, msg, self.leaders[executor])

    def count(self, executor: int, request: Request) -> None:
        """The load and prefix cache rank 0 expects on `executor` once it runs `request`."""
        self.load[executor] += len(request.input_token_ids) + request.max_tokens
        if not request.benchmark_generation_only:  # (its blocks never enter the executor's prefix cache)
            self.prefix[executor].insert(request.input_token_ids)

    def report(self, executor: int, load: int, free_blocks: int) -> None:
        """What the executor itself counts (each `Responses` carries it): it replaces our estimate."""
        self.load[executor], self.free_blocks[executor] = load, free_blocks

    # ---- counters -------------------------------------------------------------

    def request_stats(self) -> None:
        """Ask every executor for its counters without waiting (the answers come through `poll`)."""
        for ex in self.leaders:
            self.send(StatsRequest(), ex)

    def collect_stats(self, poll: Callable[[], bool], timeout: float) -> dict[int, dict]:
        """Ask every executor for its counters and wait for all of them; `poll` takes in what the
        executors send (the orchestrator's: responses may come meanwhile) and stores the counters."""
        self.stats.clear()
        self.request_stats()
        deadline = time.perf_counter() + timeout
        while len(self.stats) < len(self.leaders):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"executors {sorted(set(self.leaders) - set(self.stats))} did not answer")
            if not poll():
                self.backoff.idle()
        return dict(self.stats)

    def wait_pools_full(self, poll: Callable[[], bool], timeout: float) -> dict[int, dict]:
        """Wait until every executor's KV pool is fully free; raise with the counters if not."""
        deadline = time.perf_counter() + timeout
        while True:
            stats = self.collect_stats(poll, timeout)
            if all(s["free_blocks"] == s["num_blocks"] for s in stats.values()):
                return stats
            if time.perf_counter() > deadline:
                raise AssertionError(f"KV blocks still held after {timeout} s: {stats}")
            time.sleep(0.05)

    # ---- lifecycle --------------------------------------------------------------

    def wait_ready(self, timeout: float, on_ready: Callable[[int, str], None] | None = None) -> None:
        """Wait for every executor to load its model; raise if any failed. `on_ready(executor, device)`
        is called as each one reports ready (the CLI tells the user while a start-up takes its time)."""
        left = set(self.leaders)
        deadline = time.perf_counter() + timeout
        errors = []
        while left:
            got = recv_ready(self.comms.ctl, any_source(), Tag.TO_ORCHESTRATOR)
            if got is None:
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"executors {sorted(left)} did not start within {timeout} s")
                self.backoff.idle()
                continue
            match got[0]:
                case Ready(ex, error, device):
                    left.discard(ex)
                    self.devices[ex] = device or "?"
                    if error:
                        errors.append(error)
                    elif on_ready is not None:
                        on_ready(ex, self.devices[ex])
                case other:
                    raise ProtocolError(f"rank {got[1]} sent {other!r:.120} before every executor was ready")
        if errors:
            raise RuntimeError("executors failed to start:\n  " + "\n  ".join(errors))

    def shutdown(self) -> None:
        for ex in self.leaders:
            self.send(Shutdown(), ex)


def any_source() -> int:
    from mpi4py import MPI

    return MPI.ANY_SOURCE

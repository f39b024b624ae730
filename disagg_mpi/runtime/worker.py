"""The loop every executor rank runs: its leader decides, the others mirror.

The leader owns the `LLMEngine` and talks to rank 0 and to other leaders; it
sends each step (and each KV pull) to the executor's other ranks, which run
the same `ModelRunner.execute` / `KvTransceiver.start_pull` (SPMD). Every rank
progresses its own transceiver each turn, so context ranks serve pulls and
generation ranks receive them between steps.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .. import protocol as P
from ..api import ContextPhaseParams
from ..config import Topology
from ..engine.llm_engine import LLMEngine
from ..engine.model_runner import ModelRunner, ParallelInfo, Sampled, StepPlan
from ..engine.warm_up import enabled as warm_up_enabled
from ..engine.warm_up import warm_up
from ..hops import Hop
from ..knobs import env_value
from ..model.loader import load_model
from ..model.parallel import ShardSpec
from ..model.tokenizer import load_tokenizer
from ..transfer.cache_state import CacheState
from ..transfer.opaque import OpaqueState
from ..transfer.transceiver import KvTransceiver
from .allreduce import tp_all_reduce
from .comms import Backoff, Comms, recv_ready, send
from .devices import node_name, select_device

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MpiGroup:
    """The leader's view of its executor's ranks (itself included)."""

    def __init__(self, comms: Comms, runner: ModelRunner, transceiver: KvTransceiver | None,
                 members: list[int], key: bytes, generation_here: bool = True):
        self.comms, self.runner, self.transceiver = comms, runner, transceiver
        self.generation_here = generation_here  # a generation executor has a rank on our node
        self.members = members  # world ranks of the other ranks of this executor
        self.key = key
        self._left: dict[int, set[int]] = {}  # req -> ranks still receiving
        self._bytes: dict[int, int] = {}
        self._done: list[tuple[int, int, float]] = []
        self._t0: dict[int, float] = {}
        if transceiver is not None:  # our own pulls (the members' report once their copies are in)
            transceiver.order_joins(env_value("DISAGG_IPC_ORDERED_JOIN"))

    def run_step(self, plan: StepPlan) -> Sampled:
        msg = P.Step(plan)
        for m in self.members:
            send(self.comms.ctl, msg, m, wait=True)
        return self.runner.execute(plan)

    @property
    def chain_pending(self) -> bool:
        return self.runner.chain_pending

    @property
    def chains_decode(self) -> bool:
        return self.runner.chains_decode and not self.members

    @property
    def exports_ipc(self) -> bool:
        """Whether same-node generation ranks may map our KV pools (CUDA IPC) and read them unasked
        (and there are some: else keep_until would only hold released blocks for nothing)."""
        return self.generation_here and self.transceiver is not None and self.transceiver.exports_ipc

    def can_pull_unclaimed(self, opaque: OpaqueState) -> bool:
        """Whether a pull of `opaque` can start before its claim is granted: one rank here, and
        it needs nothing from the context ranks (CUDA IPC from pools this rank has mapped)."""
        return not self.members and self.transceiver is not None and self.transceiver.one_sided_ready(opaque)

    def start_pull(self, req_id: int, opaque: OpaqueState, blocks: list[int]) -> None:
        assert self.transceiver is not None
        if env_value("DISAGG_FAULT_STALL_PULL"):  # fault injection for tests: never pull
            return
        msg = P.Pull(req_id, opaque.encode(self.key), list(blocks))
        for m in self.members:
            send(self.comms.ctl, msg, m, wait=True)
        self._left[req_id] = {self.comms.rank, *self.members}
        self._bytes[req_id] = 0
        self._t0[req_id] = time.perf_counter()
        self.transceiver.start_pull(req_id, opaque, blocks)

    def _mark(self, req_id: int, rank: int, nbytes: int) -> None:
        left = self._left.get(req_id)
        if left is None:
            return
        left.discard(rank)
        self._bytes[req_id] += nbytes
        if not left:
            del self._left[req_id]
            self._done.append((req_id, self._bytes.pop(req_id), time.perf_counter() - self._t0.pop(req_id)))

    def progress(self) -> bool:
        """Move bytes; True if anything happened."""
        busy = False
        if self.transceiver is not None:
            for req_id, nbytes, _ in self.transceiver.poll():
                self._mark(req_id, self.comms.rank, nbytes)
                busy = True
            busy = busy or self.transceiver.busy
        while (got := recv_ready(self.comms.ctl, _ANY(), P.Tag.MEMBER_DONE)):
            match got:
                case (P.Pulled(req_id, nbytes), src):
                    self._mark(req_id, src, nbytes)
                case (other, src):
                    raise P.ProtocolError(f"rank {src} sent {other!r:.120} on MEMBER_DONE")
            busy = True
        return busy

    def pull_in_flight(self, req_id: int) -> bool:
        return req_id in self._left

    def unsettled(self, req_id: int) -> bool:
        """Whether a finished pull's copy may still be reading the context's pool (ipc_path.py)."""
        return self.transceiver is not None and self.transceiver.unsettled(req_id)

    def poll_transfers(self) -> list[tuple[int, int, float]]:
        out, self._done = self._done, []
        return out

    @property
    def receiving(self) -> bool:
        return bool(self._left)

    def shutdown(self) -> None:
        for m in self.members:
            send(self.comms.ctl, P.StopMember(), m, wait=True)


def _ANY() -> int:
    from mpi4py import MPI

    return MPI.ANY_SOURCE


def _build(topo: Topology, comms: Comms, key: bytes) -> tuple[ModelRunner, KvTransceiver | None, CacheState,
                                                               ParallelInfo, Any]:
    from ..model.loader import load_model_config

    ex_id = comms.executor_id
    spec = topo.executors[ex_id]
    mc = load_model_config(topo.model.path)
    cfg = spec.executor_config(topo.dtype_for(spec, mc.torch_dtype), topo.model.quantization)
    tp, pp = spec.tensor_parallel_size, spec.pipeline_parallel_size
    cache_state = CacheState.create(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.kv_cache_config.block_size,
                                    cfg.dtype, tp, pp, spec.layer_split)
    par = ParallelInfo(comms.local_rank % tp, tp, comms.local_rank // tp, pp, comms.executor)
    l0, l1 = cache_state.layer_range(par.pp_stage)
    device = select_device(spec.device_ids, comms.local_rank)
    all_reduce = None
    if tp > 1:
        gpu = spec.device_ids[comms.local_rank] if spec.device_ids is not None else None
        all_reduce = tp_all_reduce(comms.tp, device, node_name(), gpu)
    shard = ShardSpec(par.tp_rank, tp, l0, l1, all_reduce, ep_size=spec.expert_parallel_size)
    model = load_model(topo.model.path, _DTYPES[cfg.dtype], device, shard, seed=topo.model.seed,
                       quantization=cfg.quantization)
    if spec.expert_parallel_size > 1:
        log.info("rank %d: experts [%d, %d) of %d (expert_parallel_size=%d)", comms.rank,
                 *shard.expert_range(mc.num_experts), mc.num_experts, spec.expert_parallel_size)
    runner = ModelRunner(model, cfg.kv_cache_config.num_blocks, cfg.kv_cache_config.block_size, device, par)
    if not topo.is_context(ex_id):  # it decodes: no graph capture in the middle of serving
        t0 = time.perf_counter()
        if n := runner.capture_decode_graphs(cfg.max_batch_size):
            log.info("rank %d: captured %d decode graphs (batch sizes up to %d) in %.1f s", comms.rank, n,
                     cfg.max_batch_size, time.perf_counter() - t0)
    tc = cfg.cache_transceiver_config
    transceiver = (KvTransceiver(comms.kv, runner.kv_pool, cache_state, comms.local_rank, tc)
                   if tc.enable_cache_transceiver else None)
    return runner, transceiver, cache_state, par, (cfg, mc)


def generation_on_node(topo: Topology, nodes: list[str], rank: int) -> bool:
    """Whether a generation executor has a rank on `rank`'s node (`nodes`: node name per world rank)."""
    return any(nodes[r] == nodes[rank] for ex in topo.generation_executors for r in ex.participant_ids)


def run_executor_rank(topo: Topology, comms: Comms, key: bytes, nodes: list[str] | None = None) -> None:
    """Serve until rank 0 says shutdown. Collective over the executor. `nodes`: the node name of
    every world rank (None: assume one node)."""
    spec = topo.executors[comms.executor_id]
    leader = spec.participant_ids[0]
    try:
        runner, transceiver, cache_state, _, (cfg, mc) = _build(topo, comms, key)
        error = None
    except Exception as err:
        log.exception("rank %d: could not build its executor", comms.rank)
        error = f"rank {comms.rank}: {type(err).__name__}: {err}"
    if comms.rank != leader:
        if error:
            raise RuntimeError(error)
        _member_loop(comms, runner, transceiver, leader, key)
        return
    if error:
        send(comms.ctl, P.Ready(comms.executor_id, error), 0)
        return
    members = spec.participant_ids[1:]
    group = MpiGroup(comms, runner, transceiver, members, key,
                     generation_here=nodes is None or generation_on_node(topo, nodes, comms.rank))
    engine = LLMEngine(group, mc, cfg, cache_state, comms.executor_id, tuple(spec.participant_ids), key,
                       send_peer=lambda dest, msg: send(comms.ctl, msg, dest),
                       load_tokenizer=lambda: load_tokenizer(topo.model.path))  # guided decoding only
    if mc.num_experts:   # the experts of each MoE layer this leader holds (all of them unless EP)
        engine.stats["local_experts"] = len(range(*runner.model.expert_range))
    if warm_up_enabled(runner.device.type):  # before Ready: no compile or plan lands on a client
        try:
            done = warm_up(engine, mc.max_position_embeddings)
            log.info("rank %d: warm-up ran %d steps in %.1f s", comms.rank, done["steps"], done["seconds"])
        except Exception as err:
            log.exception("rank %d: warm-up failed", comms.rank)
            send(comms.ctl, P.Ready(comms.executor_id, f"rank {comms.rank}: warm-up: {type(err).__name__}: {err}"), 0)
            group.shutdown()
            return
    send(comms.ctl, P.Ready(comms.executor_id, None, str(runner.device)), 0)
    _leader_loop(comms, engine, group, cfg)
    group.shutdown()


def _leader_loop(comms: Comms, engine: LLMEngine, group: MpiGroup, cfg: Any) -> None:
    backoff = Backoff.for_devices(group.runner.device.type == "cuda")
    overlap = cfg.cache_transceiver_config.overlap
    meanwhile = None
    if not group.members and env_value("DISAGG_HANDOFF_DURING_STEPS"):  # (one rank: nobody waits on us)
        group.runner.meanwhile = meanwhile = _Meanwhile(comms, engine, group)
    while True:
        active = False
        while (got := recv_ready(comms.ctl, 0, P.Tag.TO_EXECUTOR)):
            active = True
            if not _on_orchestrator(comms, engine, got[0]):
                return
        active |= _between_steps(comms, engine, group)
        if engine.busy and (overlap or not group.receiving):
            engine.step()
            active = True
            if meanwhile is not None and meanwhile.error is not None:
                raise meanwhile.error  # as if raised by the loop (not a failure of the step's requests)
        _send_responses(comms, engine)
        if active:
            backoff.busy()
        else:
            backoff.idle()


def _between_steps(comms: Comms, engine: LLMEngine, group: MpiGroup) -> bool:
    """The hand-off's part of a loop turn: other leaders' messages, transfers, timers, responses;
    True if anything happened. Also run while a decode step is on the GPU (model_runner.py:
    `meanwhile`), so a ContextReady notice is claimed and pulled, and the first token it carries
    goes out, at once instead of after the step (half a decode step sooner on average). Rank 0's
    messages (new requests) wait for the loop: admission is the scheduler's, between steps."""
    active = False
    while (got := recv_ready(comms.ctl, _ANY(), P.Tag.PEER)):
        active = True
        _on_peer(comms, engine, *got)
    active |= group.progress()
    engine.housekeeping()
    # What is ready now (a generation request's first token once its KV landed, errors) goes
    # out before the step, not a whole decode step later (7 ms for an 8B model on an H100).
    _send_responses(comms, engine)
    return active


class _Meanwhile:
    """`_between_steps` as a decode step's `meanwhile` (model_runner.py). An error is kept for the
    loop to raise after the step: raised inside the step it would read as the step's own failure."""

    def __init__(self, comms: Comms, engine: LLMEngine, group: MpiGroup):
        self.comms, self.engine, self.group = comms, engine, group
        self.error: Exception | None = None

    def __call__(self) -> None:
        if self.error is None:
            try:
                _between_steps(self.comms, self.engine, self.group)
            except Exception as err:  # noqa: BLE001 (re-raised by the loop)
                self.error = err


def _on_orchestrator(comms: Comms, engine: LLMEngine, msg: P.Message) -> bool:
    """One record from rank 0; False once it says shutdown."""
    match msg:
        case P.Enqueue(items, client_holds, notify, await_context):
            for req_id, request in items:
                engine.add_request(req_id, request, client_holds, notify, await_context)
        case P.Cancel(req_id):
            engine.cancel(req_id)
        case P.StatsRequest():
            send(comms.ctl, P.ExecutorStats(comms.executor_id, engine.snapshot()), 0)
        case P.Shutdown():
            return False
        case _:
            raise P.ProtocolError(f"rank 0 sent {msg!r:.120} to an executor leader")
    return True


def _on_peer(comms: Comms, engine: LLMEngine, msg: P.Message, src: int) -> None:
    """One record from another executor's leader (the hand-off)."""
    match msg:
        case P.Claim(ctx_req_id, gen_req_id, blocks, _):
            err = engine.handoff.claim_context(ctx_req_id, blocks, (src, gen_req_id))
            send(comms.ctl, P.ClaimReply(gen_req_id, err, time.time(), node_name()), src)
        case P.ClaimReply(gen_req_id, error, at, node):  # (its wall clock means something on our node only)
            engine.handoff.on_claim_reply(gen_req_id, error, at if node == node_name() else None)
        case P.ContextReady(gen_req_id, ctx_req_id, first_tokens, opaque):  # the direct hand-off
            engine.handoff.direct.on_context_ready(gen_req_id, ContextPhaseParams(ctx_req_id, first_tokens, opaque), src)
        case P.Release(ctx_req_id, gen_req_id):
            engine.handoff.release_context(ctx_req_id, by=(src, gen_req_id))
        case _:
            raise P.ProtocolError(f"rank {src} sent {msg!r:.120} to an executor leader")


def _send_responses(comms: Comms, engine: LLMEngine) -> None:
    responses = engine.take_responses()
    if responses:
        now = time.time()
        for r in responses:  # a context's answer leaves now (hops.py: ctx_answer_sent)
            if r.result is not None and r.result.context_phase_params is not None:
                r.result.metrics.stamp(Hop.CTX_ANSWER_SENT, now)
        send(comms.ctl, P.Responses(comms.executor_id, responses, engine.load(), engine.blocks.num_free), 0)


def _member_loop(comms: Comms, runner: ModelRunner, transceiver: KvTransceiver | None, leader: int,
                 key: bytes) -> None:
    backoff = Backoff.for_devices(runner.device.type == "cuda")
    while True:
        active = False
        while (got := recv_ready(comms.ctl, leader, P.Tag.MEMBER)):
            active = True
            match got[0]:
                case P.Step(plan):
                    try:
                        runner.execute(plan)
                    except Exception:
                        # Tensor parallel: the leader failed at the same point and retries each request
                        # alone (step_isolation.py). Pipeline parallel: a stage failing alone would leave
                        # the others waiting for its activations for ever: end the job loudly instead.
                        if runner.par.pp_size > 1:
                            raise
                        log.exception("rank %d: step failed", comms.rank)
                case P.Pull(req_id, opaque, blocks):
                    transceiver.start_pull(req_id, OpaqueState.decode(opaque, key), blocks)
                case P.StopMember():
                    return
                case other:
                    raise P.ProtocolError(f"leader {leader} sent {other!r:.120} to a member")
        if transceiver is not None:
            for req_id, nbytes, _ in transceiver.poll():
                send(comms.ctl, P.Pulled(req_id, nbytes), leader)
                active = True
            active = active or transceiver.busy
        if active:
            backoff.busy()
        else:
            backoff.idle()

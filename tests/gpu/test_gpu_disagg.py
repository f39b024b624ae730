"""KV transfer between CUDA pools: CUDA IPC, staged through pinned host memory, CUDA-aware MPI.

Run on a GPU node (two processes may share one GPU: CUDA IPC works between them):

    mpirun --allow-run-as-root --oversubscribe -n 3 python -m mpi4py -m pytest --with-mpi tests/gpu

- transceiver level (3 ranks, all on cuda:0): context TP2 (ranks 0, 1) -> generation
  TP1 (rank 2), and TP1 (rank 0) -> TP1 (rank 2), fp32 and bf16, same and different
  block sizes, shuffled block ids; every token must land exactly, and the chosen path
  (IPC mapping opened or not, pinned staging used or not) is checked;
- end to end: a context and a generation executor on the SAME GPU (device_ids [0] both,
  random-weight model, fp32): greedy tokens of the disaggregated run (IPC and staged)
  equal those of an aggregated run on the same GPU;
- backend cuda_aware_mpi is refused with the reason when the MPI is not CUDA-aware.
"""

from __future__ import annotations

import os
import random
import time

import pytest

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

os.environ.pop("DISAGG_KV_BACKEND", None)  # the tests choose the backend themselves

from disagg_mpi.api import CacheTransceiverConfig
from disagg_mpi.transfer.cache_state import CacheState
from disagg_mpi.transfer.opaque import OpaqueState
from disagg_mpi.transfer.transceiver import KvTransceiver
from tests.gpu.topologies import executor, prompts

WORLD = MPI.COMM_WORLD
pytestmark = pytest.mark.mpi(min_size=2)

LAYERS, HEADS, HEAD_DIM = 3, 2, 8
SENTINEL = -7.0
TAG_DONE = 4343
TIMEOUT = 60.0


def _dev() -> torch.device:
    torch.cuda.set_device(0)
    return torch.device("cuda", 0)


def _global_values(nblocks: int, bs: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole (both heads) context cache; distinct values, exact in bf16 too."""
    shape = (nblocks, LAYERS, 2, HEADS, bs, HEAD_DIM)
    per = torch.arange(LAYERS * 2 * HEADS * bs * HEAD_DIM).reshape(shape[1:])
    blk = torch.arange(nblocks).view(-1, 1, 1, 1, 1, 1)
    vals = (per % 200).unsqueeze(0) + blk % 50 if dtype == torch.bfloat16 else per.unsqueeze(0) + 10000 * blk
    return vals.to(dtype)


def _run(tc: KvTransceiver, gen_rank: int, ctx_ranks: tuple[int, ...], pull) -> None:
    """gen_rank pulls (pull()) and polls until done; ctx ranks serve until told to stop."""
    rank = WORLD.Get_rank()
    WORLD.Barrier()
    deadline = time.monotonic() + TIMEOUT
    if rank == gen_rank:
        pull()
        while not tc.poll():
            assert time.monotonic() < deadline, "transfer timed out"
        assert not tc.busy
        for r in ctx_ranks:
            WORLD.send(True, dest=r, tag=TAG_DONE)
    elif rank in ctx_ranks:
        while not WORLD.Iprobe(source=gen_rank, tag=TAG_DONE):
            tc.poll()
            assert time.monotonic() < deadline, "serving timed out"
        WORLD.recv(source=gen_rank, tag=TAG_DONE)
        while tc.busy:  # the generation side's "done" (IPC) may still be in flight
            tc.poll()
            assert time.monotonic() < deadline
    WORLD.Barrier()


@pytest.mark.world(3)
@pytest.mark.parametrize("backend", ["ipc", "staged", "staged-mpi", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["tp2to1", "tp1to1"])
@pytest.mark.parametrize("gen_bs", [4, 8])
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zc", "copy"])
@pytest.mark.parametrize("async_buffer", [False, True], ids=["plainbuf", "asyncbuf"])
def test_transceiver_cuda(backend, dtype, layout, gen_bs, zero_copy, async_buffer):
    if backend == "ipc" or backend == "auto":
        pytest.importorskip("cupy")
    dev = _dev()
    rank = WORLD.Get_rank()
    ctx_bs, ntok = 4, 37
    nblk_ctx = -(-ntok // ctx_bs)
    tp = 2 if layout == "tp2to1" else 1
    ctx_ranks = (0, 1) if tp == 2 else (0,)
    ctx_state = CacheState.create(LAYERS, HEADS, HEAD_DIM, ctx_bs, dtype, tp_size=tp)
    gen_state = CacheState.create(LAYERS, HEADS, HEAD_DIM, gen_bs, dtype)
    # Small buffer: several chunks per transfer (pipelining and the reuse of staging buffers).
    cfg = CacheTransceiverConfig(enable_cache_transceiver=True, zero_copy=zero_copy, buffer_bytes=4096,
                                 async_buffer=async_buffer, backend=backend.removesuffix("-mpi"),
                                 shared_staging=backend != "staged-mpi")
    rng = random.Random(1234)
    ctx_ids = rng.sample(range(40), nblk_ctx)
    ctx_ids[2:6] = sorted(ctx_ids[2:6])  # a few runs too
    nblk_gen = -(-ntok // gen_bs)
    gen_ids = rng.sample(range(40), nblk_gen)
    glob = _global_values(40, ctx_bs, dtype).to(dev)
    comm = WORLD.Dup()
    if rank in ctx_ranks:
        h = slice(rank * HEADS // tp, (rank + 1) * HEADS // tp)
        pool = glob[:, :, :, h].contiguous()
        tc = KvTransceiver(comm, pool, ctx_state, ctx_ranks.index(rank), cfg)
    else:
        pool = torch.full((40, LAYERS, 2, HEADS, gen_bs, HEAD_DIM), SENTINEL, dtype=dtype, device=dev)
        tc = KvTransceiver(comm, pool, gen_state, 0, cfg)
    before = pool.clone()
    opaque = OpaqueState(0, ctx_ranks, 0, tuple(ctx_ids), ntok, ctx_state)
    _run(tc, 2, ctx_ranks, lambda: tc.start_pull(7, opaque, gen_ids))
    torch.cuda.synchronize()
    if rank == 2:
        for t in range(ntok):
            got = pool[gen_ids[t // gen_bs], :, :, :, t % gen_bs]
            want = glob[ctx_ids[t // ctx_bs], :, :, :, t % ctx_bs]
            assert torch.equal(got, want), f"token {t} differs"
        untouched = [b for b in range(40) if b not in gen_ids]
        assert torch.equal(pool[untouched], before[untouched]), "blocks outside the request changed"
        opened = tc.ipc.mapper.opened if tc.ipc is not None else 0
        if backend in ("ipc", "auto"):
            assert opened >= 1, "CUDA IPC was not used"
        elif backend == "staged":  # same node: through the shared ring, MPI carries only notices
            assert opened == 0 and tc.ring_chunks > 0 and tc.mpi.pinned.allocated == 0, "shared ring not used"
        else:
            assert opened == 0 and tc.ring_chunks == 0 and tc.mpi.pinned.allocated > 0, "staged MPI path not used"
    elif rank in ctx_ranks:
        assert torch.equal(pool, before), "the context pool changed"
    tc.close()
    comm.Free()


@pytest.mark.world(3)
def test_ipc_mapping_is_cached():
    """Several pulls from one context rank open its pool once."""
    pytest.importorskip("cupy")
    dev = _dev()
    rank = WORLD.Get_rank()
    state = CacheState.create(LAYERS, HEADS, HEAD_DIM, 4, torch.float32)
    cfg = CacheTransceiverConfig(enable_cache_transceiver=True, backend="ipc")
    comm = WORLD.Dup()
    glob = _global_values(16, 4, torch.float32).to(dev)
    pool = glob.clone() if rank == 0 else torch.zeros_like(glob)
    tc = KvTransceiver(comm, pool, state, 0, cfg)
    for i in range(3):
        op = OpaqueState(0, (0,), 0, (i, i + 1), 8, state)
        _run(tc, 2, (0,), lambda op=op, i=i: tc.start_pull(i + 1, op, [10 + i, 11 + i]))
    if rank == 2:
        torch.cuda.synchronize()
        assert tc.ipc.mapper.opened == 1
        assert tc.ipc_one_sided == 2, "pulls from a mapped pool should need no message"
        assert torch.equal(pool[12:14], glob[2:4])
    tc.close()
    comm.Free()


@pytest.mark.world(3)
@pytest.mark.parametrize("zero_copy", [True, False], ids=["zc", "copy"])
def test_ring_serves_two_generation_ranks_pull_after_pull(zero_copy):
    """One context rank, two generation ranks asking three pulls each at once, through the
    shared rings: the pulls take turns in each generation rank's ring, and the context rank's
    pulls on its GPU go to one generation rank at a time (shared_staging.py). Every token lands
    exactly."""
    dev = _dev()
    rank = WORLD.Get_rank()
    state = CacheState.create(LAYERS, HEADS, HEAD_DIM, 4, torch.float32)
    # 4 KiB over 8 slots: one 1.5 KiB block a chunk, 12 chunks a pull, so slots are reused in a pull
    cfg = CacheTransceiverConfig(enable_cache_transceiver=True, backend="staged", zero_copy=zero_copy,
                                 buffer_bytes=4096)
    comm = WORLD.Dup()
    glob = _global_values(40, 4, torch.float32).to(dev)
    pool = glob.clone() if rank == 0 else torch.full_like(glob, SENTINEL)
    tc = KvTransceiver(comm, pool, state, 0, cfg)
    pulls = [(list(range(12 * i, 12 * i + 12)), list(range(39 - 12 * i, 27 - 12 * i, -1))) for i in range(3)]
    deadline = time.monotonic() + TIMEOUT
    WORLD.Barrier()
    if rank == 0:
        done = 0
        while done < 2:
            tc.poll()
            if WORLD.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_DONE):
                WORLD.recv(source=MPI.ANY_SOURCE, tag=TAG_DONE)
                done += 1
            assert time.monotonic() < deadline, "serving timed out"
        assert tc.ring_chunks == 2 * 3 * 12 and not tc.busy
    else:
        for i, (ctx_ids, gen_ids) in enumerate(pulls):  # all at once: they take turns in our ring
            tc.start_pull(i, OpaqueState(0, (0,), 0, tuple(ctx_ids), 48, state), gen_ids)
        done = set()
        while len(done) < len(pulls):
            done |= {req_id for req_id, _, _ in tc.poll()}
            assert time.monotonic() < deadline, "transfer timed out"
        WORLD.send(True, dest=0, tag=TAG_DONE)
        torch.cuda.synchronize()
        for ctx_ids, gen_ids in pulls:
            assert torch.equal(pool[gen_ids], glob[ctx_ids])
        assert tc.ring_chunks == 3 * 12 and tc.ring.lent.made == 1, "one ring, lent pull after pull"
        assert tc.mpi.pinned.allocated == 0, "chunks went over MPI"
    WORLD.Barrier()
    tc.close()
    comm.Free()


@pytest.mark.world(3)
def test_a_short_first_pull_leaves_the_ring_big_enough():
    """The ring a generation rank keeps for a context rank is sized for the usual chunk
    (buffer_bytes / slots), not for the first pull: a long pull after a short one still goes
    through it, not over MPI."""
    dev = _dev()
    rank = WORLD.Get_rank()
    state = CacheState.create(4, 2, 128, 16, torch.float32)  # 128 KiB blocks: 4 MiB chunks hold 32
    cfg = CacheTransceiverConfig(enable_cache_transceiver=True, backend="staged")
    comm = WORLD.Dup()
    torch.manual_seed(5)  # the same values on every rank
    glob = torch.randn(48, 4, 2, 2, 16, 128, device=dev)
    pool = glob.clone() if rank == 0 else torch.zeros_like(glob)
    tc = KvTransceiver(comm, pool, state, 0, cfg)
    for i, n in enumerate((2, 48)):
        op = OpaqueState(0, (0,), 0, tuple(range(n)), 16 * n, state)
        _run(tc, 2, (0,), lambda op=op, i=i, n=n: tc.start_pull(i, op, list(range(n))))
    if rank == 2:
        torch.cuda.synchronize()
        assert torch.equal(pool, glob)
        assert tc.mpi.pinned.allocated == 0 and tc.ring.lent.made == 1, "the long pull went over MPI"
    tc.close()
    comm.Free()


def test_cuda_aware_mpi_refused_when_not_supported():
    from disagg_mpi.runtime.devices import mpi_cuda_support

    ok, why = mpi_cuda_support()
    if ok:
        pytest.skip(f"this MPI is CUDA-aware: {why}")
    dev = _dev()
    state = CacheState.create(LAYERS, HEADS, HEAD_DIM, 4, torch.float32)
    pool = torch.zeros((4, LAYERS, 2, HEADS, 4, HEAD_DIM), device=dev)
    cfg = CacheTransceiverConfig(enable_cache_transceiver=True, backend="cuda_aware_mpi")
    with pytest.raises(RuntimeError, match="CUDA-aware") as err:
        KvTransceiver(MPI.COMM_SELF, pool, state, 0, cfg)
    assert "MPIX_Query_cuda_support" in str(err.value) or "not built with CUDA" in str(err.value)


# ---- end to end: executors on one GPU --------------------------------------------------

MODEL = "random:tiny"


def _executor(rank: int, backend: str | None) -> dict:
    return executor([rank], [0], backend)


def _generate(topo) -> list[list[int]] | None:
    from disagg_mpi import Request, launch

    with launch(topo) as orch:
        if orch is None:
            return None
        outs = orch.generate([Request(p, max_tokens=10, ignore_eos=True) for p in prompts(6)], timeout=600)
        assert all(o.error_msg is None for o in outs), [o.error_msg for o in outs]
        orch.wait_pools_full()
        return [o.result.output_token_ids for o in outs]


_AGG: list = []


def _aggregated() -> list[list[int]] | None:
    """Two aggregated executors on cuda:0 (ranks 1 and 2), computed once per job."""
    from disagg_mpi.config import parse_topology

    if not _AGG:
        topo = parse_topology({"model": {"path": MODEL, "dtype": "float32"},
                               "generation_executors": [_executor(1, None), _executor(2, None)]})
        _AGG.append(_generate(topo))
    return _AGG[0]


@pytest.mark.world(3)
@pytest.mark.parametrize("backend", ["ipc", "staged"])
def test_disaggregated_on_one_gpu_equals_aggregated(backend):
    from disagg_mpi.config import parse_topology

    if backend == "ipc":
        pytest.importorskip("cupy")
    _dev()
    expected = _aggregated()
    topo = parse_topology({"model": {"path": MODEL, "dtype": "float32"},
                           "context_executors": [_executor(1, backend)],
                           "generation_executors": [_executor(2, backend)]})
    got = _generate(topo)
    if WORLD.Get_rank() == 0:
        assert got == expected
        assert all(len(g) == 10 for g in got)


def _transformers_greedy_on_gpu(prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """The same random weights through Hugging Face transformers on cuda:0, fp32, greedy.

    Random weights are drawn on the device they load to (CUDA's generator differs
    from the CPU's), so the model is built on cuda:0, as the executors build it.
    """
    import tempfile
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from disagg_mpi.model import load_model
    from tests.hf_folder import save_hf_folder

    with tempfile.TemporaryDirectory() as d:
        save_hf_folder(load_model(MODEL, device="cuda:0").cpu(), Path(d))
        hf = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).to("cuda:0").eval()
    hf.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda:0")
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                              pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


@pytest.mark.world(3)
def test_disaggregated_on_one_gpu_equals_transformers_on_gpu():
    """Disaggregated greedy tokens (staged path, both executors on GPU 0) equal transformers on the GPU."""
    from disagg_mpi.config import parse_topology

    _dev()
    topo = parse_topology({"model": {"path": MODEL, "dtype": "float32"},
                           "context_executors": [_executor(1, "auto")],
                           "generation_executors": [_executor(2, "auto")]})
    got = _generate(topo)
    if WORLD.Get_rank() == 0:
        assert got == _transformers_greedy_on_gpu(prompts(6), 10)

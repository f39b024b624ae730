"""KvTransceiver over real MPI: rank 0 is a context rank, rank 1 a generation rank.

Run: mpiexec -n 2 python -m mpi4py -m pytest --with-mpi tests/mpi/test_transceiver.py

Rank 0 fills its pool with values that name (block, layer, k/v, head, token,
dim), rank 1 pulls and checks that every token of the request landed, exact,
in its own blocks (whatever their size), and that no other block changed.
Sizes are tiny so the whole file runs in seconds.
"""

from __future__ import annotations

import sys
import time
import traceback

import pytest
import torch

MPI = pytest.importorskip("mpi4py.MPI")

from disagg_mpi.api import CacheTransceiverConfig
from disagg_mpi.transfer.cache_state import CacheState
from disagg_mpi.transfer.opaque import OpaqueState
from disagg_mpi.transfer.transceiver import KvTransceiver

WORLD = MPI.COMM_WORLD
pytestmark = [
    pytest.mark.mpi(min_size=2),
    pytest.mark.world(2),  # run in the 2-rank job only (scripts/run_tests.py counts the others as filtered)
]

LAYERS, HEADS, HEAD_DIM = 4, 2, 8
TAG_DONE = 4242
SENTINEL = -7.0
TIMEOUT = 30.0


def _pool(state: CacheState, local_rank: int, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    stage, _ = state.coords(local_rank)
    return torch.full((num_blocks, state.layer_split[stage], 2, state.local_kv_heads, state.block_size,
                       state.head_dim), SENTINEL, dtype=dtype)


def _ctx_values(num_blocks: int, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Known context pool: every element distinct (exact in bf16 too: small integers per block)."""
    shape = (num_blocks, LAYERS, 2, HEADS, block_size, HEAD_DIM)
    per_block = torch.arange(shape[1] * shape[2] * shape[3] * shape[4] * shape[5]).reshape(shape[1:])
    block = torch.arange(num_blocks).view(-1, 1, 1, 1, 1, 1)
    if dtype == torch.bfloat16:  # bf16 holds integers exactly only up to 256
        vals = (per_block % 200).unsqueeze(0) + block % 50
    else:
        vals = per_block.unsqueeze(0) + 10000 * block
    return vals.to(dtype)


def _token(pool: torch.Tensor, blocks: list[int], block_size: int, t: int) -> torch.Tensor:
    """KV of token t of a request: [layers, 2, heads, head_dim]."""
    return pool[blocks[t // block_size], :, :, :, t % block_size]


def _exchange(tc: KvTransceiver, pulls: list[tuple[int, OpaqueState, list[int]]]) -> dict[int, int]:
    """Rank 1 starts every pull at once; both ranks poll until rank 1 has them all."""
    rank = WORLD.Get_rank()
    deadline = time.monotonic() + TIMEOUT
    WORLD.Barrier()
    if rank == 1:
        for req_id, opaque, blocks in pulls:
            tc.start_pull(req_id, opaque, blocks)
        assert tc.receiving
        got: dict[int, int] = {}
        while len(got) < len(pulls):
            for req_id, nbytes, secs in tc.poll():
                assert req_id not in got and secs >= 0
                got[req_id] = nbytes
            assert time.monotonic() < deadline, f"transfer timed out; done {sorted(got)}"
        assert not tc.busy and not tc.receiving
        WORLD.send(True, dest=0, tag=TAG_DONE)
        return got
    while not WORLD.Iprobe(source=1, tag=TAG_DONE):
        tc.poll()
        assert time.monotonic() < deadline, "context side timed out"
    WORLD.recv(source=1, tag=TAG_DONE)
    tc.poll()
    assert not tc.busy, "context side still sending after the receiver finished"
    return {}


def _run(ctx_state: CacheState, gen_state: CacheState, gen_local_rank: int, cfg: CacheTransceiverConfig,
         requests: list[tuple[int, list[int], list[int]]], num_blocks: int = 64,
         dtype: torch.dtype = torch.float32, check_chunks: int | None = None) -> None:
    """requests: (num_tokens, ctx block ids, gen block ids)."""
    rank = WORLD.Get_rank()
    comm = WORLD.Dup()
    try:
        ctx_vals = _ctx_values(num_blocks, ctx_state.block_size, dtype)
        if rank == 0:
            pool = ctx_vals.clone()
            tc = KvTransceiver(comm, pool, ctx_state, 0, cfg)
        else:
            pool = _pool(gen_state, gen_local_rank, num_blocks, dtype)
            tc = KvTransceiver(comm, pool, gen_state, gen_local_rank, cfg)
        pulls = [(100 + i, OpaqueState(0, (0,), 7 + i, tuple(cb), ntok, ctx_state), gb)
                 for i, (ntok, cb, gb) in enumerate(requests)]
        try:
            if rank == 1 and check_chunks is not None:
                _check_chunk_count(tc, pulls[0], check_chunks)
            got = _exchange(tc, pulls)
        except BaseException:  # noqa: BLE001 - any failure here must end the job
            # A failure while the peer still waits would hang the job: end it loudly instead.
            traceback.print_exc()
            sys.stderr.flush()
            WORLD.Abort(1)
        if rank == 0:
            assert torch.equal(pool, ctx_vals), "the context pool changed"
            return
        # The slice of (layers, heads) this generation rank holds, in global numbers.
        g_stage, g_tp = gen_state.coords(gen_local_rank)
        l0, l1 = gen_state.layer_range(g_stage)
        h0, h1 = gen_state.kv_head_range(g_tp)
        touched = set()
        for ntok, cb, gb in requests:
            for t in range(ntok):
                want = _token(ctx_vals, cb, ctx_state.block_size, t)[l0:l1, :, h0:h1]
                have = _token(pool, gb, gen_state.block_size, t)
                assert torch.equal(have, want), f"token {t} of a {ntok}-token request differs"
            touched.update(gb[: -(-ntok // gen_state.block_size)])
        for b in range(num_blocks):
            if b not in touched:
                assert torch.all(pool[b] == SENTINEL), f"block {b} (not in any request) was written"
        for (ntok, _, _), (req_id, _, _) in zip(requests, pulls):
            nbytes = got[req_id]
            assert nbytes >= ntok * gen_state.bytes_per_token_per_rank(gen_local_rank)
    finally:
        comm.Free()


def _check_chunk_count(tc: KvTransceiver, pull: tuple[int, OpaqueState, list[int]], at_least: int) -> None:
    """The request must really go in several chunks (a look inside, before any byte moves)."""
    from disagg_mpi.transfer.chunks import chunking_for
    from disagg_mpi.transfer.plan import make_plan

    _, opaque, blocks = pull
    for it in make_plan(opaque.cache_state, tc.state)[tc.local_rank]:
        ch = chunking_for(it, opaque.cache_state, tc.state, tc.local_rank, opaque.num_tokens, tc.cfg,
                       list(opaque.block_ids), list(blocks))
        assert len(ch.chunks()) >= at_least, ch.chunks()


def _state(block_size: int, tp: int = 1, pp: int = 1, dtype: str = "float32") -> CacheState:
    return CacheState.create(LAYERS, HEADS, HEAD_DIM, block_size, dtype, tp_size=tp, pp_size=pp)


def _cfg(zero_copy: bool, **kw) -> CacheTransceiverConfig:
    return CacheTransceiverConfig(enable_cache_transceiver=True, zero_copy=zero_copy, **kw)


# Scattered, partly contiguous block tables (runs on one side that break on the other).
CTX_BLOCKS = [5, 6, 7, 2, 3, 20, 21, 22, 23, 9]
GEN_BLOCKS = [40, 41, 12, 13, 14, 15, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 50, 51, 52, 53]


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zc", "copy"])
@pytest.mark.parametrize("ctx_bs,gen_bs", [(16, 16), (16, 8), (16, 32)])
@pytest.mark.parametrize("num_tokens", [45, 64, 1])
def test_pull_exact(zero_copy, ctx_bs, gen_bs, num_tokens):
    nctx = -(-num_tokens // ctx_bs)
    ngen = -(-num_tokens // gen_bs)
    _run(_state(ctx_bs), _state(gen_bs), 0, _cfg(zero_copy),
         [(num_tokens, CTX_BLOCKS[:nctx], GEN_BLOCKS[:ngen])])


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zc", "copy"])
def test_concurrent_pulls(zero_copy):
    """Four requests in flight at once (more than send_concurrency=2: some queue on the sender)."""
    reqs = [(45, [0, 1, 2], [10, 11, 12]),
            (17, [8, 4], [20, 21]),
            (64, [30, 31, 32, 33], [3, 5, 6, 7]),
            (3, [40], [41])]
    _run(_state(16), _state(16), 0, _cfg(zero_copy, send_concurrency=2), reqs)


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zc", "copy"])
@pytest.mark.parametrize("gen_bs", [16, 8])
def test_bounded_buffer_many_chunks(zero_copy, gen_bs):
    """buffer_bytes far below one request: the copy path goes block by block, zero-copy in short runs."""
    state = _state(16)
    block_bytes = state.bytes_per_token_per_rank(0) * 16
    ntok = 150  # 10 context blocks
    ctx_blocks = list(range(10, 20))
    gen_blocks = list(range(30, 30 + -(-ntok // gen_bs)))
    _run(state, _state(gen_bs), 0, _cfg(zero_copy, buffer_bytes=2 * block_bytes),
         [(ntok, ctx_blocks, gen_blocks)], check_chunks=5)


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zc", "copy"])
@pytest.mark.parametrize("gen_layout", ["tp2_rank1", "pp2_rank1", "tp2pp2_rank3"])
def test_reshard_to_a_shard(zero_copy, gen_layout):
    """The generation rank holds only part of the heads / layers: it takes just its slice."""
    gen, local = {"tp2_rank1": (_state(16, tp=2), 1), "pp2_rank1": (_state(16, pp=2), 1),
                  "tp2pp2_rank3": (_state(16, tp=2, pp=2), 3)}[gen_layout]
    _run(_state(16), gen, local, _cfg(zero_copy), [(45, [4, 5, 1], [7, 8, 9])])


def test_bfloat16():
    state = _state(16, dtype="bfloat16")
    _run(state, state, 0, _cfg(True), [(40, [1, 2, 3], [4, 5, 6])], dtype=torch.bfloat16)
    _run(state, _state(8, dtype="bfloat16"), 0, _cfg(False), [(40, [1, 2, 3], [4, 5, 6, 7, 8])],
         dtype=torch.bfloat16)


def test_sequential_receive_and_no_parallel_send():
    _run(_state(16), _state(16), 0, _cfg(False, parallel_receive=False, parallel_send=False),
         [(20, [1, 2], [3, 4]), (33, [5, 6, 7], [8, 9, 10])])


def test_max_num_tokens_sizes_the_buffer():
    """cache_transceiver_config.max_num_tokens is the buffer in tokens of this rank's KV."""
    comm = MPI.COMM_WORLD.Dup()
    try:
        state = _state(4)
        pool = torch.zeros(8, LAYERS, 2, HEADS, 4, HEAD_DIM)
        tc = KvTransceiver(comm, pool, state, 0, _cfg(False, max_num_tokens=100))
        assert tc.cfg.buffer_bytes == 100 * state.bytes_per_token_per_rank(0)
        assert KvTransceiver(comm, pool, state, 0, _cfg(False)).cfg.buffer_bytes == 32 << 20
    finally:
        comm.Free()

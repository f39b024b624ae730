"""Executors on separate GPUs (needs 2 GPUs, 4 ranks):

    mpirun -n 4 python -m mpi4py -m pytest --with-mpi tests/gpu/test_multi_gpu.py

- context executor on GPU 0, generation executor on GPU 1 (CUDA IPC between the GPUs, and
  staged): greedy tokens equal the aggregated run on one GPU;
- a TP2 executor on GPUs 0 and 1 sums over NCCL and equals TP1 token for token;
- re-sharding between GPUs: context TP1 -> generation TP2 and context TP2 -> generation TP1;
- the TP all-reduce picks NCCL for ranks on distinct GPUs and sums exactly.

Each topology runs on the first ranks it needs (a split of the world); the others wait.
The model is `random:tiny` in fp32 (8 heads, 2 KV heads: TP2 splits it).
"""

from __future__ import annotations

import pytest

from tests.gpu.topologies import executor, prompts

torch = pytest.importorskip("torch")
MPI = pytest.importorskip("mpi4py.MPI")

WORLD = MPI.COMM_WORLD
pytestmark = [pytest.mark.mpi(min_size=4), pytest.mark.world(4),
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 GPUs")]

MODEL = "random:tiny"
NEW_TOKENS = 10


def _ex(ranks: list[int], gpus: list[int], backend: str | None = "auto") -> dict:
    return executor(ranks, gpus, backend, max_batch_size=4)


def _run(topo: dict) -> tuple[list[list[int]], list[dict]]:
    """Greedy tokens and metrics of every prompt, served by `topo` on the first ranks it needs
    (the same on every rank of the world)."""
    from disagg_mpi import Request, launch
    from disagg_mpi.config import parse_topology

    t = parse_topology({"model": {"path": MODEL, "dtype": "float32"}, **topo})
    sub = WORLD.Split(0 if WORLD.Get_rank() < t.world_size else MPI.UNDEFINED, WORLD.Get_rank())
    got = None
    if sub != MPI.COMM_NULL:
        with launch(t, world=sub) as orch:
            if orch is not None:
                outs = orch.generate([Request(p, max_tokens=NEW_TOKENS, ignore_eos=True) for p in prompts(8)],
                                     timeout=600)
                errors = [o.error_msg for o in outs if o.error_msg]
                got = errors or ([o.result.output_token_ids for o in outs], [o.result.metrics for o in outs])
                orch.wait_pools_full()
        sub.Free()
    got = WORLD.bcast(got, root=0)
    assert isinstance(got, tuple), f"requests failed: {got}"
    return got


_REF: list = []


def _reference() -> list[list[int]]:
    """One aggregated TP1 executor on GPU 0 (2 ranks), once per job."""
    if not _REF:
        _REF.append(_run({"generation_executors": [_ex([1], [0], None)]})[0])
    return _REF[0]


@pytest.mark.parametrize("backend", ["ipc", "staged"])
def test_context_on_gpu0_generation_on_gpu1_equals_aggregated(backend):
    if backend == "ipc":
        pytest.importorskip("cupy")
    tokens, metrics = _run({"context_executors": [_ex([1], [0], backend)],
                            "generation_executors": [_ex([2], [1], backend)]})
    assert tokens == _reference()
    assert all(len(t) == NEW_TOKENS for t in tokens)
    assert all(m.kv_transfer_bytes > 0 and m.generation_executor == 1 for m in metrics)


def test_tp2_over_nccl_equals_tp1():
    pytest.importorskip("cupy")
    tokens, _ = _run({"generation_executors": [_ex([1, 2], [0, 1], None)]})
    assert tokens == _reference()


@pytest.mark.parametrize("ctx,gen", [
    pytest.param(([1], [0]), ([2, 3], [1, 0]), id="ctx_tp1-gen_tp2"),
    pytest.param(([1, 2], [0, 1]), ([3], [1]), id="ctx_tp2-gen_tp1"),
])
def test_resharding_between_gpus_equals_aggregated(ctx, gen):
    pytest.importorskip("cupy")
    tokens, metrics = _run({"context_executors": [_ex(*ctx)], "generation_executors": [_ex(*gen)]})
    assert tokens == _reference()
    assert all(m.kv_transfer_bytes > 0 for m in metrics)


def test_tp_all_reduce_uses_nccl_on_distinct_gpus():
    pytest.importorskip("cupy")
    from disagg_mpi.runtime.allreduce import tp_all_reduce
    from disagg_mpi.runtime.devices import node_name

    rank = WORLD.Get_rank()
    sub = WORLD.Split(0 if rank < 2 else MPI.UNDEFINED, rank)
    if sub != MPI.COMM_NULL:
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
        fn = tp_all_reduce(sub, dev, node_name(), rank)
        assert fn.__qualname__.startswith("nccl_all_reduce"), fn.__qualname__
        x = torch.full((1000,), float(rank + 1), device=dev, dtype=torch.bfloat16)
        out = fn(x)
        torch.cuda.synchronize(dev)
        assert out.device == dev and bool((out == 3).all())
        sub.Free()
    WORLD.Barrier()

"""Shared bits of the multi-rank tests."""

from __future__ import annotations

from pathlib import Path

from mpi4py import MPI

from disagg_mpi.config import parse_topology

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def rank() -> int:
    return MPI.COMM_WORLD.Get_rank()


def tiny_topology(n_ctx: int, n_gen: int, router: str | dict = "round_robin", **ex_extra) -> object:
    """A topology over the small random model, ranks assigned in order."""
    kv = {"block_size": 4, "num_blocks": 256, **ex_extra.pop("kv_cache", {})}

    def ex(start: int) -> dict:
        return {"participant_ids": [start], "kv_cache": kv,
                "max_batch_size": 16, "max_num_tokens": 256,
                **({"cache_transceiver_config": {"enable_cache_transceiver": True}} if n_ctx else {}),
                **ex_extra}
    ctx = [ex(1 + i) for i in range(n_ctx)]
    gen = [ex(1 + n_ctx + i) for i in range(n_gen)]
    data = {"model": {"path": "random:tiny", "dtype": "float32"}, "router": router,
            "generation_executors": gen}
    if ctx:
        data["context_executors"] = ctx
    return parse_topology(data)


def tiny_prompts(n: int, vocab: int = 1024) -> list[list[int]]:
    """Deterministic prompts of mixed lengths (1..40 tokens)."""
    return [[(7 * i + 13 * j + 1) % vocab for j in range(1 + (i * 11) % 40)] for i in range(n)]


def disaggregated_vs_in_process(make_requests, ctx: tuple[int, int] = (1, 2), gen: tuple[int, int] = (1, 2)):
    """`make_requests()` through a context -> generation job over the tiny model, each executor of
    (TP, PP) `ctx` / `gen` (default PP2 -> PP2: job size 5), then through one aggregated executor
    in process. On rank 0: (the job's responses, the in-process responses, that executor); None on
    the other ranks."""
    from disagg_mpi import Executor, ExecutorConfig, KvCacheConfig, launch
    from tests.mpi.test_parallel import _disagg_topology

    with launch(_disagg_topology("random:tiny", ctx, gen)) as orch:
        if orch is None:
            return None
        outs = orch.generate(make_requests(), timeout=600)
        assert all(o.error_msg is None for o in outs), [o.error_msg for o in outs]
        orch.wait_pools_full()
    ex = Executor("random:tiny", ExecutorConfig(max_batch_size=16, max_num_tokens=96,
                                                kv_cache_config=KvCacheConfig(4, 512)))
    return outs, ex.generate(make_requests()), ex

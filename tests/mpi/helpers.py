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

"""Executor specs and prompts shared by the end-to-end GPU tests (random:tiny, fp32)."""

from __future__ import annotations


def executor(ranks: list[int], gpus: list[int], backend: str | None, max_batch_size: int = 1) -> dict:
    """One executor's YAML dict: TP over `ranks` on node-local `gpus`; with a cache transceiver
    (small buffers, so transfers take several chunks) unless `backend` is None."""
    d = {"participant_ids": ranks, "device_ids": gpus, "tensor_parallel_size": len(ranks),
         "max_batch_size": max_batch_size, "max_num_tokens": 256, "kv_cache": {"block_size": 4, "num_blocks": 256}}
    if backend is not None:
        d["cache_transceiver_config"] = {"enable_cache_transceiver": True, "backend": backend,
                                         "buffer_bytes": 65536}
    return d


def prompts(n: int) -> list[list[int]]:
    """n prompts of 1 to 40 token ids below 1024."""
    return [[(7 * i + 13 * j + 1) % 1024 for j in range(1 + (i * 11) % 40)] for i in range(n)]

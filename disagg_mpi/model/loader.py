"""`load_model(spec)`: one entry point for named, HF-folder, GGUF and random models."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from disagg_mpi.model.config import PRESETS, ModelConfig, preset

if TYPE_CHECKING:   # (torch and the model load with load_model: reading a config needs neither)
    import torch

    from disagg_mpi.model.llama import LlamaModel
    from disagg_mpi.model.parallel import ShardSpec

ACCEPTED = ("'smollm2' (default), a HF folder (config.json + safetensors), a .gguf file, "
            f"or random:<preset> with preset in {sorted(PRESETS)}")


def _resolve(spec: str | os.PathLike) -> tuple[str, object]:
    """-> (kind, payload): ('random', preset), ('gguf', path) or ('hf', folder)."""
    s = str(spec)
    if s.startswith("random:"):
        name = s[len("random:"):]
        if name not in PRESETS:
            raise ValueError(f"model spec {s!r}: unknown preset {name!r}; accepted: {ACCEPTED}")
        return "random", name
    if s in ("smollm2", "default"):
        from disagg_mpi.model.registry import default_model_path
        return "gguf", str(default_model_path("smollm2"))
    p = Path(s).expanduser()
    if s.endswith(".gguf"):
        if not p.is_file():
            raise FileNotFoundError(f"model spec {s!r}: GGUF file not found")
        return "gguf", str(p)
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf", str(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", str(ggufs[0])
        raise FileNotFoundError(f"model spec {s!r}: folder has no config.json (and not exactly one .gguf)")
    if p.exists():
        raise ValueError(f"model spec {s!r} is not supported; accepted: {ACCEPTED}")
    raise FileNotFoundError(f"model spec {s!r} not found; accepted: {ACCEPTED}")


def load_model_config(spec: str | os.PathLike) -> ModelConfig:
    """The model's config, after checking that we support it: its architecture and options, and
    every tensor name of the checkpoint (names only, no data; raises ValueError naming the culprit)."""
    kind, arg = _resolve(spec)
    if kind == "random":
        return preset(arg)
    if kind == "hf":
        from disagg_mpi.model.hf_loader import HFCheckpoint
        return HFCheckpoint(arg).config
    from disagg_mpi.model.gguf_loader import GGUFCheckpoint
    return GGUFCheckpoint(arg).config


def load_model(spec: str | os.PathLike = "smollm2", dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", shard: ShardSpec | None = None,
               seed: int = 0, quantization: str = "none", quantize_lm_head: bool = True) -> LlamaModel:
    """Build this rank's shard of the model and fill it (dtype None: float32); eval mode, no grads.
    `quantization` 'int8'/'int4' (CPU only, see quant.py) quantizes the decoder's projections after
    the load, and the lm_head in int8 unless `quantize_lm_head` is false."""
    import torch

    from disagg_mpi.model.llama import LlamaModel
    from disagg_mpi.model.parallel import ShardSpec
    from disagg_mpi.model.quant import check_quantization, quantize_model
    from disagg_mpi.model.weights import load_weights

    dtype = torch.float32 if dtype is None else dtype
    check_quantization(quantization, device)   # before the weights load, not after
    shard = shard or ShardSpec()
    kind, arg = _resolve(spec)
    ckpt = None
    if kind == "random":
        from disagg_mpi.model.random_init import random_fetch
        cfg = preset(arg)
        fetch = random_fetch(cfg, seed, dtype, device)
    elif kind == "hf":
        from disagg_mpi.model.hf_loader import HFCheckpoint
        ckpt = HFCheckpoint(arg)
        cfg, fetch = ckpt.config, ckpt.fetcher()
    else:
        from disagg_mpi.model.gguf_loader import GGUFCheckpoint
        ckpt = GGUFCheckpoint(arg)
        cfg, fetch = ckpt.config, ckpt.fetcher()
        ckpt.drop_metadata()
    model = LlamaModel.empty(cfg, shard, dtype=dtype, device=device)
    load_weights(model, fetch)
    del fetch, ckpt
    give_back_memory()
    model.eval()
    model.requires_grad_(False)
    model = quantize_model(model, quantization, lm_head=quantize_lm_head)
    give_back_memory()   # (the full-precision projections a quantization replaced, too)
    return model


def give_back_memory() -> None:
    """Return the loaders' freed memory (dequantization buffers, a checkpoint's parsed metadata) to
    the system: an executor's resident memory is then its weights, its KV pool and little else."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the allocator keeps it for reuse

"""HF checkpoint folder: config.json + model.safetensors (single or index-sharded).

Tensors are opened lazily with safe_open and only this rank's slice is read.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from disagg_mpi.model.config import ModelConfig
from disagg_mpi.model.families import check_names, checkpoint_names

if TYPE_CHECKING:   # (reading the config needs no torch: rank 0 and the launcher never load it)
    import torch

    from disagg_mpi.model.weights import Fetch


def read_hf_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a HF model folder)")
    cfg = ModelConfig.from_hf_dict(json.loads(path.read_text()))
    return with_generation_eos(cfg, Path(folder) / "generation_config.json")


def with_generation_eos(cfg: ModelConfig, path: Path) -> ModelConfig:
    """`cfg` with the end-of-sequence ids of generation_config.json too: instruct checkpoints put
    their turn-end tokens there (Llama 3.x: <|eot_id|>, <|eom_id|>), and transformers stops on them."""
    if not path.is_file():
        return cfg
    eos = json.loads(path.read_text()).get("eos_token_id")
    extra = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    merged = list(dict.fromkeys([*cfg.eos_token_ids, *(int(t) for t in extra)]))
    return dataclasses.replace(cfg, eos_token_ids=merged)


def _weight_map(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in wm.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {k: single for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable


class HFCheckpoint:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = read_hf_config(self.folder)
        self.weight_map = _weight_map(self.folder)
        self._handles: dict[Path, object] = {}
        # The whole checkpoint's names, whatever this rank's shard: never load it half-understood.
        check_names(self.weight_map, checkpoint_names(self.config), str(folder))

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path]

    def fetch(self, name: str, dim: int | None, start: int, end: int) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.folder}: tensor {name!r} missing from the checkpoint")
        sl = self._handle(self.weight_map[name]).get_slice(name)
        if dim is None:
            return sl[:]
        index = tuple([slice(None)] * dim + [slice(start, end)])
        return sl[index]

    def close(self) -> None:
        self._handles.clear()

    def fetcher(self) -> Fetch:
        return self.fetch

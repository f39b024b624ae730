"""Model layer: Llama-family forward pass over a paged KV pool, loaders, tokenizer.

Names load on first use (PEP 562): rank 0 and the launcher read a model's config and tokenizer
through this package without importing torch (about 220 MiB they would hold for nothing).
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PRESETS": "config", "ModelConfig": "config",
    "AttentionMetadata": "context", "forward_context": "context", "get_forward_context": "context",
    "set_forward_context": "context",
    "LlamaModel": "llama",
    "load_model": "loader", "load_model_config": "loader",
    "ShardSpec": "parallel", "validate_split": "parallel",
    "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)

"""Model layer: Llama-family forward pass over a paged KV pool, loaders, tokenizer."""
from disagg_mpi.model.config import ModelConfig, PRESETS
from disagg_mpi.model.context import (AttentionMetadata, forward_context, get_forward_context,
                                      set_forward_context)
from disagg_mpi.model.parallel import ShardSpec, validate_split
from disagg_mpi.model.llama import LlamaModel
from disagg_mpi.model.loader import load_model, load_model_config
from disagg_mpi.model.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "ModelConfig", "PRESETS", "AttentionMetadata", "forward_context", "get_forward_context",
    "set_forward_context", "ShardSpec", "validate_split", "LlamaModel", "load_model",
    "load_model_config", "Tokenizer", "load_tokenizer",
]

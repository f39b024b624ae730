"""Model layer: Llama-family forward pass over a paged KV pool, loaders, tokenizer."""
from disagg_mpi.model.config import PRESETS, ModelConfig
from disagg_mpi.model.context import (
                                      AttentionMetadata,
                                      forward_context,
                                      get_forward_context,
                                      set_forward_context,
)
from disagg_mpi.model.llama import LlamaModel
from disagg_mpi.model.loader import load_model, load_model_config
from disagg_mpi.model.parallel import ShardSpec, validate_split
from disagg_mpi.model.tokenizer import Tokenizer, load_tokenizer

__all__ = [
                                      "PRESETS",
                                      "AttentionMetadata",
                                      "LlamaModel",
                                      "ModelConfig",
                                      "ShardSpec",
                                      "Tokenizer",
                                      "forward_context",
                                      "get_forward_context",
                                      "load_model",
                                      "load_model_config",
                                      "load_tokenizer",
                                      "set_forward_context",
                                      "validate_split",
]

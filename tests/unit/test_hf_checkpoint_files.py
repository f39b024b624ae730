"""What a HF folder says beside its weights: generation_config.json's end-of-sequence ids, and the
checkpoint's own dtype for `dtype: auto`."""

from __future__ import annotations

import json

from disagg_mpi.config import parse_topology
from disagg_mpi.model.hf_loader import read_hf_config

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2}


def _folder(tmp_path, config: dict, generation: dict | None = None):
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_generation_config_adds_its_end_of_sequence_ids(tmp_path):
    # Llama 3.x instruct: config.json names <|end_of_text|>, generation_config.json the turn ends too.
    cfg = read_hf_config(_folder(tmp_path, {**LLAMA, "eos_token_id": 128001},
                                 {"eos_token_id": [128001, 128008, 128009]}))
    assert cfg.eos_token_ids == [128001, 128008, 128009]
    plain = tmp_path / "plain"
    plain.mkdir()
    assert read_hf_config(_folder(plain, LLAMA)).eos_token_ids == [2]


def test_checkpoint_dtype_decides_auto_on_a_gpu_only(tmp_path):
    cfg = read_hf_config(_folder(tmp_path, {**LLAMA, "torch_dtype": "float16"}))
    assert cfg.torch_dtype == "float16"
    ex = {"kv_cache": {"block_size": 4, "num_blocks": 16}}
    topo = parse_topology({"model": {"path": "random:tiny"}, "generation_executors": [
        {"participant_ids": [1], "device_ids": [0], **ex}, {"participant_ids": [2], **ex}]})
    gpu, cpu = topo.generation_executors
    assert topo.dtype_for(gpu, cfg.torch_dtype) == "float16"
    assert topo.dtype_for(gpu, "float32") == "bfloat16" and topo.dtype_for(gpu, None) == "bfloat16"
    assert topo.dtype_for(cpu, "float16") == "float32"   # CPU: the fp32 exactness reference
    pinned = parse_topology({"model": {"path": "random:tiny", "dtype": "bfloat16"},
                             "generation_executors": [{"participant_ids": [1], **ex}]})
    assert pinned.dtype_for(pinned.generation_executors[0], "float16") == "bfloat16"

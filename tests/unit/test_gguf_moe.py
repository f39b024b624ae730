"""Mixture-of-experts GGUF files (Mixtral as `llama` + expert_count, qwen3moe, qwen2moe): written
from a transformers checkpoint with gguf's GGUFWriter (experts stacked as llama.cpp stores them),
loaded by us, decoded token for token as transformers decodes the checkpoint (fp32)."""
import numpy as np
import pytest
import torch

from disagg_mpi.model import ShardSpec, load_model, load_model_config
from tests.gguf_file import write_gguf
from tests.hf_folder import family_checkpoint
from tests.oracle import hf_greedy
from tests.unit.test_model_families import NEW, PROMPTS, executor_tokens

pytest.importorskip("gguf")
pytest.importorskip("transformers")


@pytest.mark.parametrize("name,arch", [("mixtral", "llama"), ("qwen3-moe", "qwen3moe"), ("qwen2-moe", "qwen2moe")])
def test_moe_gguf_greedy_equals_transformers(tmp_path, name, arch):
    folder = family_checkpoint(name)
    path = write_gguf(folder, tmp_path / "m.gguf")
    import gguf

    assert gguf.GGUFReader(str(path)).fields["general.architecture"].contents() == arch
    g, h = load_model_config(str(path)), load_model_config(str(folder))
    assert g.replace(rms_norm_eps=h.rms_norm_eps) == h   # experts, top-k, norm, dense layers, shared
    assert executor_tokens(load_model(str(path))) == hf_greedy(PROMPTS, NEW, folder, None)


def test_quantized_experts_dequantize_per_expert_and_shard(tmp_path):
    """Q8_0 experts: each expert's slice is gguf's own dequantization of its quantized rows, whole
    and as TP rank 1 of 2 holds it (half of each expert's FFN rows / down columns)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file

    folder = family_checkpoint("qwen3-moe")
    path = write_gguf(folder, tmp_path / "q8.gguf", expert_qtype=Q.Q8_0)
    sd = load_file(str(folder / "model.safetensors"))

    def q8(name):
        return torch.from_numpy(dequantize(quantize(sd[name].float().numpy(), Q.Q8_0), Q.Q8_0))

    full = load_model(str(path))
    half = load_model(str(path), shard=ShardSpec(1, 2, all_reduce=lambda x: x))
    f = full.config.moe_intermediate_size
    for e in (0, 5):
        p = f"model.layers.2.mlp.experts.{e}."
        gate, up, down = q8(p + "gate_proj.weight"), q8(p + "up_proj.weight"), q8(p + "down_proj.weight")
        assert not torch.equal(gate, sd[p + "gate_proj.weight"])   # really quantized
        ex = full.model.layers["2"].mlp.experts
        assert torch.equal(ex.gate_up_proj[e], torch.cat([gate, up])) and torch.equal(ex.down_proj[e], down)
        ex = half.model.layers["2"].mlp.experts
        assert torch.equal(ex.gate_up_proj[e], torch.cat([gate[f // 2:], up[f // 2:]]))
        assert torch.equal(ex.down_proj[e], down[:, f // 2:])


def test_experts_on_a_dense_architecture_refused(tmp_path):
    path = write_gguf(family_checkpoint("qwen3-moe"), tmp_path / "x.gguf", arch="qwen3")
    with pytest.raises(ValueError, match=r"qwen3.expert_count=8: experts are not supported for "
                                         r"general.architecture='qwen3'"):
        load_model_config(str(path))


def test_moe_architecture_without_experts_refused(tmp_path):
    path = write_gguf(family_checkpoint("qwen3"), tmp_path / "d.gguf", arch="qwen3moe",
                      extra={"blk.0.unused.weight": np.ones(4)})
    with pytest.raises(ValueError, match=r"general.architecture='qwen3moe' without qwen3moe.expert_count"):
        load_model_config(str(path))

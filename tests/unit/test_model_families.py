"""Model families against transformers, and refusing what we do not support, by name.

Each checkpoint is written by transformers itself (tests/hf_folder.py, built once per
machine); greedy tokens of the in-process Executor must equal transformers' `generate`.
"""
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request
from disagg_mpi.engine.executor import Executor
from disagg_mpi.model import ShardSpec, load_model, load_model_config
from disagg_mpi.model.families import checkpoint_names
from disagg_mpi.model.parallel import even_layer_split, layer_range
from disagg_mpi.model.weights import weight_plan
from tests.hf_folder import family_checkpoint
from tests.oracle import hf_greedy

pytest.importorskip("transformers")

PROMPTS = [[5, 17, 300, 42, 7, 99, 100, 3, 250], [11, 12, 13], list(range(20, 60)), [7] * 23]
NEW = 12


def executor_tokens(model, prompts=PROMPTS, new=NEW, max_num_tokens=16):
    """Greedy tokens of our in-process Executor (prompts of 40 tokens prefill in chunks)."""
    ex = Executor(model, ExecutorConfig(max_batch_size=8, max_num_tokens=max_num_tokens,
                                        kv_cache_config=KvCacheConfig(4, 256)))
    outs = ex.generate([Request(p, max_tokens=new, ignore_eos=True) for p in prompts])
    assert all(o.error_msg is None for o in outs), [o.error_msg for o in outs]
    return [o.result.output_token_ids for o in outs]


# ---- Qwen3 dense -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["qwen3", "qwen3-tied"])
def test_qwen3_greedy_equals_transformers(name):
    folder = family_checkpoint(name)
    cfg = load_model_config(str(folder))
    assert cfg.architecture == "qwen3" and cfg.qk_norm and cfg.head_dim * cfg.num_heads != cfg.hidden_size
    model = load_model(str(folder))
    assert model.lm_head.weight is model.model.embed_tokens.weight or not cfg.tie_word_embeddings
    assert executor_tokens(model) == hf_greedy(PROMPTS, NEW, folder, None)


def test_qwen3_ignoring_qk_norm_would_differ():
    """The check above has teeth: the same weights with the q/k norms set to ones change the tokens."""
    folder = family_checkpoint("qwen3")
    model = load_model(str(folder))
    with torch.no_grad():
        for layer in model.model.layers.values():
            layer.self_attn.q_norm.weight.fill_(1.0)
            layer.self_attn.k_norm.weight.fill_(1.0)
    assert executor_tokens(model) != hf_greedy(PROMPTS, NEW, folder, None)


def test_qwen3_triton_decode_path_equals_transformers(monkeypatch):
    """The fast decode path (q/k norm in torch, then the fused RoPE + KV write + attention kernel,
    Triton norms and SwiGLU around it) gives transformers' tokens. Runs on CPU under the Triton
    interpreter (`TRITON_INTERPRET=1`, triton installed); skipped otherwise (CI has no triton)."""
    assert_fast_path_equals_transformers(monkeypatch, "qwen3")


def assert_fast_path_equals_transformers(monkeypatch, family: str) -> None:
    """Greedy tokens of `family`'s checkpoint through the executor on the Triton fast decode path
    (no CUDA graphs: the interpreter runs on CPU) equal transformers'; skips without the interpreter."""
    import functools

    import disagg_mpi.engine.executor as executor_mod
    from disagg_mpi.engine.model_runner import ModelRunner
    from disagg_mpi.model import triton_kernels as tk

    if not tk.available("cpu"):
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    monkeypatch.setattr(executor_mod, "ModelRunner", functools.partial(ModelRunner, fast_decode=True,
                                                                       cuda_graphs=False))
    folder = family_checkpoint(family)
    model = load_model(str(folder))
    assert model.supports_fast_decode()
    prompts = PROMPTS[:2]
    ex_tokens = executor_tokens(model, prompts, 6, max_num_tokens=256)
    assert model._fast_kernels
    assert ex_tokens == hf_greedy(prompts, 6, folder, None)


def test_qwen3_gguf_equals_safetensors(tmp_path):
    """A qwen3 GGUF (llama.cpp names, attn_q_norm / attn_k_norm) loads to the same logits."""
    from tests.gguf_file import write_gguf
    from tests.unit.test_model_llama import prefill_logits

    folder = family_checkpoint("qwen3")
    path = write_gguf(folder, tmp_path / "q.gguf")
    g, h = load_model_config(str(path)), load_model_config(str(folder))
    assert g.rms_norm_eps == pytest.approx(h.rms_norm_eps) and g.replace(rms_norm_eps=h.rms_norm_eps) == h
    a, b = load_model(str(folder)), load_model(str(path))   # eps is float32 in GGUF: not bit-equal
    torch.testing.assert_close(prefill_logits(a, PROMPTS[0]), prefill_logits(b, PROMPTS[0]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen3", "qwen3-tied", "mixtral", "qwen3-moe", "qwen2-moe"])
def test_shards_consume_exactly_the_checkpoint(name):
    """Over every TP x PP shard, the weight plans read every checkpoint tensor and nothing else."""
    cfg = load_model_config(str(family_checkpoint(name)))
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            split = even_layer_split(cfg.num_layers, pp)
            used = set()
            for stage in range(pp):
                l0, l1 = layer_range(stage, split)
                for r in range(tp):
                    with torch.device("meta"):
                        from disagg_mpi.model import LlamaModel
                        m = LlamaModel(cfg, ShardSpec(r, tp, l0, l1, all_reduce=lambda x: x))
                    used |= {ws.source for ws in weight_plan(m).values()}
            assert used == set(checkpoint_names(cfg)), (tp, pp)


# ---- sliding window ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mistral", "qwen3-swa"])
def test_sliding_window_greedy_equals_transformers(name):
    folder = family_checkpoint(name)
    cfg = load_model_config(str(folder))
    assert cfg.sliding_window == 8
    model = load_model(str(folder))
    assert not model.supports_fast_decode()   # the Triton decode kernel has no window: torch attention
    with pytest.raises(NotImplementedError, match="sliding-window"):
        model.model.layers["0"].self_attn.forward_fast(None, None, None, None, 0, None)
    assert executor_tokens(model) == hf_greedy(PROMPTS, NEW, folder, None)
    # All prompts prefilled in one step, then batched decodes (the other attention paths).
    assert executor_tokens(model, max_num_tokens=256) == hf_greedy(PROMPTS, NEW, folder, None)


def test_sliding_window_on_the_cuda_grouping(monkeypatch):
    """The attention plan CUDA uses (fresh prefills padded together, decodes of a mixed step in one
    padded call), run on CPU: the window holds there too."""
    import disagg_mpi.model.attention as attn

    monkeypatch.setitem(attn.PREFILL_SPREAD, "cpu", 2)
    monkeypatch.setitem(attn.BATCH_DECODES, "cpu", True)
    folder = family_checkpoint("mistral")
    assert executor_tokens(load_model(str(folder)), max_num_tokens=24) == hf_greedy(PROMPTS, NEW, folder, None)


def test_sliding_window_has_teeth():
    """The same Mistral weights with full attention give other tokens (the window binds)."""
    folder = family_checkpoint("mistral")
    model = load_model(str(folder))
    for layer in model.model.layers.values():
        layer.self_attn.window = None
    assert executor_tokens(model) != hf_greedy(PROMPTS, NEW, folder, None)


def test_mixed_sliding_layers_refused(tmp_path):
    folder = _copy(tmp_path, "qwen3-swa")
    d = json.loads((folder / "config.json").read_text())
    d.pop("layer_types", None)
    d["max_window_layers"] = 2     # layers 0-1 full, 2-3 sliding
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"mixes sliding-window layers \[2, 3\] \(sliding_window=8\)"):
        load_model_config(str(folder))


# ---- mixture of experts --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "qwen3-moe-unnorm", "qwen2-moe"])
def test_moe_greedy_equals_transformers(name):
    folder = family_checkpoint(name)
    cfg = load_model_config(str(folder))
    assert cfg.num_experts in (4, 8) and cfg.num_experts_per_tok == 2
    assert cfg.dense_layers == {"qwen3-moe": [1], "qwen2-moe": [2]}.get(name, [])
    assert bool(cfg.shared_expert_intermediate_size) == (name == "qwen2-moe")
    model = load_model(str(folder))
    assert not model.supports_fast_decode()
    assert executor_tokens(model) == hf_greedy(PROMPTS, NEW, folder, None)


def test_moe_norm_topk_has_teeth():
    """The same Qwen3-MoE weights without the top-k renormalization give other tokens."""
    folder = family_checkpoint("qwen3-moe")
    model = load_model(str(folder))
    for layer in model.model.layers.values():
        if hasattr(layer.mlp, "normalize"):
            layer.mlp.normalize = False
    assert executor_tokens(model) != hf_greedy(PROMPTS, NEW, folder, None)


def test_moe_shared_expert_has_teeth():
    """Qwen2-MoE without its shared expert gives other tokens."""
    folder = family_checkpoint("qwen2-moe")
    model = load_model(str(folder))
    assert model.config.attention_bias    # qkv_bias
    for layer in model.model.layers.values():
        if hasattr(layer.mlp, "shared_expert"):
            del layer.mlp.shared_expert
    assert executor_tokens(model) != hf_greedy(PROMPTS, NEW, folder, None)


@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "qwen2-moe"])
def test_moe_tensor_parallel_shards_every_expert(name):
    """TP=2 x PP=2 over the MoE checkpoint (ranks in threads) decodes as transformers does."""
    from tests.paged_generate import greedy_generate
    from tests.unit.test_model_sharding import ThreadAllReduce, grid_forward_fn

    folder = family_checkpoint(name)
    red = [ThreadAllReduce(2), ThreadAllReduce(2)]
    grid = [[load_model(str(folder), shard=ShardSpec(r, 2, l0, l1, red[s].for_rank(r))) for r in range(2)]
            for s, (l0, l1) in enumerate(((0, 2), (2, 4)))]
    cfg = load_model_config(str(folder))
    experts = grid[0][0].model.layers["0"].mlp.experts   # stacked [E, 2F/2, H]: each holds half of F
    assert experts.gate_up_proj.shape == (cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size)
    prompts = PROMPTS[:2]     # 9 and 3 tokens, as the pool of grid_forward_fn is sized
    assert greedy_generate(grid_forward_fn(grid), prompts, 8, 4) == hf_greedy(prompts, 8, folder, None)


# ---- refusals ------------------------------------------------------------------------------------

def _copy(tmp_path, name="qwen3"):
    dst = tmp_path / "ckpt"
    shutil.copytree(family_checkpoint(name), dst)
    return dst


def _cli_refuses(spec, tmp_path, *needles):
    """`disagg-mpi model info` and `disagg-mpi validate` refuse the model with the same reason."""
    import yaml

    from disagg_mpi.cli import cli

    info = CliRunner().invoke(cli, ["model", "info", str(spec)])
    assert info.exit_code != 0 and all(n in info.output for n in needles), info.output
    topo = tmp_path / "topo.yaml"
    topo.write_text(yaml.safe_dump({"model": {"path": str(spec)},
                                    "generation_executors": [{"participant_ids": [1]}]}))
    from disagg_mpi.cli.slurm import validate
    res = CliRunner().invoke(validate, ["--config", str(topo)])
    assert res.exit_code == 2 and all(n in res.output for n in needles), res.output


def test_unknown_architecture_refused(tmp_path):
    folder = _copy(tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (folder / "config.json").write_text(json.dumps(d))
    for fn in (load_model_config, load_model):
        with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*supported: LlamaForCausalLM"):
            fn(str(folder))
    _cli_refuses(folder, tmp_path, "GPTNeoXForCausalLM", "Qwen3ForCausalLM")


def test_mismatched_model_type_refused(tmp_path):
    folder = _copy(tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d["model_type"] = "llama"     # a Qwen3 checkpoint labelled llama would drop its q/k norms
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="model_type='llama'; expected model_type='qwen3'"):
        load_model_config(str(folder))


def test_extra_tensor_refused(tmp_path):
    """A tensor nothing consumes (here an old-style rope table) is named, at load and by the CLI."""
    folder = _copy(tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.2.self_attn.rotary_emb.inv_freq"] = torch.ones(16)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for fn in (load_model_config, load_model):
        with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.layers.2.self_attn.rotary_emb"):
            fn(str(folder))
    # A rank of a later pipeline stage (layers 3..4 only) refuses it too.
    with pytest.raises(ValueError, match="rotary_emb.inv_freq"):
        load_model(str(folder), shard=ShardSpec(layer_start=3, layer_end=4))
    _cli_refuses(folder, tmp_path, "model.layers.2.self_attn.rotary_emb.inv_freq")


def test_qwen3_read_as_llama_refused(tmp_path):
    """What used to load silently wrong: Qwen3 weights under a Llama config (q/k norms unread)."""
    folder = _copy(tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.k_norm.weight"):
        load_model(str(folder))


def test_missing_tensor_refused(tmp_path):
    folder = _copy(tmp_path)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.layers.3.self_attn.q_norm.weight"]
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"\['model.layers.3.self_attn.q_norm.weight'\] missing"):
        load_model_config(str(folder))


@pytest.mark.parametrize("field,value,needle", [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=True"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling type 'yarn'"),
])
def test_unsupported_options_refused(tmp_path, field, value, needle):
    folder = _copy(tmp_path)
    d = json.loads((folder / "config.json").read_text())
    d[field] = value
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_model_config(str(folder))


def test_gguf_unknown_architecture_and_extra_tensor_refused(tmp_path):
    import numpy as np

    from tests.gguf_file import write_gguf

    folder = family_checkpoint("qwen3")
    bad_arch = write_gguf(folder, tmp_path / "a.gguf", arch="gemma3")
    with pytest.raises(ValueError, match="general.architecture='gemma3' is not supported"):
        load_model(str(bad_arch))
    extra = write_gguf(folder, tmp_path / "b.gguf", extra={"blk.1.attn_sinks.weight": np.ones(4)})
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['blk.1.attn_sinks.weight'\]"):
        load_model_config(str(extra))
    _cli_refuses(extra, tmp_path, "blk.1.attn_sinks.weight")


# ---- random presets ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,total,active", [("qwen3-8b", 8.19e9, 8.19e9),
                                               ("qwen3-30b-a3b", 30.5e9, 3.3e9)])
def test_qwen3_presets_have_the_real_shapes(name, total, active):
    """random:<preset> of Qwen3 shapes: every slice the plan asks for has the model's shape (meta
    tensors, nothing allocated), and the parameter counts are the published ones."""
    from disagg_mpi.model import LlamaModel
    from disagg_mpi.model.config import preset
    from disagg_mpi.model.random_init import full_shape
    from disagg_mpi.model.weights import destination

    cfg = preset(name)
    with torch.device("meta"):
        m = LlamaModel(cfg, ShardSpec(1, 2, 0, 2, all_reduce=lambda x: x))   # TP rank 1 of 2, 2 layers
    params = dict(m.named_parameters())
    for pname, ws in weight_plan(m).items():
        shape = list(full_shape(cfg, ws.source))
        if ws.dim is not None:
            shape[ws.dim] = ws.end - ws.start
        assert tuple(shape) == tuple(destination(params, pname, ws).shape), pname
    n = sum(math.prod(full_shape(cfg, name)) for name in checkpoint_names(cfg))
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    n_active = n - cfg.num_layers * (cfg.num_experts - cfg.num_experts_per_tok) * expert
    assert n == pytest.approx(total, rel=0.01) and n_active == pytest.approx(active, rel=0.03)

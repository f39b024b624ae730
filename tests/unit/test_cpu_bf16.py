"""The opt-in bf16 mode on CPU (`model.dtype: bfloat16`): weights, KV cache and compute in bf16, the
projections on oneDNN's prepacked bf16 kernels (model/cpu_gemm.py, AVX512_BF16 where the CPU has it).
Its reference is transformers run in bf16 on the same weights (fp32 stays the default and the
project-wide reference): greedy tokens must be equal.
"""
import pytest
import torch

from disagg_mpi.api import ExecutorConfig, KvCacheConfig, Request
from disagg_mpi.engine.executor import Executor
from disagg_mpi.model import load_model
from disagg_mpi.model.tokenizer import load_tokenizer
from tests.oracle import oracle_prompt_ids

transformers = pytest.importorskip("transformers")

NEW = 16


def _hf_twin(model) -> torch.nn.Module:
    """transformers' LlamaForCausalLM holding copies of `model`'s bf16 weights (copies: the executor
    packs and frees the dense ones)."""
    cfg = model.config
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf_dict())
    hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16)
    sd = {k: v.clone() for k, v in model.state_dict().items()
          if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.generation_config.eos_token_id = None   # ignore EOS, as ignore_eos does
    return hf.eval()


def test_smollm2_bf16_greedy_equals_transformers_bf16():
    model = load_model("smollm2", dtype=torch.bfloat16)
    hf = _hf_twin(model)
    prompts = oracle_prompt_ids(load_tokenizer("smollm2"))[::2]
    expected = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    del hf
    ex = Executor(model, ExecutorConfig(max_batch_size=4, max_num_tokens=256, dtype="bfloat16",
                                        kv_cache_config=KvCacheConfig(16, 64)))
    outs = ex.generate([Request(p, max_tokens=NEW, ignore_eos=True) for p in prompts])
    assert ex._runner.kv_pool.dtype == torch.bfloat16 and getattr(model, "_cpu_packed", False)
    assert [o.result.output_token_ids for o in outs] == expected

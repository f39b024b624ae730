"""SmolLM2-135M GGUF: our loader + forward vs transformers loading the same file (fp32)."""
import pytest
import torch

from disagg_mpi.model import ShardSpec, load_model, load_model_config
from disagg_mpi.model.registry import default_model_path
from tests.paged_generate import blocks_needed, greedy_generate, model_forward_fn

pytestmark = pytest.mark.oracle
NEW, BS = 24, 16


@torch.no_grad()
def hf_greedy(hf, prompt, n):
    """Plain greedy loop (HF's generate would stop at, or with min_new_tokens suppress, EOS)."""
    out = hf(torch.tensor([prompt]), use_cache=True)
    toks = []
    for _ in range(n):
        toks.append(int(out.logits[0, -1].argmax()))
        out = hf(torch.tensor([[toks[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return toks


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path("smollm2")


@pytest.fixture(scope="module")
def tok(gguf_path):
    from disagg_mpi.model import load_tokenizer
    return load_tokenizer(str(gguf_path))


@pytest.fixture(scope="module")
def prompts(tok):
    msgs = [[{"role": "user", "content": "What is the capital of France?"}],
            [{"role": "user", "content": "Write a haiku about the sea."}]]
    return [tok.encode(tok.apply_chat_template(m)) for m in msgs]


@pytest.fixture(scope="module")
def ours(gguf_path, prompts):
    m = load_model(str(gguf_path))
    pool = m.allocate_kv_pool(blocks_needed(prompts, NEW, BS), BS)
    return greedy_generate(model_forward_fn(m, pool), prompts, NEW, BS)


def test_config(gguf_path):
    cfg = load_model_config(str(gguf_path))
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.vocab_size == 49152
    assert load_model_config("smollm2") == cfg


def test_greedy_matches_transformers(gguf_path, prompts, ours, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32).eval()
    for p, got in zip(prompts, ours):
        ref = hf_greedy(hf, p, NEW)
        assert got == ref, (tok.decode(got), tok.decode(ref))
    assert "Paris" in tok.decode(ours[0])


def test_tp3_pp2_matches(gguf_path, prompts, ours):
    """TP=3 (one KV head each) x PP=2 over the real weights, ranks run one after another per layer."""
    import threading

    from tests.unit.test_model_sharding import ThreadAllReduce
    grid = []
    for start, end in ((0, 15), (15, 30)):
        red = ThreadAllReduce(3)
        grid.append([load_model(str(gguf_path), shard=ShardSpec(r, 3, start, end, red.for_rank(r)))
                     for r in range(3)])
    nb = blocks_needed(prompts, 4, BS)
    pools = [[m.allocate_kv_pool(nb, BS) for m in st] for st in grid]

    def fn(ids, pos):
        h = None
        for s, st in enumerate(grid):
            outs = [None] * 3

            def work(r, s=s, h=h, outs=outs, st=st):
                outs[r] = st[r](ids if s == 0 else None, pos, pools[s][r], hidden_states=h)
            ts = [threading.Thread(target=work, args=(r,)) for r in range(3)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            h = outs[0]
        return grid[-1][0].compute_logits(h)
    got = greedy_generate(fn, prompts, 4, BS)
    assert got == [o[:4] for o in ours]

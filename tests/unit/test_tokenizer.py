"""Tokenizer built from the GGUF vs transformers' GGUF tokenizer; byte fallback for presets."""
import pytest

from disagg_mpi.model import load_tokenizer
from disagg_mpi.model.registry import default_model_path

TEXTS = ["Hello world!", "The capital of France is Paris.", "  leading spaces\nand\ttabs",
         "numbers 12345 and 3.14", "unicode: café, naïve, 日本語, emoji 🙂",
         "<|im_start|>user\nhi<|im_end|>"]
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]


@pytest.fixture(scope="module")
def path():
    return default_model_path("smollm2")


@pytest.fixture(scope="module")
def ours(path):
    return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def hf(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_basic_ids(ours):
    assert ours.bos_token_id == 1 and ours.eos_token_ids == [2] and ours.vocab_size == 49152
    assert ours.encode("<|im_start|>") == [1]
    assert ours.encode("hi", add_special_tokens=False) == ours.encode("hi")  # SmolLM2: no BOS by default


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_matches_hf(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_hf(ours, hf, gen):
    got = ours.apply_chat_template(CHAT, add_generation_prompt=gen)
    assert got == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
    assert got.startswith("<|im_start|>system\n")
    sys_chat = [{"role": "system", "content": "Be brief."}] + CHAT
    assert ours.apply_chat_template(sys_chat) == hf.apply_chat_template(
        sys_chat, tokenize=False, add_generation_prompt=True)


def test_byte_fallback_for_random_presets():
    tok = load_tokenizer("random:tiny")
    text = "héllo <|im_end|> 🙂"
    ids = tok.encode(text)
    assert max(ids) < 1024 and 2 in ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "héllo  🙂"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")

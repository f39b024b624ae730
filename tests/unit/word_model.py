"""A small random Llama checkpoint (HF folder) whose every token is a word ("w0".."w<N>"), so random
output is readable text: stop strings and penalties can be tested on it, and transformers loads the
same folder as the oracle. Written by transformers itself (FACTS.md), weights scaled up so greedy
decoding has no near-ties."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 512
UNK = VOCAB - 1  # "[UNK]": the chat template's words are not in the vocabulary


def write_word_model(folder: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=10000.0, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": UNK}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w0", "eos_token": "w1"}))
    return folder


if __name__ == "__main__":
    import sys

    print(write_word_model(Path(sys.argv[1])))

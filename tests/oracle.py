"""Hugging Face transformers as the reference for greedy decoding, cached on disk.

`hf_greedy` runs transformers' `generate` (greedy, fp32, one prompt at a time so
no padding is involved) with EOS ignored: the model's EOS is cleared from its
generation config, so generation neither stops at EOS nor suppresses it (which
is what `ignore_eos=True` means in our engine; `min_new_tokens` would instead
mask EOS out and change the tokens after it).

Results are cached as JSON under `$DISAGG_MPI_CACHE or ~/.cache/disagg_mpi`,
`oracle/<sha256>.json`, keyed by the prompts, the number of new tokens and the
model file (name + size), so multi-rank tests (tests/mpi/) reuse them without
loading transformers. Writers take a file lock and rename atomically.

API (imported by tests/unit and tests/mpi, keep it stable):
    hf_greedy(prompt_ids_list, max_new_tokens, model_folder, gguf_file) -> list[list[int]]
    ORACLE_PROMPTS                      8 prompts: 4 chat (list of messages), 4 raw text
    oracle_prompt_ids(tokenizer)        -> list[list[int]]
    smollm2_oracle(max_new_tokens=24)   -> (prompt_ids, expected) for the default model
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

_LONG_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels and flipping switches; later, stored programs let the same hardware run "
    "many tasks. Assembly languages gave names to instructions, and compilers translated "
    "higher-level languages into machine code. Operating systems hid the details of devices "
    "behind files and processes, and networks connected machines into systems that span the "
    "world. Today, large language models are served by clusters of accelerators, where the "
    "prompt is processed in one phase and the answer is generated token by token in another. "
    "Separating these two phases onto different machines is called"
)

ORACLE_PROMPTS: list = [
    # Chat prompts: rendered with the model's chat template (our tokenizer), generation prompt on.
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
     {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\n"
                                      "the tide keeps its time."},
     {"role": "user", "content": "Now write one about the mountains, and explain the imagery "
                                 "you chose in two or three sentences."}],
    [{"role": "user", "content": "List three prime numbers greater than 100 and explain how you "
                                 "checked that each of them is prime, step by step."}],
    # Raw text prompts (no template, no BOS).
    "Once upon a time, in a small village by the river,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "1, 2, 3, 4, 5, 6,",
    _LONG_TEXT,
]


def oracle_prompt_ids(tokenizer) -> list[list[int]]:
    """Token ids of ORACLE_PROMPTS with `tokenizer` (our Tokenizer or anything alike)."""
    out = []
    for p in ORACLE_PROMPTS:
        text = tokenizer.apply_chat_template(p, add_generation_prompt=True) if isinstance(p, list) else p
        out.append(list(tokenizer.encode(text)))
    return out


def _cache_root() -> Path:
    env = os.environ.get("DISAGG_MPI_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "disagg_mpi") / "oracle"


def _key(prompt_ids_list, max_new_tokens: int, model_file: Path) -> str:
    size = model_file.stat().st_size
    # Big files (the real checkpoints) are told apart by name + size; small ones (random test
    # models, which share a size across seeds) by their content.
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest() if size < (64 << 20) else ""
    fields = {"prompts": [[int(t) for t in p] for p in prompt_ids_list],
              "max_new_tokens": int(max_new_tokens), "model": model_file.name,
              "model_size": size, "version": 1}
    if digest:
        fields["model_sha"] = digest
    config = model_file.parent / "config.json"
    if model_file.suffix != ".gguf" and config.is_file():
        # Same weights under another config (e.g. a sliding window) are another model.
        fields["config_sha"] = hashlib.sha256(config.read_bytes()).hexdigest()
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _read(path: Path):
    try:
        return json.loads(path.read_text())["outputs"]
    except (OSError, ValueError, KeyError):
        return None


def _compute(prompt_ids_list, max_new_tokens: int, folder: Path, gguf_file: str) -> list[list[int]]:
    import torch
    import transformers

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32, **kw).eval()
    # Ignore EOS: do not stop at it and do not suppress it (min_new_tokens would).
    model.generation_config.eos_token_id = None
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else pad
    outs = []
    with torch.no_grad():
        for ids in prompt_ids_list:
            x = torch.tensor([list(ids)], dtype=torch.long)
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=max_new_tokens, pad_token_id=pad)
            new = [int(t) for t in y[0, x.shape[1]:]]
            if len(new) != max_new_tokens:
                raise RuntimeError(f"transformers generated {len(new)} tokens, expected {max_new_tokens}")
            outs.append(new)
    return outs


def hf_greedy(prompt_ids_list, max_new_tokens, model_folder, gguf_file) -> list[list[int]]:
    """Greedy new tokens of each prompt from transformers (fp32, EOS ignored), cached on disk.

    `model_folder` is a HF folder (or the folder holding `gguf_file`); `gguf_file` is the
    GGUF file name inside it, or None/'' for a safetensors folder.
    """
    folder = Path(model_folder)
    model_file = folder / gguf_file if gguf_file else folder / "model.safetensors"
    if not model_file.is_file():
        model_file = folder / "config.json"
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{_key(prompt_ids_list, max_new_tokens, model_file)}.json"
    cached = _read(path)
    if cached is not None:
        return cached
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process computes, the others wait and read
        cached = _read(path)
        if cached is not None:
            return cached
        outs = _compute(prompt_ids_list, max_new_tokens, folder, gguf_file)
        fd, tmp = tempfile.mkstemp(prefix=".oracle-", suffix=".json", dir=root)
        with os.fdopen(fd, "w") as f:
            json.dump({"prompts": [list(map(int, p)) for p in prompt_ids_list],
                       "max_new_tokens": max_new_tokens, "model": str(model_file), "outputs": outs}, f)
        os.replace(tmp, path)  # atomic: readers never see a partial file
    return outs


def smollm2_oracle(max_new_tokens: int = 24) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt_ids, expected greedy tokens) of ORACLE_PROMPTS for the default SmolLM2 GGUF."""
    from disagg_mpi.model import load_tokenizer
    from disagg_mpi.model.registry import default_model_path

    path = default_model_path("smollm2")
    prompt_ids = oracle_prompt_ids(load_tokenizer(str(path)))
    return prompt_ids, hf_greedy(prompt_ids, max_new_tokens, path.parent, path.name)

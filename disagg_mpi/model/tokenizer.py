"""Byte-level BPE tokenizer (HF tokenizer.json, GGUF vocabulary, or a bytes-only fallback)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from disagg_mpi.model.chat_template import CHATML, render_chat

# GGUF token types (llama.cpp): 3 = control (special), 4 = user defined.
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos_token_id: int | None, eos_token_ids: list[int],
                 chat_template: str | None = None, vocab_size: int | None = None):
        self.tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.chat_template = chat_template or CHATML
        self.vocab_size = vocab_size if vocab_size is not None else tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def _token(self, i: int | None) -> str:
        return "" if i is None else (self.tok.id_to_token(i) or "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self._token(self.bos_token_id),
                           eos_token=self._token(self.eos_token_id))

    # ---- constructors -------------------------------------------------------------
    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = _read_json(folder / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):   # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja = folder / "chat_template.jinja"   # transformers 5 saves it separately
        if template is None and jinja.is_file():
            template = jinja.read_text()

        def tid(v):
            v = v.get("content") if isinstance(v, dict) else v
            return tok.token_to_id(v) if v else None

        bos, eos = tid(cfg.get("bos_token")), tid(cfg.get("eos_token"))
        eos_ids = [eos] if eos is not None else []
        mcfg = _read_json(folder / "config.json")
        extra = mcfg.get("eos_token_id")
        for e in (extra if isinstance(extra, list) else [extra] if extra is not None else []):
            if e not in eos_ids:
                eos_ids.append(e)
        if bos is None:
            bos = mcfg.get("bos_token_id")
        return cls(tok, bos, eos_ids, template)

    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        def get(key, default=None):
            f = reader.fields.get(key)
            return f.contents() if f is not None else default

        kind = get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 byte-level BPE)")
        tokens = get("tokenizer.ggml.tokens")
        types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if get("tokenizer.ggml.pre") == "smollm":
            # SmolLM's own tokenizer.json splits digits one by one before byte-level BPE.
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        specials = [AddedToken(t, special=True, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        tok.add_special_tokens(specials)
        if user:
            tok.add_tokens(user)
        eos = get("tokenizer.ggml.eos_token_id")
        return cls(tok, get("tokenizer.ggml.bos_token_id"), [int(eos)] if eos is not None else [],
                   get("tokenizer.chat_template"), vocab_size=len(tokens))

    @classmethod
    def bytes_only(cls, vocab_size: int) -> Tokenizer:
        """Fallback for random presets: ids 0-2 special, then the 256 byte tokens, no merges."""
        if vocab_size < 259:
            raise ValueError(f"vocab_size {vocab_size} too small for a byte tokenizer (>= 259)")
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
        vocab = {t: i for i, t in enumerate(specials + alphabet)}
        tok = HFTokenizer(models.BPE(vocab, [], fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return cls(tok, 1, [2], CHATML, vocab_size=vocab_size)


def _byte_of(ch: str) -> int:
    # Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, others to 256+.
    cs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in cs]
    table = {chr(b): b for b in cs}
    table.update({chr(256 + n): b for n, b in enumerate(extra)})
    return table[ch]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_tokenizer(spec: str | os.PathLike = "smollm2") -> Tokenizer:
    from disagg_mpi.model.loader import _resolve
    kind, arg = _resolve(spec)
    if kind == "random":
        if arg == "smollm2":   # same vocabulary as the real model
            return load_tokenizer("smollm2")
        from disagg_mpi.model.config import preset
        return Tokenizer.bytes_only(preset(arg).vocab_size)
    if kind == "hf":
        if not (Path(arg) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{arg}: no tokenizer.json")
        return Tokenizer.from_folder(arg)
    from disagg_mpi.model.gguf_loader import open_gguf
    return Tokenizer.from_gguf(open_gguf(str(arg)))

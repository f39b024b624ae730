"""Write one of our models as a Hugging Face folder (config.json + model.safetensors)."""

from __future__ import annotations

import json

from safetensors.torch import save_file


def save_hf_folder(model, folder):
    cfg = model.config
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})

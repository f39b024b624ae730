"""Rank 0 and the launcher run no model: their code paths must not import torch (about 220 MiB
each would hold for nothing; issue 24's memory targets). A fresh interpreter imports what they
import, reads the model's config and tokenizer as they do, and must not have loaded torch."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import disagg_mpi.cli.bench, disagg_mpi.cli.run, disagg_mpi.cli.serve, disagg_mpi.serve.app, disagg_mpi.spmd
from disagg_mpi.config import check_model, load_topology
from disagg_mpi.model.tokenizer import load_tokenizer
topo = load_topology(sys.argv[1])
check_model(topo)
load_tokenizer(topo.model.path).encode("hello")
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def _smollm2_cached() -> bool:
    from disagg_mpi.model.registry import DEFAULTS, cache_dir

    return (cache_dir() / Path(DEFAULTS["smollm2"]["member"]).name).is_file()


def test_launcher_and_rank0_paths_import_no_torch(tmp_path):
    config = ROOT / "configs" / "smollm2-1ctx-1gen.yaml"
    if not _smollm2_cached():   # the GGUF reader's path is the one that matters; else a random model
        config = tmp_path / "t.yaml"
        config.write_text("model: {path: 'random:tiny'}\ngeneration_executors:\n  - participant_ids: [1]\n")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(config)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]

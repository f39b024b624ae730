"""knobs.py: each knob is declared once, and everything else derives from that declaration."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from disagg_mpi import knobs
from disagg_mpi.api import CacheTransceiverConfig
from disagg_mpi.config import ConfigError, TransceiverSpec, parse_topology

ROOT = Path(__file__).resolve().parents[2]


def test_every_disagg_variable_the_package_reads_is_declared():
    used = set()
    for f in (ROOT / "disagg_mpi").rglob("*.py"):
        used |= set(re.findall(r"\bDISAGG_[A-Z_]+\b", f.read_text()))
    used -= {"DISAGG_NOT_ENABLED"}  # the error text constant, not a variable
    assert used <= knobs.all_env_names(CacheTransceiverConfig), used - knobs.all_env_names(CacheTransceiverConfig)


def test_the_yaml_schema_is_the_dataclass():
    assert list(TransceiverSpec.model_fields) == [f.name for f in dataclasses.fields(CacheTransceiverConfig)]
    spec = TransceiverSpec()
    api = spec.to_api()
    assert api.enable_cache_transceiver and api.buffer_bytes == CacheTransceiverConfig().buffer_bytes
    with pytest.raises(ValueError, match="buffer_bytes"):
        TransceiverSpec(buffer_bytes=100)  # ge=4096, declared on the field
    with pytest.raises(ValueError, match="'auto', 'ipc', 'staged' or 'cuda_aware_mpi'"):
        TransceiverSpec(backend="nvlink")


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("DISAGG_BUFFER_BYTES", "8192")
    monkeypatch.setenv("DISAGG_ZERO_COPY", "off")
    cfg = CacheTransceiverConfig(enable_cache_transceiver=True).with_env_overrides()
    assert cfg.buffer_bytes == 8192 and cfg.zero_copy is False and cfg.enable_cache_transceiver
    monkeypatch.setenv("DISAGG_ZERO_COPY", "maybe")
    with pytest.raises(ValueError, match="DISAGG_ZERO_COPY='maybe' is not a bool: use one of 1/true"):
        CacheTransceiverConfig().with_env_overrides()
    monkeypatch.setenv("DISAGG_ZERO_COPY", "1")
    monkeypatch.setenv("DISAGG_KV_BACKEND", "nvlink")
    with pytest.raises(ValueError, match="allowed: auto, ipc, staged, cuda_aware_mpi"):
        CacheTransceiverConfig().with_env_overrides()


def test_process_knobs(monkeypatch):
    assert knobs.env_value("DISAGG_GRAPH_CAPTURE", {}) == "startup"
    assert knobs.env_value("DISAGG_CUDA_GRAPHS", {"DISAGG_CUDA_GRAPHS": "0"}) is False
    with pytest.raises(ValueError, match="DISAGG_GRAPH_CAPTURE='eager' is not allowed; allowed: startup, lazy"):
        knobs.env_value("DISAGG_GRAPH_CAPTURE", {"DISAGG_GRAPH_CAPTURE": "eager"})
    with pytest.raises(ValueError, match="DISAGG_RING_SLOTS='9999' is out of range; allowed: <= 512"):
        knobs.env_value("DISAGG_RING_SLOTS", {"DISAGG_RING_SLOTS": "9999"})


def test_the_docs_hold_the_generated_tables():
    page = (ROOT / "docs" / "transfer.md").read_text()
    section = knobs.docs_section(CacheTransceiverConfig)
    assert section in page, "run: python scripts/render_knobs.py docs/transfer.md"
    for k in (*knobs.field_knobs(CacheTransceiverConfig), *knobs.PROCESS):
        assert (k.env or k.name) in section


def test_a_bad_knob_in_the_yaml_names_it():
    data = {"model": {"path": "random:tiny"}, "context_executors": [
        {"participant_ids": [1], "cache_transceiver_config": {"lease_seconds": 0}}],
        "generation_executors": [{"participant_ids": [2], "cache_transceiver_config": {}}]}
    with pytest.raises(ConfigError, match="lease_seconds"):
        parse_topology(data)

"""A shorter soak (the full one is scripts/soak.py): nothing lost, nothing doubled, pools full."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from disagg_mpi import launch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from soak import run_soak, soak_topology

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.world(4)]


def test_soak_with_random_cancellations():
    with launch(soak_topology()) as orch:
        if orch is None:
            return
        report = run_soak(orch, 600, cancel_share=0.1, seed=1)
        assert report["finals"] == 600 and report["duplicate_finals"] == 0
        assert report["outcomes"].get("cancelled", 0) > 0  # cancellations really happened
        assert report["outcomes"].get("length", 0) > 400
        assert "error" not in report["outcomes"], report

"""A shorter soak (the full one is scripts/soak.py): nothing lost, nothing doubled, pools full."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from disagg_mpi import launch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from soak import run_soak, soak_topology

pytestmark = [pytest.mark.mpi(min_size=2), pytest.mark.world(4)]


def test_soak_with_random_cancellations_and_hostile_requests():
    """run_soak raises on a lost, doubled or wrongly answered request (a good one failed, a hostile
    one served); the pools must be full after it, orphaned contexts included (their lease: 5 s)."""
    with launch(soak_topology()) as orch:
        if orch is None:
            return
        report = run_soak(orch, 600, cancel_share=0.1, seed=1, hostile_share=0.15)
        assert report["duplicate_finals"] == 0 and not report["wrong"], report
        out = report["outcomes"]
        assert out.get("cancelled", 0) > 0  # cancellations really happened
        assert out.get("length", 0) > 350
        assert out.get("refused_at_submit", 0) > 5 and out.get("refused", 0) > 5  # both kinds of refusal happened
        assert out.get("context", 0) > 10
        assert "error" not in out, report
        assert all(free == total for free, total in (p.split("/") for p in report["pools"].values())), report

"""scripts/bench_cpu_peers.py: the medians, the issue's ratios and the tables from per-repetition rows."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_cpu_peers", REPO / "scripts" / "bench_cpu_peers.py")
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)


def _row(label, point, rep, tok_s, ttft, tpot):
    return {"rep": rep, "label": label, "point": point, "errors": 0, "output_tok_s": tok_s, "req_s": 1.0,
            "ttft_p50_ms": ttft, "ttft_p90_ms": ttft, "tpot_p50_ms": tpot, "itl_p50_ms": tpot,
            "decode_tok_s": 1000.0 / tpot}


def test_medians_over_repetitions_and_the_issue_ratios():
    raw = [_row("agg", "c8", r, v, 100.0, 50.0) for r, v in enumerate((10.0, 30.0, 20.0))]
    raw += [_row("vllm-cpu", "c8", r, 10.0, 100.0, 50.0) for r in range(3)]
    raw += [_row("agg", "c1", 0, 5.0, 200.0, 40.0), _row("vllm-cpu", "c1", 0, 5.0, 400.0, 40.0),
            _row("agg-q4", "c1", 0, 5.0, 100.0, 20.0), _row("llama.cpp", "c1", 0, 5.0, 100.0, 10.0)]
    med = peers.medians(raw)
    agg_c8 = next(m for m in med if m["label"] == "agg" and m["point"] == "c8")
    assert agg_c8["output_tok_s"] == 20.0 and agg_c8["repetitions"] == 3
    got = peers.ratios(med)
    assert got["agg_over_vllm_output_tok_s_c8 (target >= 1.2)"] == 2.0
    assert got["agg_over_vllm_output_tok_s_c32 (target >= 1.2)"] is None   # not measured
    assert got["agg_over_vllm_ttft_p50_c1 (target <= 1)"] == 0.5
    assert got["aggq4_over_llamacpp_decode_tok_s_c1 (target >= 1)"] == 0.5
    table = peers.markdown({"medians": med, "peak_rss": [
        {"label": "agg", "processes": [{"role": "rank 1", "peak_mib": 900.0}, {"role": "mpiexec", "peak_mib": 3}]},
        {"label": "agg", "processes": [{"role": "rank 1", "peak_mib": 1000.0}]}]})
    assert "| c8: output tok/s | 20.0 | 10.0 | - | - |" in table
    assert "| agg | rank 1 1,000 |" in table


def test_server_commands_refuse_an_unknown_target_and_carry_the_threads():
    a = argparse.Namespace(threads=1, hf_dir=Path("x"), vllm_venv="v", llamacpp_venv="l")
    with pytest.raises(ValueError, match="'vllm'.*agg, disagg, vllm-cpu, llama.cpp, agg-q4"):
        peers.server_command("vllm", 0, a)
    cmd, _ = peers.server_command("llama.cpp", 8000, a)
    assert cmd[cmd.index("--n_threads") + 1] == "1" and "--interrupt_requests" in cmd
    _, env = peers.server_command("vllm-cpu", 8000, a)
    assert env["OMP_NUM_THREADS"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"

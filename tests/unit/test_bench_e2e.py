"""`disagg-mpi bench` end to end: it starts `disagg-mpi serve` on a tiny disaggregated topology (random
weights, 1 context + 1 generation executor, 3 MPI ranks), streams 16 requests through it in each mode
(full, then generation-only: no context phase), stops it, and writes the table, JSON, CSV and plots."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("disagg_mpi.cli.serve") is None,
                                reason="disagg_mpi.cli.serve (the `disagg-mpi serve` command) does not exist yet; "
                                       "the benchmark needs a server to start")

TINY = """\
model: {path: "random:tiny", dtype: float32}
context_executors:
  - participant_ids: [1]
    max_batch_size: 8
    kv_cache: {block_size: 4, num_blocks: 256}
    cache_transceiver_config: {enable_cache_transceiver: true}
generation_executors:
  - participant_ids: [2]
    max_batch_size: 16
    kv_cache: {block_size: 4, num_blocks: 256}
    cache_transceiver_config: {enable_cache_transceiver: true}
"""


@pytest.mark.timeout(900)
def test_bench_end_to_end(tmp_path):
    cfg = tmp_path / "tiny-1ctx-1gen.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "disagg_mpi.cli", "bench", "--config", str(cfg), "--label", "tiny-disagg",
           "--num-requests", "16", "--input-len", "24", "--output-len", "6", "--request-rate", "inf",
           "--concurrency", "4", "--mode", "full,generation-only", "--warmup", "2", "--slo-ttft-ms", "60000", "--out", str(out),
           "--startup-timeout", "600", "--stop-grace", "30"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=840, check=False)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in out.glob("serve-*.log")) if out.exists() else ""
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}\nserver log:\n{logs}"

    data = json.loads((out / "results.json").read_text())
    res, gen_only = data["results"]
    assert res["label"] == "tiny-disagg" and res["bench_mode"] == "full"
    assert res["num_samples"] == 16 and res["num_errors"] == 0
    assert res["total_output_tokens"] == 16 * 6          # ignore_eos: exact output lengths
    assert res["total_input_tokens"] == 16 * 24
    assert res["seq_throughput"] > 0 and res["token_throughput"] > 0
    assert res["goodput"] is not None and res["goodput"] <= res["seq_throughput"] + 1e-9
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = res[key]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"], (key, s)
    assert res["ttft_ms"]["p50"] <= res["e2e_ms"]["p50"]
    # Where the server's time went (its hops): the hand-off's segments, for every request
    segs = res["hops"]["segments_ms"]
    assert res["hops"]["num_requests"] == 16
    # (the direct hand-off, the default: the context's notice goes straight to the generation side)
    for seg in ("ctx_ready_sent->gen_admitted", "claim_sent->claim_granted", "claim_granted->kv_landed"):
        assert segs[seg]["n"] == 16 and segs[seg]["p50"] >= 0, (seg, segs[seg])
    assert res["hops"]["handoff_ms"]["n"] == 16 and res["hops"]["handoff_ms"]["p50"] > 0
    assert {"message", "queue", "compute", "copy", "rank0"} <= set(res["hops"]["kinds_ms"])
    assert data["servers"][0]["exit_code"] is not None

    # Generation-only: the same server (started with --allow-benchmark-requests), no context phase.
    assert gen_only["bench_mode"] == "generation-only" and data["workload"]["modes"] == ["full", "generation-only"]
    assert gen_only["num_samples"] == 16 and gen_only["num_errors"] == 0
    assert gen_only["total_output_tokens"] == 16 * 6 and gen_only["tpot_ms"]["p50"] > 0
    assert gen_only["kv_transfer_ms"] is None     # nothing moved: no context executor took part

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["bench_mode"] for r in rows] == ["full", "generation-only"]
    assert all(r["num_samples"] == "16" and r["num_errors"] == "0" for r in rows)
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == 32
    for row in lines:   # where each request ran, by the server's own metrics
        sm = row["server_metrics"]
        assert sm.get("context_executor") == (0 if row["bench_mode"] == "full" else None), row
        assert sm["generation_executor"] == 1
    png = out / "latency_cdf.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiny-disagg" in proc.stdout and "ttft (ms) p99" in proc.stdout and "generation-only" in proc.stdout
    full_row = next(r for r in lines if r["bench_mode"] == "full")
    assert "kv_landed" in full_row["server_metrics"]["hops"] and full_row["hops_ms"]
    assert "hop claim_granted->kv_landed p50 (ms)" in (out / "table.md").read_text()

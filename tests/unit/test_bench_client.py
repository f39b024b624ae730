"""disagg-mpi bench: the client and the CLI against a fake OpenAI-style server (an aiohttp app in a thread)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from disagg_mpi.bench.client import run_load
from disagg_mpi.bench.metrics import aggregate
from disagg_mpi.bench.report import format_table, write_outputs
from disagg_mpi.bench.workload import synthetic_requests

# ---- the client against a fake OpenAI-style server ------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_server():
    """Streams max_tokens chunks 5 ms apart; prompt [13, ...] answers HTTP 400; reports kv metrics."""
    web = pytest.importorskip("aiohttp.web")
    port = _free_port()
    seen = []
    loop = asyncio.new_event_loop()

    async def completions(request):
        body = await request.json()
        seen.append(body)
        if request.path.startswith("/textonly/") and not isinstance(body["prompt"], str):
            return web.json_response({"error": {"message": "prompt must be a string"}}, status=500)  # llama.cpp
        if body["prompt"][:1] == [13]:
            return web.json_response({"error": {"message": "bad prompt"}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["max_tokens"]
        if request.path.startswith("/merged/"):   # llama-cpp-python: no usage; a token whose text ends in
            for i in range(0, n, 2):              # part of a UTF-8 character comes out with the next one
                await asyncio.sleep(0.005)
                chunk = {"choices": [{"index": 0, "text": f" t{i} t{i + 1}"[: 8 if i + 1 < n else 4],
                                      "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            end = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
            await resp.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
            return resp
        for i in range(n):
            await asyncio.sleep(0.005)
            chunk = {"id": "c", "object": "text_completion",
                     "choices": [{"index": 0, "text": f" t{i}", "finish_reason": "length" if i == n - 1 else None}]}
            if i == n - 1:
                chunk["usage"] = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
                chunk["metrics"] = {"kv_transfer_ms": 2.0, "kv_transfer_bytes": 2_000_000}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def health(request):
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/textonly/v1/completions", completions)
    app.router.add_post("/merged/v1/completions", completions)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)

    def serve():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        loop.run_forever()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    from disagg_mpi.bench.server import health_ok

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 10
    while not health_ok(url) and time.time() < deadline:
        time.sleep(0.05)
    yield url, seen
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    th.join(10)


def test_client_against_fake_server(fake_server, tmp_path):
    url, seen = fake_server
    reqs = synthetic_requests(6, 8, 5, vocab_size=1024, seed=0)
    reqs[2].prompt_ids[0] = 13
    records, duration = asyncio.run(run_load(url, reqs, request_rate=50.0, concurrency=2, seed=0))
    assert len(records) == 6 and duration > 0
    assert [r.idx for r in records] == list(range(6))
    assert not records[2].ok and "HTTP 400" in records[2].error
    good = [r for i, r in enumerate(records) if i != 2]
    assert all(r.ok and r.output_tokens == 5 and len(r.chunk_times) == 5 for r in good)
    assert all(r.ttft_ms >= 4 and r.tpot_ms >= 4 for r in good)
    assert all(b["ignore_eos"] is True and b["stream"] is True and b["max_tokens"] == 5 for b in seen)
    s = aggregate(records, duration, slo_ttft_ms=10_000, slo_tpot_ms=10_000)
    assert s["num_samples"] == 5 and s["num_errors"] == 1
    assert s["kv_transfer_ms"]["mean"] == pytest.approx(2.0)
    assert s["kv_transfer_gbps"]["mean"] == pytest.approx(1.0)
    assert s["goodput"] == pytest.approx(s["seq_throughput"])
    res = [{"run": "x", "label": "fake", "config": None, "url": url, "request_rate": 50.0, "concurrency": 2, **s},
           {"run": "y", "label": "fake", "config": None, "url": url, "request_rate": 100.0, "concurrency": 2, **s}]
    rows = [{"run": run, **r.to_dict()} for run in ("x", "y") for r in records]
    paths = write_outputs(tmp_path, res, {"workload": {}}, rows)
    names = {p.name for p in paths}
    assert {"results.json", "results.csv", "requests.jsonl", "table.md", "latency_cdf.png",
            "throughput_vs_load.png"} <= names
    assert "ttft (ms) p99" in format_table(res)
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["num_samples"] == 5


def test_a_stream_without_usage_that_ends_at_length_has_all_its_tokens(fake_server):
    """llama-cpp-python's server sends no usage and puts two tokens in one chunk where the first ends
    in part of a UTF-8 character: a stream that stopped at max_tokens holds max_tokens tokens, however
    many chunks carried them (counting chunks gave 48 of 64 in a real run)."""
    url, _ = fake_server
    reqs = synthetic_requests(2, 8, 7, vocab_size=1024, seed=0)
    records, _ = asyncio.run(run_load(url + "/merged", reqs, concurrency=2))
    assert all(r.ok and len(r.chunk_times) == 4 for r in records)
    assert [r.output_tokens for r in records] == [7, 7]


def test_cli_bench_url(fake_server, tmp_path):
    from click.testing import CliRunner

    from disagg_mpi.cli import cli

    url, _ = fake_server
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["bench", "--url", url, "--label", "fake", "--model", "random:tiny",
                                   "--num-requests", "8", "--input-len", "16", "--output-len", "4",
                                   "--request-rate", "inf,100", "--concurrency", "4", "--warmup", "1",
                                   "--slo-ttft-ms", "1000", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert [r["num_samples"] for r in data["results"]] == [8, 8]
    assert data["results"][0]["request_rate"] == "inf"
    assert (out / "throughput_vs_load.png").stat().st_size > 0
    assert "fake @rate=inf,conc=4" in res.output


def test_interrupted_sweep_reports_the_points_that_finished(fake_server, tmp_path):
    """SIGTERM (a `timeout`, a scheduler) in the middle of a rate sweep: the finished point is
    printed as it ends and written out; the exit code says the run was cut (130)."""
    import signal
    import subprocess
    import sys

    url, _ = fake_server
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "disagg_mpi.cli", "bench", "--url", url, "--label", "fake",
                             "--model", "random:tiny", "--num-requests", "6", "--input-len", "8", "--output-len", "4",
                             "--request-rate", "100,0.5", "--warmup", "0", "--no-progress", "--no-plots",
                             "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:   # the 0.5 req/s point takes ~12 s: plenty of time to cut it
        seen.append(line)
        if line.startswith("fake rate=100: "):
            break
    assert "tok/s, TTFT p50" in seen[-1], seen
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted: reporting the 1 load point(s) that finished" in stderr
    data = json.loads((out / "results.json").read_text())
    assert data["interrupted"] is True and [r["request_rate"] for r in data["results"]] == [100.0]
    assert data["results"][0]["num_samples"] == 6
    assert "token_throughput" in stdout   # the table of what finished


def test_cli_bench_url_sends_text_to_a_server_that_takes_no_token_ids(fake_server, tmp_path):
    """llama.cpp's server takes string prompts only: `--prompt-format auto` finds out and decodes the
    workload's prompts with the model's tokenizer; `ids` against it fails every request."""
    from click.testing import CliRunner

    from disagg_mpi.cli import cli

    url, seen = fake_server
    args = ["bench", "--url", url + "/textonly", "--label", "llama.cpp", "--model", "smollm2", "--num-requests", "4",
            "--input-len", "16", "--output-len", "3", "--warmup", "0", "--no-progress", "--no-plots"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "auto")])
    assert res.exit_code == 0, res.output
    assert "llama.cpp: the server refuses token ids: sending text prompts" in res.output
    sent = [b["prompt"] for b in seen if b["max_tokens"] == 3]
    assert len(sent) == 4 and all(isinstance(p, str) and p for p in sent)
    data = json.loads((tmp_path / "auto" / "results.json").read_text())
    assert data["results"][0]["num_samples"] == 4 and data["results"][0]["num_errors"] == 0
    res = CliRunner().invoke(cli, [*args, "--prompt-format", "ids", "--out", str(tmp_path / "ids")])
    assert res.exit_code == 1   # every request refused

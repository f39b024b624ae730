"""Prometheus metrics of the server, in a private registry (served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..api import RequestMetrics

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TPOT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# "refused": the client's fault (a 4xx); "error": the server's (a 5xx, or a stream cut by an error)
OUTCOMES = ("ok", "refused", "error", "cancelled")


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, executors: dict[int, str]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("disagg_requests", "Completion requests by outcome", ["outcome"], registry=r)
        for o in OUTCOMES:
            self.requests.labels(o)
        self.prompt_tokens = Counter("disagg_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("disagg_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.ttft = Histogram("disagg_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("disagg_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram("disagg_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_LATENCY, registry=r)
        self.in_flight = Gauge("disagg_requests_in_flight", "Requests the server is running now", registry=r)
        self.exec_load = Gauge("disagg_executor_load_tokens", "Tokens in flight on each executor "
                               "(prompt + max_tokens of its requests, as it last reported)", ["executor", "kind"],
                               registry=r)
        self.exec_queue = Gauge("disagg_executor_queue_depth", "Requests waiting, running or pulling KV on "
                                "each executor (as it last reported)", ["executor", "kind"], registry=r)
        self.exec_running = Gauge("disagg_executor_running", "Requests running on each executor",
                                  ["executor", "kind"], registry=r)
        self.kv_free = Gauge("disagg_kv_free_blocks", "Free KV cache blocks of each executor",
                             ["executor", "kind"], registry=r)
        self.kv_total = Gauge("disagg_kv_blocks", "KV cache blocks of each executor", ["executor", "kind"],
                              registry=r)
        self.kv_held = Gauge("disagg_kv_held_blocks", "KV blocks of answered contexts held for their generation "
                             "phase (until it pulls them, or their lease ends), per context executor",
                             ["executor", "kind"], registry=r)
        self.kv_held_client = Gauge("disagg_kv_held_client_blocks", "Of disagg_kv_held_blocks: those held for "
                                    "clients that send the generation phase themselves (context_only; capped by "
                                    "max_held_fraction)", ["executor", "kind"], registry=r)
        self.kv_oldest_hold = Gauge("disagg_kv_oldest_hold_seconds", "Age of the oldest held context of each "
                                    "executor (0: none)", ["executor", "kind"], registry=r)
        self.held_full = Counter("disagg_held_contexts_full", "context_only requests refused with 429: contexts "
                                 "held for their generation phase filled their share of the pool", registry=r)
        self.kv_bytes = Counter("disagg_kv_transfer_bytes", "KV cache bytes moved context -> generation",
                                registry=r)
        self.kv_seconds = Counter("disagg_kv_transfer_seconds", "Time spent moving KV cache", registry=r)
        self.kinds = executors
        for ex, kind in executors.items():
            for g in (self.exec_load, self.exec_queue, self.exec_running, self.kv_free, self.kv_total, self.kv_held,
                      self.kv_held_client, self.kv_oldest_hold):
                g.labels(str(ex), kind)

    def outcome(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def finished(self, metrics: RequestMetrics, prompt_tokens: int, n_out: int) -> None:
        """Feed the metrics of one final response."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(n_out)
        ttft, e2e = metrics.ttft_ms, metrics.e2e_ms
        if ttft is not None:
            self.ttft.observe(ttft / 1e3)
        if e2e is not None:
            self.e2e.observe(e2e / 1e3)
        if ttft is not None and e2e is not None and n_out > 1:
            self.tpot.observe(max(0.0, e2e - ttft) / 1e3 / (n_out - 1))
        if metrics.kv_transfer_bytes:
            self.kv_bytes.inc(metrics.kv_transfer_bytes)
        if metrics.kv_transfer_ms:
            self.kv_seconds.inc(metrics.kv_transfer_ms / 1e3)

    def update_executors(self, load: dict[int, int], free_blocks: dict[int, int], stats: dict[int, dict]) -> None:
        for ex, kind in self.kinds.items():
            s = stats.get(ex, {})
            lab = (str(ex), kind)
            if ex in load:
                self.exec_load.labels(*lab).set(load[ex])
            if s:
                self.exec_queue.labels(*lab).set(s.get("waiting", 0) + s.get("running", 0)
                                                 + s.get("pending_transfers", 0))
                self.exec_running.labels(*lab).set(s.get("running", 0))
                self.kv_total.labels(*lab).set(s.get("num_blocks", 0))
                self.kv_held.labels(*lab).set(s.get("held_blocks", 0))
                self.kv_held_client.labels(*lab).set(s.get("held_client_blocks", 0))
                self.kv_oldest_hold.labels(*lab).set(s.get("oldest_hold_s", 0.0))
            free = s.get("free_blocks", free_blocks.get(ex))
            if free is not None:
                self.kv_free.labels(*lab).set(free)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics for `GET /metrics` (names follow vLLM's `vllm:*` set, under `nanoflow:`).

Each server gets its own registry, so several apps (tests) can live in one process.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("nanoflow:num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("nanoflow:num_requests_waiting", "Requests waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("nanoflow:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)",
                              registry=r)
        self.num_free_blocks = Gauge("nanoflow:kv_cache_free_blocks", "Free KV-cache blocks", registry=r)
        self.num_blocks = Gauge("nanoflow:kv_cache_total_blocks", "KV-cache blocks in the pool", registry=r)
        self.prompt_tokens = Counter("nanoflow:prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("nanoflow:generation_tokens", "Generated tokens", registry=r)
        self.preemptions = Counter("nanoflow:num_preemptions", "Preemptions (recompute)", registry=r)
        self.finished = Counter("nanoflow:request_success", "Requests that finished", registry=r)
        self.aborted = Counter("nanoflow:request_aborted", "Requests aborted (client gone, error)", registry=r)
        self.rejected = Counter("nanoflow:request_rejected", "Requests answered 4xx/429 before running",
                                ["status"], registry=r)
        self.ttft = Histogram("nanoflow:time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("nanoflow:inter_token_latency_seconds", "Time between output steps of a request",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("nanoflow:e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

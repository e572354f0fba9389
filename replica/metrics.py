"""The replica's Prometheus metrics, in a registry of their own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Latency buckets from 5 ms to 60 s: TPOT lives at the low end, TTFT of long prompts high.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 60)


class ReplicaMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sloserve_requests",
            "Requests by SLO class and outcome (attained, missed, rejected, invalid, "
            "cancelled, error).",
            ["slo_class", "outcome"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "sloserve_rejections",
            "Requests not admitted, by SLO class and reason.",
            ["slo_class", "reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "sloserve_ttft_seconds",
            "Time from arrival to first token, per SLO class.",
            ["slo_class"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "sloserve_tpot_seconds",
            "Mean time per output token after the first, per request, per SLO class.",
            ["slo_class"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.running = Gauge(
            "sloserve_running_requests", "Requests the engine is running.", registry=self.registry
        )
        self.waiting = Gauge(
            "sloserve_waiting_requests",
            "Requests waiting in the engine's queue.",
            registry=self.registry,
        )
        self.kv_cache_usage = Gauge(
            "sloserve_kv_cache_usage", "Fraction of the KV cache in use.", registry=self.registry
        )
        self.ready = Gauge("sloserve_ready", "1 when the engine is ready.", registry=self.registry)
        self.draining = Gauge(
            "sloserve_draining", "1 while the replica drains.", registry=self.registry
        )

    def bind_load(
        self, running: Callable[[], float], waiting: Callable[[], float], kv: Callable[[], float]
    ) -> None:
        """Reads the engine gauges at scrape time, so they are never stale."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.kv_cache_usage.set_function(kv)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serves /metrics over HTTP in a background thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

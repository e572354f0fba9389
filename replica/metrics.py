"""The replica's Prometheus metrics, in a registry of their own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from sloserve.replica.reports import StepRecord, VerdictRecord
from sloserve.stepmodel import StepTimeModel

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
        self.verdicts = Counter(
            "sloserve_admission_verdicts",
            "The SLO scheduler's decisions, by SLO class, event (admitted, best_effort, "
            "rejected at arrival; demoted, aborted when a deadline can no longer be met) and "
            "reason (COMPUTE, MEMORY, EXPIRED; empty when admitted).",
            ["slo_class", "event", "reason"],
            registry=self.registry,
        )
        self.planner_seconds = Histogram(
            "sloserve_planner_seconds",
            "Time the SLO scheduler took to plan each engine step.",
            buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2),
            registry=self.registry,
        )
        self.ttft = Histogram(
            "sloserve_ttft_seconds",
            "Time from arrival to first token, per SLO class; arrival upstream for a request "
            "that already waited (GenerateRequest.already_waited).",
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
        self.step_seconds = Histogram(
            "sloserve_step_seconds",
            "Duration of each executed engine step.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.step_tokens = Histogram(
            "sloserve_step_tokens",
            "Tokens computed in each executed engine step.",
            buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=self.registry,
        )
        self.step_model_error = Histogram(
            "sloserve_step_model_relative_error",
            "Measured step time / step-time model prediction - 1, per step.",
            buckets=(-0.5, -0.25, -0.1, -0.05, 0, 0.05, 0.1, 0.25, 0.5, 1, 2),
            registry=self.registry,
        )
        self.step_model_mape = Gauge(
            "sloserve_step_model_mape",
            "Moving average of the step-time model's absolute percentage error (drift).",
            registry=self.registry,
        )
        self._mape: float | None = None

    def observe_step(self, record: StepRecord, model: StepTimeModel | None) -> None:
        """Called for every executed step (from the step receiver's thread)."""
        self.step_seconds.observe(record.seconds)
        self.step_tokens.observe(record.shape.tokens)
        if record.planner_s > 0:
            self.planner_seconds.observe(record.planner_s)
        if model is None:
            return
        predicted = model.predict(record.shape)
        if predicted <= 0:
            return
        error = record.seconds / predicted - 1.0
        self.step_model_error.observe(error)
        sample = abs(error) * 100
        # About the last 200 steps: slow enough to ignore one odd step, fast enough to show drift.
        self._mape = sample if self._mape is None else self._mape + 0.005 * (sample - self._mape)
        self.step_model_mape.set(self._mape)

    def observe_verdict(self, record: VerdictRecord) -> None:
        self.verdicts.labels(record.class_name, record.event, record.reason).inc()

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

"""The gateway's Prometheus metrics, in a registry of their own (as the replica's)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# The replica's buckets: 5 ms to 60 s.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sloserve_gateway_requests",
            "Requests by SLO class and outcome (attained, missed, best_effort, rejected, "
            "queue_full, queue_timeout, unavailable, failed, invalid, cancelled, error, "
            "unauthenticated, denied, rate_limited).",
            ["slo_class", "outcome"],
            registry=r,
        )
        self.attainment = Gauge(
            "sloserve_gateway_attainment",
            "Fraction of arrived requests that attained their SLO, per class, measured by "
            "the gateway from its own arrival time (methodology §2).",
            ["slo_class"],
            registry=r,
        )
        self.rejections = Counter(
            "sloserve_gateway_rejections",
            "Requests the gateway answered RESOURCE_EXHAUSTED, by class and reason.",
            ["slo_class", "reason"],
            registry=r,
        )
        self.replica_rejections = Counter(
            "sloserve_gateway_replica_rejections",
            "Rejections by a replica (the gateway then tries the next), by replica and reason.",
            ["replica", "reason"],
            registry=r,
        )
        self.rerouted = Counter(
            "sloserve_gateway_rerouted",
            "Requests re-sent to another replica before any token, by why (rejected, "
            "unreachable, failed: an error from the replica, stalled: it sent nothing for the "
            "stall timeout).",
            ["why"],
            registry=r,
        )
        self.failed = Counter(
            "sloserve_gateway_failed_requests",
            "Requests that ended with an error, by reason: the error's ErrorInfo reason "
            "(NO_REPLICA, REPLICA_FAILED, COMPUTE, QUEUE_FULL, ...), else its gRPC code.",
            ["reason"],
            registry=r,
        )
        self.replica_stalls = Counter(
            "sloserve_gateway_replica_stalls",
            "Calls a replica answered nothing to for the stall timeout, by replica; each takes "
            "the replica out of rotation for a back-off.",
            ["replica"],
            registry=r,
        )
        self.spilled = Counter(
            "sloserve_gateway_spilled",
            "Requests put in the best-effort queue, by SLO class.",
            ["slo_class"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "sloserve_gateway_queue_depth",
            "Requests waiting in the best-effort queue, by SLO class.",
            ["slo_class"],
            registry=r,
        )
        self.ttft = Histogram(
            "sloserve_gateway_ttft_seconds",
            "Time from arrival at the gateway to the first token, per SLO class.",
            ["slo_class"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "sloserve_gateway_tpot_seconds",
            "Mean time per output token after the first, per request, per SLO class.",
            ["slo_class"],
            buckets=_BUCKETS,
            registry=r,
        )
        # Tenants come only from the API-keys file, so this label set is bounded.
        self.tenant_requests = Counter(
            "sloserve_gateway_tenant_requests",
            "Requests by tenant (with API keys on) and outcome (as sloserve_gateway_requests, "
            "plus denied and rate_limited).",
            ["tenant", "outcome"],
            registry=r,
        )
        self.session_routes = Counter(
            "sloserve_gateway_session_routes",
            "Requests naming a session, by how affinity routed them: kept (on the session's "
            "replica), moved (that replica was out of rotation or infeasible), new.",
            ["result"],
            registry=r,
        )
        self.replicas_in_rotation = Gauge(
            "sloserve_gateway_replicas_in_rotation",
            "Replicas taking new requests.",
            registry=r,
        )

    def set_queue_depths(self, depths: dict[str, int]) -> None:
        for class_name, depth in depths.items():
            self.queue_depth.labels(class_name).set(depth)

    def bind_rotation(self, count: Callable[[], float]) -> None:
        self.replicas_in_rotation.set_function(count)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serves /metrics over HTTP in a background thread; returns the bound port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

"""The gateway process: both front doors, the replica pool, and a SIGTERM drain.

Life cycle:
1. gRPC (Inference, health, reflection), HTTP and metrics servers start at once; health
   says SERVING while at least one replica is in rotation.
2. SIGTERM (or SIGINT): health says NOT_SERVING; for `--shutdown-delay` seconds new
   requests are still served (load balancers take that long to stop sending: a rolling
   update then fails none), then new requests get UNAVAILABLE (HTTP 503), requests in flight
   (queued ones included) finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sloserve.errors import FieldError
from sloserve.gateway.affinity import AffinityTable
from sloserve.gateway.auth import ApiKeys
from sloserve.gateway.discovery import Discovery, StaticDiscovery, follow
from sloserve.gateway.dispatch import Dispatcher, DispatchSettings
from sloserve.gateway.grpc_service import GatewayInference
from sloserve.gateway.http_api import HttpApi
from sloserve.gateway.http_limits import HttpLimits, LimitedSite
from sloserve.gateway.k8s_discovery import KubernetesDiscovery
from sloserve.gateway.loop_lag import LoopLag
from sloserve.gateway.metrics import GatewayMetrics
from sloserve.gateway.replica_pool import ReplicaPool
from sloserve.gateway.routing import Router
from sloserve.gateway.slo_summary import BUDGETS_KEY, SloSummary
from sloserve.gateway.spillover import SpilloverDrainer, SpilloverQueue
from sloserve.gateway.tls import TlsFiles
from sloserve.slo import SloCatalog
from sloserve.v1 import inference_pb2_grpc

log = logging.getLogger("sloserve.gateway")

INFERENCE_SERVICE = "sloserve.v1.Inference"


@dataclass(frozen=True)
class GatewaySettings:
    replicas: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = 50050
    http_port: int | None = 8000  # None: no HTTP front door
    metrics_port: int | None = 9500  # None: no metrics endpoint
    routing: str = "slack"
    classes_file: Path | None = None  # None: the built-in default classes
    model_names: tuple[str, ...] = ("sloserve",)  # names the HTTP API answers to
    queue_capacity: int = 64  # best-effort queue bound, per SLO class
    queue_ttl_s: float = 30.0
    spill_max_in_flight: int = 4  # a replica takes spilled work below this many requests
    report_interval_s: float = 0.25
    stall_timeout_s: float = 60.0
    drain_timeout_s: float = 300.0
    # After SIGTERM: health NOT_SERVING but requests still served, before the drain.
    shutdown_delay_s: float = 0.0
    api_keys: Path | None = None  # a YAML file or a directory (gateway/auth.py); None: off
    tls_cert: Path | None = None  # both or neither: TLS on the gRPC and HTTP ports
    tls_key: Path | None = None
    session_ttl_s: float = 600.0  # session affinity: a session's replica is kept this long
    max_sessions: int = 100_000
    # Replicas from a Kubernetes Service (NAMESPACE/NAME) instead of `replicas`: its ready
    # endpoints on port `k8s_port` (a name or number), watched (gateway/k8s_discovery.py).
    k8s_service: str | None = None
    k8s_port: str = "grpc"
    # What one HTTP client may hold: body size, header/body/write timeouts, connections.
    http_limits: HttpLimits = field(default_factory=HttpLimits)


def status_json(dispatcher: Dispatcher, loop_lag: LoopLag) -> dict[str, Any]:
    """GET /v1/slo/summary: per-class SLO tallies, the queue, each replica's state, and the
    event loop's recent lag (time the gateway's clock does not see)."""
    pool, now = dispatcher.pool, time.monotonic()
    replicas = []
    for r in pool.all():
        why_out = r.out_of_rotation_because(now, pool.stale_after_s)
        report = r.report
        replicas.append(
            {
                "endpoint": r.endpoint,
                "in_rotation": not why_out,
                "out_of_rotation_because": why_out or None,
                "gateway_in_flight": r.outstanding.in_flight,
                "load": None
                if report is None
                else {
                    "running": report.running,
                    "waiting": report.waiting,
                    "kv_cache_usage": report.kv_cache_usage,
                    "pending_prefill_tokens": report.pending_prefill_tokens,
                },
            }
        )
    return {
        "routing": dispatcher.router.policy,
        "draining": dispatcher.draining,
        "leaving": dispatcher.leaving,
        "in_flight": dispatcher.in_flight,
        "event_loop_lag_s": {"recent_max": loop_lag.recent_max_s()},
        "classes": dispatcher.summary.to_json(),
        "queue": {
            "depth": {name or BUDGETS_KEY: n for name, n in dispatcher.queue.depths().items()},
            "capacity_per_class": dispatcher.queue.capacity_per_class,
            "ttl_s": dispatcher.queue.ttl_s,
        },
        "replicas": replicas,
        "sessions": {"tracked": len(dispatcher.affinity), "ttl_s": dispatcher.affinity.ttl_s},
    }


def _publish_health(servicer: Any, dispatcher: Dispatcher) -> None:
    serving = dispatcher.serving()
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for service in ("", INFERENCE_SERVICE):
        servicer.set(service, status)


async def serve(settings: GatewaySettings) -> int:
    """Runs the gateway until SIGTERM/SIGINT; returns the process exit code."""
    catalog = (
        SloCatalog.load(settings.classes_file) if settings.classes_file else SloCatalog.default()
    )
    # Configuration errors surface before any port is opened.
    api_keys = ApiKeys.load(settings.api_keys, catalog.classes) if settings.api_keys else None
    tls = TlsFiles.load(settings.tls_cert, settings.tls_key)
    settings.http_limits.check()
    if not 0 <= settings.shutdown_delay_s < math.inf:
        raise FieldError("shutdown_delay", "must be a number of seconds, at least 0")
    if settings.session_ttl_s <= 0:
        raise FieldError("session_ttl", "must be above 0")
    if settings.max_sessions < 1:
        raise FieldError("max_sessions", "must be at least 1")
    discovery: Discovery
    if settings.k8s_service is None:
        discovery = StaticDiscovery(settings.replicas)
    elif settings.replicas:
        raise FieldError("k8s_service", "give replicas or a Kubernetes Service, not both")
    else:
        discovery = KubernetesDiscovery(settings.k8s_service, settings.k8s_port)
    router = Router(settings.routing)
    pool = ReplicaPool(settings.report_interval_s)
    metrics = GatewayMetrics()
    queue = SpilloverQueue(settings.queue_capacity, settings.queue_ttl_s)
    drainer = SpilloverDrainer(
        queue, pool, router, settings.spill_max_in_flight, metrics.set_queue_depths
    )
    dispatcher = Dispatcher(
        pool,
        router,
        catalog,
        queue,
        drainer,
        metrics,
        SloSummary(),
        DispatchSettings(stall_timeout_s=settings.stall_timeout_s),
        api_keys,
        AffinityTable(settings.max_sessions, settings.session_ttl_s),
    )
    metrics.bind_rotation(lambda: len(pool.in_rotation()))
    loop_lag = LoopLag(metrics.registry)

    # No SO_REUSEPORT: a second gateway on the same port must fail, not share the traffic.
    server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
    inference_pb2_grpc.add_InferenceServicer_to_server(GatewayInference(dispatcher), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, tls.grpc_credentials())
    _publish_health(health_servicer, dispatcher)
    pool.subscribe(lambda: _publish_health(health_servicer, dispatcher))
    await server.start()
    log.info(
        "gRPC on %s:%d (routing: %s%s%s)",
        settings.host,
        port,
        settings.routing,
        ", TLS" if tls else "",
        f", API keys of {len(api_keys.tenants)} tenant(s)" if api_keys else "",
    )

    runner: web.AppRunner | None = None
    if settings.http_port is not None:
        limits = settings.http_limits
        api = HttpApi(
            dispatcher,
            list(settings.model_names),
            lambda: status_json(dispatcher, loop_lag),
            limits,
        )
        # Cancel a handler whose client went away, so its replica stops generating too.
        runner = web.AppRunner(
            api.app(), handler_cancellation=True, access_log=None, **limits.runner_args()
        )
        await runner.setup()
        ssl_context = tls.ssl_context() if tls else None
        await LimitedSite(
            runner, settings.host, settings.http_port, limits, ssl_context=ssl_context
        ).start()
        scheme = "https" if tls else "http"
        log.info("HTTP (OpenAI API) on %s://%s:%d/v1", scheme, settings.host, settings.http_port)
    if settings.metrics_port is not None:
        metrics_port = metrics.serve(settings.metrics_port, settings.host)
        log.info("metrics on http://%s:%d/metrics", settings.host, metrics_port)

    background = [
        asyncio.create_task(follow(discovery, pool), name="discovery"),
        asyncio.create_task(drainer.run(), name="spillover drainer"),
        asyncio.create_task(loop_lag.run(), name="event-loop lag"),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    if settings.shutdown_delay_s > 0:
        # A load balancer (a Service's endpoints, kube-proxy) stops sending to a pod some
        # seconds after it starts terminating: health fails at once, requests are served on.
        stop.clear()
        dispatcher.leaving = True
        _publish_health(health_servicer, dispatcher)
        log.info("leaving: serving for %g s more before draining", settings.shutdown_delay_s)
        with contextlib.suppress(TimeoutError):  # a second signal ends the wait
            await asyncio.wait_for(stop.wait(), settings.shutdown_delay_s)
    dispatcher.draining = True
    _publish_health(health_servicer, dispatcher)
    log.info("draining: %d request(s) in flight", dispatcher.in_flight)
    try:
        await asyncio.wait_for(dispatcher.idle.wait(), settings.drain_timeout_s)
    except TimeoutError:
        log.warning("drain timed out with %d request(s) in flight", dispatcher.in_flight)
    await server.stop(grace=1)
    if runner is not None:
        await runner.cleanup()
    for task in background:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await pool.close()
    log.info("stopped")
    return 0

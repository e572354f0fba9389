"""The gateway Deployment and its Service.

The gateway finds replicas through the headless Service's Endpoints (`--k8s-service`, port
`grpc`), so it needs a ServiceAccount allowed to watch them (`access.py`).
"""

from __future__ import annotations

from typing import Any

from sloserve.operator.naming import (
    API_KEYS_DIR,
    CLASSES_FILE,
    CONFIG_DIR,
    CONFIG_HASH_ANNOTATION,
    Owner,
)
from sloserve.operator.spec import SloServiceSpec

COMPONENT = "gateway"
# After SIGTERM the gateway keeps serving this long with its readiness failing: the Service's
# endpoints, and the proxies and load balancers that follow them, stop sending to a
# terminating pod only some seconds later, and a rolling update must fail no request.
SHUTDOWN_DELAY_S = 10
# The delay, `sloserve gateway --drain-timeout` (300 s), plus time to exit.
TERMINATION_GRACE_S = SHUTDOWN_DELAY_S + 330


def gateway_args(owner: Owner, spec: SloServiceSpec) -> list[str]:
    g, q = spec.gateway, spec.queue
    args = [
        "gateway",
        "--k8s-service", f"{owner.namespace}/{owner.replica_service}",
        "--k8s-port", "grpc",
        "--host", "0.0.0.0",
        "--port", str(g.grpc_port),
        "--http-port", str(g.http_port),
        "--metrics-port", str(g.metrics_port),
        "--routing", g.routing,
        "--classes", f"{CONFIG_DIR}/{CLASSES_FILE}",
        "--model-name", spec.model.served_name,
        "--queue-capacity", str(q.capacity),
        "--queue-ttl", f"{q.ttl_seconds:g}",
        "--shutdown-delay", str(SHUTDOWN_DELAY_S),
    ]  # fmt: skip
    if g.auth_secret:
        args += ["--api-keys", API_KEYS_DIR]
    return args


def deployment(owner: Owner, spec: SloServiceSpec, image: str, config_hash: str) -> dict[str, Any]:
    g = spec.gateway
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": owner.config_map}}]
    if g.auth_secret:
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
        volumes.append({"name": "api-keys", "secret": {"secretName": g.auth_secret}})
    container = {
        "name": COMPONENT,
        "image": image,
        "imagePullPolicy": spec.engine.image_pull_policy,
        "command": ["sloserve"],
        "args": gateway_args(owner, spec),
        "ports": [
            {"name": "grpc", "containerPort": g.grpc_port, "protocol": "TCP"},
            {"name": "http", "containerPort": g.http_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": g.metrics_port, "protocol": "TCP"},
        ],
        # SERVING only while some replica is in rotation: no traffic to a gateway with none.
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        # Liveness asks only that the port answers, so a gateway is not restarted for lack of
        # replicas.
        "livenessProbe": {
            "tcpSocket": {"port": "http"},
            "periodSeconds": 20,
            "failureThreshold": 3,
        },
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
        "volumeMounts": mounts,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owner.metadata(owner.gateway, COMPONENT),
        "spec": {
            "replicas": g.replicas,
            "selector": {"matchLabels": owner.selector(COMPONENT)},
            "template": {
                "metadata": {
                    "labels": owner.labels(COMPONENT),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
                },
                "spec": {
                    "serviceAccountName": owner.gateway,
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }


def service(owner: Owner, spec: SloServiceSpec) -> dict[str, Any]:
    g = spec.gateway
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(owner.gateway, COMPONENT),
        "spec": {
            "type": g.service_type,
            "selector": owner.selector(COMPONENT),
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in (
                    ("grpc", g.grpc_port),
                    ("http", g.http_port),
                    ("metrics", g.metrics_port),
                )
            ],
        },
    }

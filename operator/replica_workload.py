"""The replica Deployment and its headless Service.

Readiness is the replica's own gRPC health (SERVING once the engine is up, NOT_SERVING while
draining). A `grpc` probe exists only from Kubernetes 1.24, so the probe runs `sloserve health`
inside the container, which asks the same health service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sloserve.operator.naming import (
    CLASSES_FILE,
    CONFIG_DIR,
    CONFIG_HASH_ANNOTATION,
    MODELS_DIR,
    PROFILE_FILE,
    REPLICA_GRPC_PORT,
    REPLICA_METRICS_PORT,
    Owner,
)
from sloserve.operator.spec import SloServiceSpec

COMPONENT = "replica"
GPU_RESOURCE = "nvidia.com/gpu"
# `sloserve replica --drain-timeout` (300 s) plus time to exit.
TERMINATION_GRACE_S = 330
# Loading a large model can take many minutes; the startup probe allows 15.
STARTUP_PROBE_PERIOD_S = 10
STARTUP_PROBE_FAILURES = 90


@dataclass(frozen=True)
class ModelLocation:
    path: str  # what `sloserve replica --model` loads
    volume: dict[str, Any] | None = None  # a volume to mount for it
    mount: dict[str, Any] | None = None
    build: str = ""  # a built-in model kind the replica builds at `path` first


BUILTIN_PREFIX = "builtin://"


def model_location(source: str) -> ModelLocation:
    """Where the replica finds the model: a path in the image, a path on a PVC, or a
    built-in random-weight model it builds into an emptyDir at start."""
    if source.startswith(BUILTIN_PREFIX):
        kind = source.removeprefix(BUILTIN_PREFIX)
        mount_path = f"{MODELS_DIR}/builtin"
        return ModelLocation(
            path=f"{mount_path}/{kind}",
            # An emptyDir outlives container restarts, so a restarted replica builds nothing.
            volume={"name": "model", "emptyDir": {}},
            mount={"name": "model", "mountPath": mount_path},
            build=kind,
        )
    if not source.startswith("pvc://"):
        return ModelLocation(source)
    claim, _, rest = source.removeprefix("pvc://").partition("/")
    mount_path = f"{MODELS_DIR}/{claim}"
    return ModelLocation(
        path=mount_path + (f"/{rest.strip('/')}" if rest.strip("/") else ""),
        volume={"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
        mount={"name": "model", "mountPath": mount_path, "readOnly": True},
    )


def _health_probe(period_s: int, failures: int) -> dict[str, Any]:
    return {
        "exec": {"command": ["sloserve", "health", "--endpoint", f"127.0.0.1:{REPLICA_GRPC_PORT}"]},
        "periodSeconds": period_s,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _resources(spec: SloServiceSpec) -> dict[str, Any]:
    requests, limits = dict(spec.engine.requests), dict(spec.engine.limits)
    if spec.engine.gpus_per_replica:
        gpus = str(spec.engine.gpus_per_replica)
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = gpus
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def replica_args(spec: SloServiceSpec, model: ModelLocation) -> list[str]:
    return [
        "replica",
        "--model", model.path,
        *(["--build-model", model.build] if model.build else []),
        "--host", "0.0.0.0",
        "--port", str(REPLICA_GRPC_PORT),
        "--metrics-port", str(REPLICA_METRICS_PORT),
        "--classes", f"{CONFIG_DIR}/{CLASSES_FILE}",
        "--profile", f"{CONFIG_DIR}/{PROFILE_FILE}",
        "--max-model-len", str(spec.model.max_model_len),
        *spec.model.engine_args,
    ]  # fmt: skip


def deployment(
    owner: Owner, spec: SloServiceSpec, image: str, replicas: int, config_hash: str
) -> dict[str, Any]:
    model = model_location(spec.model.source)
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},  # vLLM's workers share tensors here
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": owner.config_map}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if model.volume and model.mount:
        mounts.append(model.mount)
        volumes.append(model.volume)
    container: dict[str, Any] = {
        "name": COMPONENT,
        "image": image,
        "imagePullPolicy": spec.engine.image_pull_policy,
        "command": ["sloserve"],
        "args": replica_args(spec, model),
        "ports": [
            {"name": "grpc", "containerPort": REPLICA_GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": REPLICA_METRICS_PORT, "protocol": "TCP"},
        ],
        "startupProbe": _health_probe(STARTUP_PROBE_PERIOD_S, STARTUP_PROBE_FAILURES),
        "readinessProbe": _health_probe(5, 2),
        # Liveness only asks that the port answers: NOT_SERVING while draining is healthy.
        "livenessProbe": {
            "tcpSocket": {"port": "grpc"},
            "periodSeconds": 20,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": _resources(spec),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # replicas never talk to the API
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "containers": [container],
        "volumes": volumes,
    }
    if spec.engine.gpus_per_replica:
        pod_spec["tolerations"] = [
            {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owner.metadata(owner.replica_deployment, COMPONENT),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": owner.selector(COMPONENT)},
            "template": {
                "metadata": {
                    "labels": owner.labels(COMPONENT),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash},
                },
                "spec": pod_spec,
            },
        },
    }


def headless_service(owner: Owner) -> dict[str, Any]:
    """Endpoints of ready replicas, which the gateway watches (--k8s-service)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(owner.replica_service, COMPONENT),
        "spec": {
            "clusterIP": "None",
            "selector": owner.selector(COMPONENT),
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in (("grpc", REPLICA_GRPC_PORT), ("metrics", REPLICA_METRICS_PORT))
            ],
        },
    }


def disruption_budget(owner: Owner, api_version: str) -> dict[str, Any]:
    """At most one replica down at a time for voluntary disruptions (drains, upgrades).

    `api_version` is policy/v1 where served (1.21+), else policy/v1beta1.
    """
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": owner.metadata(owner.disruption_budget, COMPONENT),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": owner.selector(COMPONENT)}},
    }

"""An SLOService's spec as typed values, with the CRD's defaults applied.

The API server applies the schema's defaults already; applying the same ones here (from
`crd.DEFAULTS`) keeps the operator correct on objects no schema touched (fakes, old objects)
and gives the rest of the operator plain attributes instead of nested dict lookups. A missing
required field or a value of the wrong type raises SpecError naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sloserve.operator.crd import DEFAULTS


class SpecError(ValueError):
    """A field is missing or malformed; `field` is its path (spec.classes[1].tpotMs)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ModelSpec:
    source: str
    served_name: str
    engine_args: tuple[str, ...]
    max_model_len: int
    profile: str


@dataclass(frozen=True)
class EngineSpec:
    image: str | None
    image_pull_policy: str
    gpus_per_replica: int
    tensor_parallel_size: int
    requests: Mapping[str, str]
    limits: Mapping[str, str]


@dataclass(frozen=True)
class ReplicasSpec:
    initial: int
    min: int
    max: int
    desired: int | None  # None until something wrote it through /scale


@dataclass(frozen=True)
class ClassSpec:
    name: str
    description: str
    ttft_ms: float | None
    ttft_zero_load_multiple: float | None
    tpot_ms: float
    thinking_tpot_ms: float | None
    attainment_target: float
    priority: int
    spill_to_best_effort: bool


@dataclass(frozen=True)
class GatewaySpec:
    replicas: int
    service_type: str
    routing: str
    grpc_port: int
    http_port: int
    metrics_port: int
    auth_secret: str | None


@dataclass(frozen=True)
class QueueSpec:
    capacity: int
    ttl_seconds: float


@dataclass(frozen=True)
class AutoscalingSpec:
    enabled: bool
    window_seconds: int
    hysteresis: float
    target_in_flight_per_replica: int


@dataclass(frozen=True)
class SloServiceSpec:
    model: ModelSpec
    engine: EngineSpec
    replicas: ReplicasSpec
    classes: tuple[ClassSpec, ...]
    default_class: str
    gateway: GatewaySpec
    queue: QueueSpec
    autoscaling: AutoscalingSpec

    @property
    def desired_replicas(self) -> int:
        """What the replica Deployment should run: /scale's value, else `initial`."""
        return self.replicas.initial if self.replicas.desired is None else self.replicas.desired


class _Fields:
    """Typed reads from one mapping, with the field path for error messages."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise SpecError(path, "must be an object")
        self.data, self.path = data, path

    def _get(self, key: str, default_key: str | None) -> Any:
        value = self.data.get(key)
        if value is None and default_key is not None:
            value = DEFAULTS.get(default_key)
        return value

    def child(self, key: str) -> _Fields:
        return _Fields(self.data.get(key), f"{self.path}.{key}")

    def text(self, key: str, default_key: str | None = None, required: bool = False) -> str | None:
        value = self._get(key, default_key)
        if value is None:
            if required:
                raise SpecError(f"{self.path}.{key}", "is required")
            return None
        if not isinstance(value, str) or not value:
            raise SpecError(f"{self.path}.{key}", "must be a non-empty string")
        return value

    def integer(
        self, key: str, default_key: str | None = None, required: bool = False
    ) -> int | None:
        value = self._get(key, default_key)
        if value is None:
            if required:
                raise SpecError(f"{self.path}.{key}", "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{self.path}.{key}", "must be an integer")
        return value

    def number(
        self, key: str, default_key: str | None = None, required: bool = False
    ) -> float | None:
        value = self._get(key, default_key)
        if value is None:
            if required:
                raise SpecError(f"{self.path}.{key}", "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{self.path}.{key}", "must be a number")
        return float(value)

    def flag(self, key: str, default_key: str) -> bool:
        value = self._get(key, default_key)
        if not isinstance(value, bool):
            raise SpecError(f"{self.path}.{key}", "must be true or false")
        return value

    def quantities(self, key: str) -> dict[str, str]:
        value = self.data.get(key) or {}
        if not isinstance(value, Mapping):
            raise SpecError(f"{self.path}.{key}", "must be an object")
        return {str(k): str(v) for k, v in value.items()}


def _required_int(fields: _Fields, key: str, default_key: str | None = None) -> int:
    value = fields.integer(key, default_key, required=True)
    assert value is not None
    return value


def _required_str(fields: _Fields, key: str, default_key: str | None = None) -> str:
    value = fields.text(key, default_key, required=True)
    assert value is not None
    return value


def _required_num(fields: _Fields, key: str, default_key: str | None = None) -> float:
    value = fields.number(key, default_key, required=True)
    assert value is not None
    return value


def _model(f: _Fields) -> ModelSpec:
    args = f.data.get("engineArgs") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError(f"{f.path}.engineArgs", "must be a list of strings")
    return ModelSpec(
        source=_required_str(f, "source"),
        served_name=_required_str(f, "servedName"),
        engine_args=tuple(args),
        max_model_len=_required_int(f, "maxModelLen"),
        profile=_required_str(f, "profile"),
    )


def _engine(f: _Fields) -> EngineSpec:
    resources = f.child("resources")
    return EngineSpec(
        image=f.text("image"),
        image_pull_policy=_required_str(f, "imagePullPolicy", "engine.imagePullPolicy"),
        gpus_per_replica=_required_int(f, "gpusPerReplica", "engine.gpusPerReplica"),
        tensor_parallel_size=_required_int(f, "tensorParallelSize", "engine.tensorParallelSize"),
        requests=resources.quantities("requests"),
        limits=resources.quantities("limits"),
    )


def _replicas(f: _Fields) -> ReplicasSpec:
    initial = _required_int(f, "initial", "replicas.initial")
    minimum = _required_int(f, "min", "replicas.min")
    maximum = f.integer("max")
    return ReplicasSpec(
        initial=initial,
        min=minimum,
        max=max(initial, minimum) if maximum is None else maximum,
        desired=f.integer("desired"),
    )


def _class(f: _Fields) -> ClassSpec:
    return ClassSpec(
        name=_required_str(f, "name"),
        description=f.text("description") or "",
        ttft_ms=f.number("ttftMs"),
        ttft_zero_load_multiple=f.number("ttftZeroLoadMultiple"),
        tpot_ms=_required_num(f, "tpotMs"),
        thinking_tpot_ms=f.number("thinkingTpotMs"),
        attainment_target=_required_num(f, "attainmentTarget", "class.attainmentTarget"),
        priority=_required_int(f, "priority", "class.priority"),
        spill_to_best_effort=f.flag("spillToBestEffort", "class.spillToBestEffort"),
    )


def _gateway(f: _Fields) -> GatewaySpec:
    ports = f.child("ports")
    return GatewaySpec(
        replicas=_required_int(f, "replicas", "gateway.replicas"),
        service_type=_required_str(f, "serviceType", "gateway.serviceType"),
        routing=_required_str(f, "routing", "gateway.routing"),
        grpc_port=_required_int(ports, "grpc", "gateway.ports.grpc"),
        http_port=_required_int(ports, "http", "gateway.ports.http"),
        metrics_port=_required_int(ports, "metrics", "gateway.ports.metrics"),
        auth_secret=f.text("authSecret"),
    )


def parse_spec(spec: Any) -> SloServiceSpec:
    """Reads a custom resource's `spec` (already defaulted or not)."""
    f = _Fields(spec, "spec")
    raw_classes = f.data.get("classes")
    if not isinstance(raw_classes, list) or not raw_classes:
        raise SpecError("spec.classes", "must be a non-empty list")
    classes = tuple(_class(_Fields(c, f"spec.classes[{i}]")) for i, c in enumerate(raw_classes))
    queue, autoscaling = f.child("bestEffortQueue"), f.child("autoscaling")
    return SloServiceSpec(
        model=_model(f.child("model")),
        engine=_engine(f.child("engine")),
        replicas=_replicas(f.child("replicas")),
        classes=classes,
        default_class=f.text("defaultClass") or classes[0].name,
        gateway=_gateway(f.child("gateway")),
        queue=QueueSpec(
            capacity=_required_int(queue, "capacity", "bestEffortQueue.capacity"),
            ttl_seconds=_required_num(queue, "ttlSeconds", "bestEffortQueue.ttlSeconds"),
        ),
        autoscaling=AutoscalingSpec(
            enabled=autoscaling.flag("enabled", "autoscaling.enabled"),
            window_seconds=_required_int(autoscaling, "windowSeconds", "autoscaling.windowSeconds"),
            hysteresis=_required_num(autoscaling, "hysteresis", "autoscaling.hysteresis"),
            target_in_flight_per_replica=_required_int(
                autoscaling, "targetInFlightPerReplica", "autoscaling.targetInFlightPerReplica"
            ),
        ),
    )

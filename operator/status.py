"""An SLOService's status from what the operator observed: a pure function.

Four conditions, each with `observedGeneration` and a reason from `reasons.Reason`:
- Ready: replicas and gateway serve (at least one ready pod each).
- Progressing: a Deployment is rolling out (new spec, scaling, pods starting).
- Degraded: the spec is refused, children could not be applied, or a rollout is stuck.
- SLOMet: every class with requests in the window meets its attainment target.
`lastTransitionTime` moves only when a condition's status changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sloserve.operator.attainment import Unreachable
from sloserve.operator.reasons import Reason
from sloserve.operator.semantics import Problem

CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "SLOMet")


@dataclass(frozen=True)
class ClassResult:
    name: str
    target: float
    window_arrived: int
    window_attainment: float | None
    lifetime_attainment: float | None

    @property
    def met(self) -> bool | None:
        if self.window_attainment is None:
            return None
        return self.window_attainment >= self.target

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "target": self.target,
            "arrived": self.window_arrived,
        }
        if self.window_attainment is not None:
            out["attainment"] = round(self.window_attainment, 4)
            out["met"] = self.met
        if self.lifetime_attainment is not None:
            out["lifetimeAttainment"] = round(self.lifetime_attainment, 4)
        return out


@dataclass(frozen=True)
class Observed:
    generation: int
    class_names: Sequence[str]
    selector: str
    desired_replicas: int
    problem: Problem | None = None  # the spec was refused
    apply_error: str | None = None  # children could not all be applied
    replica_deployment: Mapping[str, Any] | None = None
    gateway_deployment: Mapping[str, Any] | None = None
    slo: Sequence[ClassResult] | Unreachable | None = None


@dataclass(frozen=True)
class _Rollout:
    ready: int
    replicas: int  # pods that exist, old and new
    complete: bool
    stuck: bool


def _rollout(deployment: Mapping[str, Any] | None, want: int) -> _Rollout:
    if deployment is None:
        return _Rollout(0, 0, complete=False, stuck=False)
    status = deployment.get("status") or {}
    generation = int(deployment.get("metadata", {}).get("generation", 0))
    ready = int(status.get("readyReplicas", 0))
    replicas = int(status.get("replicas", 0))
    complete = (
        int(status.get("observedGeneration", 0)) >= generation
        and int(status.get("updatedReplicas", 0)) == want
        and ready == want
        and replicas == want
    )
    stuck = any(
        c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        for c in status.get("conditions") or []
    )
    return _Rollout(ready, replicas, complete, stuck)


def _condition(kind: str, status: str, reason: Reason, message: str) -> dict[str, Any]:
    return {"type": kind, "status": status, "reason": str(reason), "message": message}


def _slo_condition(slo: Sequence[ClassResult] | Unreachable | None) -> dict[str, Any]:
    if slo is None or isinstance(slo, Unreachable):
        message = slo.message if slo else "the gateway has not been read yet"
        return _condition("SLOMet", "Unknown", Reason.GATEWAY_UNREACHABLE, message)
    judged = [c for c in slo if c.met is not None]
    if not judged:
        return _condition("SLOMet", "Unknown", Reason.NO_TRAFFIC, "no requests in the window")
    missed = [c for c in judged if not c.met]
    if missed:
        words = ", ".join(f"{c.name} {c.window_attainment:.1%} < {c.target:.1%}" for c in missed)
        return _condition("SLOMet", "False", Reason.TARGETS_MISSED, words)
    return _condition(
        "SLOMet", "True", Reason.TARGETS_MET, f"{len(judged)} classes at or above target"
    )


def _attainment_column(slo: Sequence[ClassResult] | Unreachable | None) -> str:
    if slo is None or isinstance(slo, Unreachable):
        return "unknown"
    judged = [c for c in slo if c.window_attainment is not None]
    if not judged:
        return "no traffic"
    # The class closest to (or furthest below) its target: the one to watch.
    worst = min(judged, key=lambda c: (c.window_attainment or 0.0) - c.target)
    return f"{worst.name} {worst.window_attainment:.1%}"


def _refused(o: Observed, problem: Problem) -> tuple[list[dict[str, Any]], str]:
    return [
        _condition("Ready", "False", problem.reason, "the spec is refused; nothing was built"),
        _condition("Progressing", "False", problem.reason, "the spec is refused"),
        _condition("Degraded", "True", problem.reason, problem.message),
        _condition("SLOMet", "Unknown", problem.reason, "the spec is refused"),
    ], "Invalid"


def _serving(o: Observed) -> tuple[list[dict[str, Any]], str, _Rollout]:
    replicas = _rollout(o.replica_deployment, o.desired_replicas)
    gateway_want = int((o.gateway_deployment or {}).get("spec", {}).get("replicas", 1))
    gateway = _rollout(o.gateway_deployment, gateway_want)
    counts = (
        f"{replicas.ready}/{o.desired_replicas} replicas and "
        f"{gateway.ready}/{gateway_want} gateway pods ready"
    )
    if o.desired_replicas == 0:
        ready = _condition("Ready", "False", Reason.SCALED_TO_ZERO, "replicas.desired is 0")
    elif replicas.ready == 0:
        ready = _condition("Ready", "False", Reason.REPLICAS_UNAVAILABLE, counts)
    elif gateway.ready == 0:
        ready = _condition("Ready", "False", Reason.GATEWAY_UNAVAILABLE, counts)
    else:
        ready = _condition("Ready", "True", Reason.AVAILABLE, counts)
    rolling = not (replicas.complete and gateway.complete)
    progressing = _condition(
        "Progressing",
        "True" if rolling else "False",
        Reason.ROLLING_OUT if rolling else Reason.STABLE,
        counts,
    )
    if o.apply_error:
        degraded = _condition("Degraded", "True", Reason.APPLY_FAILED, o.apply_error)
    elif replicas.stuck:
        degraded = _condition(
            "Degraded", "True", Reason.REPLICAS_UNAVAILABLE, "replica rollout stuck: " + counts
        )
    elif gateway.stuck:
        degraded = _condition(
            "Degraded", "True", Reason.GATEWAY_UNAVAILABLE, "gateway rollout stuck: " + counts
        )
    else:
        degraded = _condition("Degraded", "False", Reason.STABLE, counts)
    conditions = [ready, progressing, degraded, _slo_condition(o.slo)]
    if degraded["status"] == "True":
        phase = "Degraded"
    elif rolling:
        phase = "Progressing"
    elif ready["status"] == "True":
        phase = "Ready"
    else:
        phase = "Pending"
    return conditions, phase, replicas


def merge_conditions(
    old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """New conditions, keeping each one's lastTransitionTime while its status is unchanged."""
    previous = {c.get("type"): c for c in old}
    merged = []
    for condition in new:
        before = previous.get(condition["type"])
        same = before is not None and before.get("status") == condition["status"]
        since = before.get("lastTransitionTime") if same and before else None
        merged.append({**condition, "lastTransitionTime": since or now})
    return merged


def compute(o: Observed, old_status: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The whole status subresource body (fields the operator does not own are kept)."""
    status: dict[str, Any] = {
        "observedGeneration": o.generation,
        "selector": o.selector,
        "classNames": ",".join(o.class_names),
    }
    if o.problem is not None:
        conditions, phase = _refused(o, o.problem)
        status |= {"replicas": 0, "readyReplicas": 0, "attainment": "unknown", "classes": []}
    else:
        conditions, phase, rollout = _serving(o)
        gateway_status = (o.gateway_deployment or {}).get("status") or {}
        status |= {
            "replicas": rollout.replicas,
            "readyReplicas": rollout.ready,
            "gatewayReadyReplicas": int(gateway_status.get("readyReplicas", 0)),
            "attainment": _attainment_column(o.slo),
            "classes": []
            if o.slo is None or isinstance(o.slo, Unreachable)
            else [c.to_status() for c in o.slo],
        }
    for condition in conditions:
        condition["observedGeneration"] = o.generation
    status["conditions"] = merge_conditions(old_status.get("conditions") or [], conditions, now)
    status["phase"] = phase
    return status

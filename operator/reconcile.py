"""One reconcile of one SLOService: check, build, observe, autoscale, report.

Idempotent: run it on every create, update, child event and resync tick. A refused spec
writes status only and builds nothing. An API failure while applying is reported in status
and raised as RetryLater, so kopf tries again; the resync loop would too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sloserve.kubeclient import ApiError
from sloserve.operator import autoscale, children, status
from sloserve.operator.applier import ForeignObjectError, Outcome, apply
from sloserve.operator.attainment import Unreachable, WindowView
from sloserve.operator.naming import MAX_NAME_LENGTH, Owner
from sloserve.operator.reasons import Reason
from sloserve.operator.resources import SLOSERVICES
from sloserve.operator.runtime import Runtime
from sloserve.operator.semantics import Checked, Problem, check
from sloserve.operator.spec import SpecError, parse_spec

log = logging.getLogger("sloserve.operator")


class RetryLater(Exception):
    """A transient failure (API error, conflict): the reconcile should run again soon."""


def _path(owner: Owner, sub: str = "") -> str:
    return SLOSERVICES.path(owner.namespace, owner.name, sub)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _epoch(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def plain(value: Any) -> Any:
    """A deep copy in plain dicts and lists (kopf hands out read-only mapping views)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def checked_spec(owner: Owner, spec: Any) -> Checked | Problem:
    if len(owner.name) > MAX_NAME_LENGTH:
        return Problem(
            Reason.INVALID_SPEC,
            f"metadata.name is {len(owner.name)} characters; at most {MAX_NAME_LENGTH} keep "
            "the children's names valid",
        )
    try:
        parsed = parse_spec(spec)
    except SpecError as error:
        return Problem(Reason.INVALID_SPEC, str(error))
    return check(parsed)


async def write_scale(rt: Runtime, owner: Owner, replicas: int, resource_version: str) -> int:
    """Sets spec.replicas.desired through /scale, the field `kubectl scale` and HPAs write.

    The resourceVersion makes it conditional: if someone scaled since we read the object,
    the write fails with a conflict instead of undoing their change.
    """
    patch = {"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}}
    try:
        scale = await rt.api.merge_patch(_path(owner, "scale"), patch)
    except ApiError as error:
        if error.status == 409:
            raise RetryLater(f"/scale changed meanwhile: {error.message}") from error
        raise
    return int(scale.get("spec", {}).get("replicas", replicas))


@dataclass
class _Applied:
    objects: dict[str, dict[str, Any]]
    error: str | None = None
    retry: bool = False


async def _apply_all(rt: Runtime, owner: Owner, manifests: Sequence[Mapping[str, Any]]) -> _Applied:
    applied = _Applied({})
    for manifest in manifests:
        key = f"{manifest['kind']}/{manifest['metadata']['name']}"
        try:
            outcome, obj = await apply(rt.api, manifest, owner.uid)
        except ForeignObjectError as error:
            applied.error = str(error)
            continue
        except ApiError as error:
            applied.error = f"{key}: {error}"
            applied.retry = applied.retry or error.retryable
            continue
        if outcome is not Outcome.UNCHANGED:
            log.info("%s/%s: %s %s", owner.namespace, owner.name, outcome, key)
        applied.objects[key] = obj
    return applied


def _class_results(checked: Checked, view: WindowView | None) -> list[status.ClassResult]:
    results = []
    for c in checked.classes:
        window = view.window.get(c.spec.name) if view else None
        lifetime = view.lifetime.get(c.spec.name) if view else None
        results.append(
            status.ClassResult(
                name=c.spec.name,
                target=c.spec.attainment_target,
                window_arrived=window.arrived if window else 0,
                window_attainment=window.attainment if window else None,
                lifetime_attainment=lifetime.attainment if lifetime else None,
            )
        )
    return results


async def reconcile(rt: Runtime, body: Mapping[str, Any]) -> None:
    """Brings one SLOService's children and status up to date (serialised per object)."""
    owner = Owner.of(body)
    async with rt.lock(owner.uid):
        await _reconcile(rt, plain(body), owner)


async def _reconcile(rt: Runtime, body: dict[str, Any], owner: Owner) -> None:
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        rt.forget(owner.uid)  # the garbage collector removes the children
        return
    generation = int(meta.get("generation", 0))
    old_status = body.get("status") or {}
    now = rt.config.clock()
    outcome = checked_spec(owner, body.get("spec"))
    class_names = [str(c.get("name")) for c in (body.get("spec") or {}).get("classes") or []]
    selector = owner.selector_string("replica")
    if isinstance(outcome, Problem):
        observed = status.Observed(generation, class_names, selector, 0, problem=outcome)
        await _write_status(rt, owner, status.compute(observed, old_status, _iso(now)), old_status)
        return
    spec = outcome.spec
    desired = spec.replicas.desired
    if desired is None:
        desired = await write_scale(rt, owner, spec.replicas.initial, meta["resourceVersion"])
    replicas = min(max(desired, spec.replicas.min), spec.replicas.max)
    image = spec.engine.image or rt.config.default_image
    manifests = children.build(owner, outcome, image, replicas, rt.pdb_api_version)
    applied = await _apply_all(rt, owner, manifests)
    replica_deployment = applied.objects.get(f"Deployment/{owner.replica_deployment}")
    gateway_deployment = applied.objects.get(f"Deployment/{owner.gateway}")

    read = await rt.reader.read(owner.namespace, owner.gateway, spec.gateway.http_port)
    window = rt.window(owner.uid)
    if not isinstance(read, Unreachable):
        window.observe(now, read)
    last_scale = _epoch(old_status.get("lastScaleTime"))
    view = (
        None
        if isinstance(read, Unreachable)
        else window.view(now, spec.autoscaling.window_seconds, since=last_scale)
    )
    results = _class_results(outcome, view)
    scale_fields = {
        k: old_status[k] for k in ("lastScaleTime", "lastScaleReason") if k in old_status
    }
    if spec.autoscaling.enabled and view is not None and applied.error is None:
        ready = int(((replica_deployment or {}).get("status") or {}).get("readyReplicas", 0))
        decision = autoscale.decide(
            autoscale.ScaleInput(
                current=desired,
                ready=ready,
                minimum=spec.replicas.min,
                maximum=spec.replicas.max,
                classes=[
                    autoscale.ClassSignal(r.name, r.target, r.window_arrived, r.window_attainment)
                    for r in results
                ],
                in_flight=view.in_flight,
                queued=view.queued,
                target_in_flight_per_replica=spec.autoscaling.target_in_flight_per_replica,
                hysteresis=spec.autoscaling.hysteresis,
                window_s=spec.autoscaling.window_seconds,
                since_last_change_s=None if last_scale is None else now - last_scale,
            )
        )
        if decision.changes(desired):
            fresh = await rt.api.get(_path(owner))
            if fresh is not None:
                version = fresh["metadata"]["resourceVersion"]
                await write_scale(rt, owner, decision.replicas, version)
                log.info(
                    "%s/%s: scaled %d -> %d: %s",
                    *(owner.namespace, owner.name, desired, decision.replicas, decision.reason),
                )
                scale_fields = {"lastScaleTime": _iso(now), "lastScaleReason": decision.reason}
    slo: Sequence[status.ClassResult] | Unreachable = (
        read if isinstance(read, Unreachable) else results
    )
    observed = status.Observed(
        generation,
        class_names,
        selector,
        replicas,
        apply_error=applied.error,
        replica_deployment=replica_deployment,
        gateway_deployment=gateway_deployment,
        slo=slo,
    )
    new_status = status.compute(observed, old_status, _iso(now)) | scale_fields
    await _write_status(rt, owner, new_status, old_status)
    if applied.retry:
        raise RetryLater(applied.error)


async def _write_status(
    rt: Runtime, owner: Owner, new: dict[str, Any], old: Mapping[str, Any]
) -> None:
    if new == dict(old):
        return  # an unchanged status is not written: no churn, no watch events
    # A merge patch: the lists (conditions, classes) are replaced whole.
    await rt.api.merge_patch(_path(owner, "status"), {"status": new})

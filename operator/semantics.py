"""What the schema cannot check: cross-field rules and SLOs no replica could ever meet.

`check` runs before any child is written; a spec it refuses builds nothing. It resolves each
class's TTFT to milliseconds (a `ttftZeroLoadMultiple` becomes a multiple of the zero-load
TTFT of the longest allowed prompt) and hands back the step-time profile for the ConfigMap.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sloserve.bench.presets import SloReference
from sloserve.operator.reasons import Reason
from sloserve.operator.spec import ClassSpec, SloServiceSpec
from sloserve.stepmodel import StepTimeModel, shipped_profile

# A shipped profile's file stem; anything else (a path) is refused before touching files.
_PROFILE_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")


@dataclass(frozen=True)
class Problem:
    reason: Reason
    message: str


@dataclass(frozen=True)
class ResolvedClass:
    """A class in sloserve's classes-file terms (milliseconds), plus the operator's fields."""

    spec: ClassSpec
    ttft_ms: float

    def to_classes_entry(self) -> dict[str, Any]:
        """One entry of the classes YAML (sloserve.slo.SloCatalog.from_mapping)."""
        entry: dict[str, Any] = {"name": self.spec.name, "ttft_ms": round(self.ttft_ms, 3)}
        if self.spec.description:
            entry["description"] = self.spec.description
        entry["tpot_ms"] = self.spec.tpot_ms
        if self.spec.thinking_tpot_ms is not None:
            entry["thinking_tpot_ms"] = self.spec.thinking_tpot_ms
        # Replicas and gateway act on it (sloserve.slo.SloClass.best_effort).
        entry["spill_to_best_effort"] = self.spec.spill_to_best_effort
        # Read by the operator and recorded for people; replicas and gateway ignore them.
        entry["attainment_target"] = self.spec.attainment_target
        entry["priority"] = self.spec.priority
        return entry


@dataclass(frozen=True)
class Checked:
    """A spec that passed: classes resolved, the profile loaded."""

    spec: SloServiceSpec
    classes: tuple[ResolvedClass, ...]
    profile: StepTimeModel

    def profile_json(self) -> str:
        return json.dumps(self.profile.to_json(), indent=2, sort_keys=True) + "\n"


def _structure(spec: SloServiceSpec) -> Problem | None:
    r = spec.replicas
    if r.min > r.max:
        return Problem(Reason.INVALID_SPEC, f"replicas.min ({r.min}) > replicas.max ({r.max})")
    if not r.min <= r.initial <= r.max:
        return Problem(
            Reason.INVALID_SPEC,
            f"replicas.initial ({r.initial}) must lie within min ({r.min}) and max ({r.max})",
        )
    names = [c.name for c in spec.classes]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        return Problem(Reason.INVALID_SPEC, f"classes: duplicate names {duplicates}")
    if spec.default_class not in names:
        return Problem(
            Reason.INVALID_SPEC, f"defaultClass {spec.default_class!r} is not one of {names}"
        )
    for i, c in enumerate(spec.classes):
        if (c.ttft_ms is None) == (c.ttft_zero_load_multiple is None):
            return Problem(
                Reason.INVALID_SPEC,
                f"classes[{i}] ({c.name}): give exactly one of ttftMs and ttftZeroLoadMultiple",
            )
    e = spec.engine
    if e.tensor_parallel_size > 1:
        # `sloserve replica` has no tensor-parallel flag yet: refuse rather than crash-loop.
        return Problem(
            Reason.INVALID_SPEC,
            "engine.tensorParallelSize > 1 is not supported by `sloserve replica` yet",
        )
    if e.gpus_per_replica and e.gpus_per_replica % e.tensor_parallel_size:
        return Problem(
            Reason.INVALID_SPEC,
            f"engine.tensorParallelSize ({e.tensor_parallel_size}) must divide "
            f"gpusPerReplica ({e.gpus_per_replica})",
        )
    return None


def _resolve(
    index: int, c: ClassSpec, reference: SloReference, max_len: int
) -> ResolvedClass | Problem:
    zero_load_s = reference.prefill_s(max_len) + reference.request_overhead_s
    if c.ttft_zero_load_multiple is not None:
        ttft_ms = c.ttft_zero_load_multiple * zero_load_s * 1000
    else:
        assert c.ttft_ms is not None
        ttft_ms = c.ttft_ms
        if ttft_ms < zero_load_s * 1000:
            return Problem(
                Reason.TTFT_BELOW_ZERO_LOAD,
                f"classes[{index}] ({c.name}): ttftMs {ttft_ms:g} is below the zero-load TTFT "
                f"of a {max_len}-token prompt ({zero_load_s * 1000:.1f} ms on the profile)",
            )
    idle_ms = reference.idle_decode_s * 1000
    for field, tpot in (("tpotMs", c.tpot_ms), ("thinkingTpotMs", c.thinking_tpot_ms)):
        if tpot is not None and tpot < idle_ms:
            return Problem(
                Reason.TPOT_BELOW_IDLE_DECODE,
                f"classes[{index}] ({c.name}): {field} {tpot:g} is below one idle decode "
                f"step ({idle_ms:.2f} ms on the profile)",
            )
    return ResolvedClass(c, ttft_ms)


def check(spec: SloServiceSpec) -> Checked | Problem:
    """The resolved spec, or the first problem found."""
    problem = _structure(spec)
    if problem:
        return problem
    if not _PROFILE_NAME.fullmatch(spec.model.profile):
        return Problem(Reason.UNKNOWN_PROFILE, f"model.profile {spec.model.profile!r}: bad name")
    try:
        profile = shipped_profile(spec.model.profile)
    except FileNotFoundError as missing:
        return Problem(Reason.UNKNOWN_PROFILE, f"model.profile: {missing}")
    reference = SloReference(profile)
    resolved: list[ResolvedClass] = []
    for i, c in enumerate(spec.classes):
        outcome = _resolve(i, c, reference, spec.model.max_model_len)
        if isinstance(outcome, Problem):
            return outcome
        resolved.append(outcome)
    return Checked(spec, tuple(resolved), profile)

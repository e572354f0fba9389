"""An SLOService's status from observations: conditions, reasons, phase, printer fields."""

from __future__ import annotations

from typing import Any

from sloserve.operator.attainment import Unreachable
from sloserve.operator.reasons import Reason
from sloserve.operator.semantics import Problem
from sloserve.operator.status import ClassResult, Observed, compute

T0, T1 = "2026-11-24T10:00:00Z", "2026-11-24T10:05:00Z"


def _deployment(want: int, ready: int, generation: int = 2, observed: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": want},
        "status": {
            "observedGeneration": observed,
            "replicas": want,
            "updatedReplicas": ready,
            "readyReplicas": ready,
        },
    }


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


CLASSES = [
    ClassResult("chat", 0.95, 120, 0.97, 0.96),
    ClassResult("coding", 0.99, 80, 0.975, 0.98),
]


def _observed(**overrides: Any) -> Observed:
    base: dict[str, Any] = {
        "generation": 4,
        "class_names": ["chat", "coding"],
        "selector": "sel=1",
        "desired_replicas": 2,
        "replica_deployment": _deployment(2, 2),
        "gateway_deployment": _deployment(1, 1),
        "slo": CLASSES,
    }
    return Observed(**(base | overrides))


def test_serving_and_missing_a_target() -> None:
    status = compute(_observed(), {}, T0)
    assert _conditions(status) == {
        "Ready": ("True", Reason.AVAILABLE),
        "Progressing": ("False", Reason.STABLE),
        "Degraded": ("False", Reason.STABLE),
        "SLOMet": ("False", Reason.TARGETS_MISSED),
    }
    assert status["phase"] == "Ready"
    assert status["attainment"] == "coding 97.5%"
    assert status["classNames"] == "chat,coding"
    assert (status["replicas"], status["readyReplicas"], status["selector"]) == (2, 2, "sel=1")
    assert all(c["observedGeneration"] == 4 for c in status["conditions"])
    slo = next(c for c in status["conditions"] if c["type"] == "SLOMet")
    assert slo["message"] == "coding 97.5% < 99.0%"


def test_rollout_in_progress() -> None:
    status = compute(_observed(replica_deployment=_deployment(2, 0, observed=1)), {}, T0)
    conditions = _conditions(status)
    assert conditions["Ready"] == ("False", Reason.REPLICAS_UNAVAILABLE)
    assert conditions["Progressing"] == ("True", Reason.ROLLING_OUT)
    assert status["phase"] == "Progressing"


def test_unreachable_gateway_is_said_so() -> None:
    status = compute(_observed(slo=Unreachable("no ready gateway pod")), {}, T0)
    slo = next(c for c in status["conditions"] if c["type"] == "SLOMet")
    assert (slo["status"], slo["reason"]) == ("Unknown", Reason.GATEWAY_UNREACHABLE)
    assert slo["message"] == "no ready gateway pod"
    assert status["attainment"] == "unknown"


def test_refused_spec_builds_nothing_and_says_why() -> None:
    problem = Problem(Reason.TTFT_BELOW_ZERO_LOAD, "classes[0] (chat): ttftMs 5 is below")
    status = compute(_observed(problem=problem, replica_deployment=None), {}, T0)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "TTFTBelowZeroLoad")
    assert degraded["message"] == problem.message
    assert status["phase"] == "Invalid"


def test_apply_failure_degrades() -> None:
    status = compute(_observed(apply_error="ConfigMap x exists and is not controlled"), {}, T0)
    assert _conditions(status)["Degraded"] == ("True", Reason.APPLY_FAILED)
    assert status["phase"] == "Degraded"


def test_transition_time_moves_only_with_status() -> None:
    first = compute(_observed(), {}, T0)
    again = compute(_observed(), first, T1)
    assert all(c["lastTransitionTime"] == T0 for c in again["conditions"])
    met = [ClassResult("chat", 0.95, 120, 0.99, 0.99), ClassResult("coding", 0.99, 80, 1.0, 1.0)]
    changed = compute(_observed(slo=met), first, T1)
    times = {c["type"]: c["lastTransitionTime"] for c in changed["conditions"]}
    assert times == {"Ready": T0, "Progressing": T0, "Degraded": T0, "SLOMet": T1}

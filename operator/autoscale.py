"""How many replicas an SLOService should run: a pure function of what was measured.

Scale up, one replica at a time or straight to what the load needs, when a class with enough
requests in the window misses its attainment target, when work is spilling into the
best-effort queue, or when requests in flight exceed what the replicas are sized for. Scale
down by one only when every class beats its target by the hysteresis margin, nothing is
queued, one replica fewer would still carry the load with the same margin, and the last change
is at least a window old. No scale-up while replicas are still starting: a new one takes
minutes to load its model, and adding one per tick meanwhile would overshoot. Without
measurements (no gateway, no traffic) nothing changes: the autoscaler never acts on missing
data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# A class's windowed attainment counts only over at least this many requests: one miss out of
# three requests is noise, not a trend.
MIN_REQUESTS = 20


@dataclass(frozen=True)
class ClassSignal:
    name: str
    target: float
    arrived: int
    attainment: float | None  # None without requests in the window


@dataclass(frozen=True)
class ScaleInput:
    current: int
    ready: int  # replica pods ready now
    minimum: int
    maximum: int
    classes: Sequence[ClassSignal]
    in_flight: int  # requests the gateways have in flight now
    queued: int  # requests waiting in the best-effort queues now
    target_in_flight_per_replica: int
    hysteresis: float
    window_s: float
    since_last_change_s: float | None  # None: never changed


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str

    def changes(self, current: int) -> bool:
        return self.replicas != current


def _load_needs(x: ScaleInput, margin: float) -> int:
    """Replicas the requests in flight need, each replica filled to (1 - margin) of its size."""
    per_replica = x.target_in_flight_per_replica * (1 - margin)
    return math.ceil(x.in_flight / per_replica) if x.in_flight else 0


def decide(x: ScaleInput) -> Decision:
    bounded = min(max(x.current, x.minimum), x.maximum)
    if bounded != x.current:
        return Decision(bounded, f"{x.current} is outside [{x.minimum}, {x.maximum}]")
    measured = [c for c in x.classes if c.attainment is not None and c.arrived >= MIN_REQUESTS]
    missing = [c for c in measured if c.attainment is not None and c.attainment < c.target]
    by_load = _load_needs(x, 0.0)
    wants_more = []
    if missing:
        worst = min(missing, key=lambda c: c.attainment or 0.0)
        wants_more.append(
            f"class {worst.name} attained {worst.attainment:.1%} < target {worst.target:.1%}"
        )
    if x.queued:
        wants_more.append(f"{x.queued} requests in the best-effort queue")
    if by_load > x.current:
        wants_more.append(f"{x.in_flight} requests in flight need {by_load} replicas")
    if wants_more:
        if x.ready < x.current:
            # A new replica takes minutes to load its model: judge again once it serves,
            # instead of adding one per tick meanwhile.
            return Decision(x.current, f"waiting for {x.current - x.ready} replicas to be ready")
        if x.current >= x.maximum:
            return Decision(x.current, "at max: " + "; ".join(wants_more))
        return Decision(min(x.maximum, max(x.current + 1, by_load)), "; ".join(wants_more))

    if x.current <= x.minimum:
        return Decision(x.current, "at min")
    if not measured:
        return Decision(x.current, "no class has enough requests in the window to judge")
    if x.since_last_change_s is not None and x.since_last_change_s < x.window_s:
        return Decision(x.current, "the last change is less than a window old")
    comfortable = all(
        c.attainment is not None and c.attainment >= min(1.0, c.target + x.hysteresis)
        for c in measured
    )
    if not comfortable:
        return Decision(x.current, "attainment within the hysteresis margin of its target")
    if _load_needs(x, x.hysteresis) > x.current - 1:
        return Decision(x.current, "one replica fewer could not carry the load")
    return Decision(x.current - 1, "every class beats its target with margin; load is low")

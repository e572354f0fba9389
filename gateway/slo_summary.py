"""Per-class SLO tallies as the gateway measures them, for GET /v1/slo/summary.

Attainment follows the methodology (docs/slo.md §2): good / arrived, where a rejected,
spilled or best-effort request counts as arrived and not good. Requests the client itself
cancelled, invalid ones, and those refused by API-key checks (no or unknown key, a class the
tenant may not use, over the tenant's rate limit) are left out of `arrived`: none says
anything about the system's capacity.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Recent TTFTs kept per class for the quantiles: enough for p99, bounded in memory.
_SAMPLES = 2048

# Outcome labels (also the `outcome` label of sloserve_gateway_requests).
ATTAINED = "attained"
MISSED = "missed"
BEST_EFFORT = "best_effort"
NOT_COUNTED = frozenset({"invalid", "cancelled", "unauthenticated", "denied", "rate_limited"})

# The JSON key of requests with explicit budgets (class name "").
BUDGETS_KEY = "(budgets)"


@dataclass
class ClassTally:
    arrived: int = 0
    attained: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    spilled: int = 0
    ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    best_effort_ttft_s: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))

    def to_json(self) -> dict[str, Any]:
        return {
            "arrived": self.arrived,
            "attained": self.attained,
            "attainment": self.attained / self.arrived if self.arrived else None,
            "outcomes": dict(sorted(self.outcomes.items())),
            "spilled": self.spilled,
            "ttft_s": _quantiles(self.ttft_s),
            "best_effort": {
                "completed": self.outcomes.get(BEST_EFFORT, 0),
                "mean_ttft_s": float(np.mean(self.best_effort_ttft_s))
                if self.best_effort_ttft_s
                else None,
            },
        }


def _quantiles(samples: deque[float]) -> dict[str, float] | None:
    if not samples:
        return None
    values = np.asarray(samples)
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


class SloSummary:
    def __init__(self) -> None:
        self.classes: dict[str, ClassTally] = {}

    def record(
        self, class_name: str, outcome: str, ttft_s: float | None, spilled: bool
    ) -> float | None:
        """Counts one finished request; returns the class's attainment so far."""
        tally = self.classes.setdefault(class_name, ClassTally())
        tally.outcomes[outcome] = tally.outcomes.get(outcome, 0) + 1
        if outcome in NOT_COUNTED:
            return tally.attained / tally.arrived if tally.arrived else None
        tally.arrived += 1
        tally.spilled += spilled
        if outcome == ATTAINED:
            tally.attained += 1
        if ttft_s is not None:
            (tally.best_effort_ttft_s if outcome == BEST_EFFORT else tally.ttft_s).append(ttft_s)
        return tally.attained / tally.arrived

    def to_json(self) -> dict[str, Any]:
        # Class "" gathers requests with explicit budgets.
        return {name or BUDGETS_KEY: t.to_json() for name, t in sorted(self.classes.items())}

"""The all-scenarios table: one `bench compare` summary per scenario, in one table.

Each row is one scenario's capacities and sloserve's ratios to stock vLLM's defaults and to
the best tuned vLLM variant of that run; the last line gives the ratios' geometric means.
Every figure is read from the summaries (`summary.json`), so the table is the runs' own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SLOSERVE = "sloserve"
BASELINE = "vllm-default"


class TableError(ValueError):
    """A results folder that is not a `bench compare` run with sloserve and stock vLLM."""


@dataclass(frozen=True)
class ScenarioRow:
    scenario: str
    capacity: dict[str, float]  # by system, req/s
    # Systems whose search found no failing rate: their capacity is only a lower bound.
    lower_bounds: frozenset[str]
    best_tuned: str | None
    requests_per_load_point: int
    # Systems that failed every rate down to the search's floor: their capacity is below this
    # rate (the summary says 0), so sloserve's ratio to them is at least ours / this rate.
    below: dict[str, float] = field(default_factory=dict)

    def ratio(self, other: str | None) -> float | None:
        theirs = self.capacity.get(other or "", 0.0)
        return self.capacity[SLOSERVE] / theirs if theirs > 0 else None

    def ratio_floor(self, other: str | None) -> float | None:
        """sloserve / `other` where `other` failed every rate it tried: a lower bound."""
        theirs = self.below.get(other or "")
        ours = self.capacity[SLOSERVE]
        return ours / theirs if theirs and ours > 0 and self.ratio(other) is None else None

    def ratio_or_floor(self, other: str | None) -> tuple[float | None, bool]:
        """The ratio, else its floor; the flag says which."""
        floor = self.ratio_floor(other)
        return (floor, True) if floor is not None else (self.ratio(other), False)


def load_row(folder: Path) -> ScenarioRow:
    path = folder / "summary.json"
    try:
        summary: dict[str, Any] = json.loads(path.read_text())
        systems: dict[str, Any] = summary["systems"]
        scenario = str(summary["scenario"])
    except (OSError, ValueError, KeyError) as error:
        raise TableError(f"{path}: not a `bench compare` summary ({error})") from None
    missing = {SLOSERVE, BASELINE} - systems.keys()
    if missing:
        raise TableError(f"{path}: the run has no {', '.join(sorted(missing))}")
    return ScenarioRow(
        scenario=scenario,
        capacity={name: float(s["capacity_rps"]) for name, s in systems.items()},
        lower_bounds=frozenset(
            name for name, s in systems.items() if s["search"].get("lowest_failing_rps") is None
        ),
        best_tuned=summary.get("best_tuned_vllm"),
        requests_per_load_point=int(summary.get("requests_per_load_point", 0)),
        below={
            name: float(s["search"]["lowest_failing_rps"])
            for name, s in systems.items()
            if s["search"].get("status") == "below_min_rate"
            and s["search"].get("lowest_failing_rps")
        },
    )


def geometric_mean(values: Sequence[float]) -> float | None:
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _capacity(row: ScenarioRow, system: str) -> str:
    if system not in row.capacity:
        return "-"
    if system in row.below:
        return f"<{row.below[system]:.3g}"
    mark = "≥" if system in row.lower_bounds else ""
    return f"{mark}{row.capacity[system]:.3g}"


def _ratio(value: float | None, floor: bool = False) -> str:
    return "-" if value is None else f"{'> ' if floor else ''}{value:.2f}x"


def markdown(rows: Sequence[ScenarioRow]) -> str:
    """The table, ≥ marking a capacity whose search found no failing rate, < one below every
    rate tried (and > the ratio to it, a floor; a mean over such a floor is one too)."""
    others = sorted({name for row in rows for name in row.capacity} - {SLOSERVE, BASELINE})
    systems = [BASELINE, *others, SLOSERVE]
    header = ["scenario", *systems, "sloserve / default", "sloserve / best tuned"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        tuned, tuned_floor = row.ratio_or_floor(row.best_tuned)
        best = "-" if tuned is None else f"{_ratio(tuned, tuned_floor)} ({row.best_tuned})"
        cells = [row.scenario, *(_capacity(row, s) for s in systems)]
        cells += [_ratio(*row.ratio_or_floor(BASELINE)), best]
        lines.append("| " + " | ".join(cells) + " |")
    (to_default, default_floor), (to_tuned, tuned_floor) = _means(rows)
    lines.append("")
    lines.append(
        f"Geometric mean over {len(rows)} scenarios: sloserve / {BASELINE} "
        f"{_ratio(to_default, default_floor)}, sloserve / best tuned "
        f"{_ratio(to_tuned, tuned_floor)}"
    )
    return "\n".join(lines) + "\n"


_Mean = tuple[float | None, bool]  # a geometric mean, and whether it is only a floor


def _mean(ratios: Sequence[tuple[float | None, bool]]) -> _Mean:
    # The mean grows with each ratio, so one taken over a floor is a floor of the true mean.
    known = [(value, floor) for value, floor in ratios if value is not None]
    return geometric_mean([v for v, _ in known]), any(floor for _, floor in known)


def _means(rows: Sequence[ScenarioRow]) -> tuple[_Mean, _Mean]:
    """Geometric means of sloserve / vllm-default and of sloserve / best tuned, over the rows
    that have the ratio or its floor."""
    to_default = _mean([row.ratio_or_floor(BASELINE) for row in rows])
    to_tuned = _mean([row.ratio_or_floor(row.best_tuned) for row in rows])
    return to_default, to_tuned


def to_json(rows: Sequence[ScenarioRow]) -> dict[str, Any]:
    (to_default, default_floor), (to_tuned, tuned_floor) = _means(rows)
    return {
        "scenarios": [
            {
                "scenario": row.scenario,
                "capacity_rps": row.capacity,
                "lower_bounds": sorted(row.lower_bounds),
                "best_tuned_vllm": row.best_tuned,
                "requests_per_load_point": row.requests_per_load_point,
                "sloserve/vllm-default": row.ratio(BASELINE),
                "sloserve/best_tuned": row.ratio(row.best_tuned),
                "below_rps": row.below,
                "sloserve/vllm-default_at_least": row.ratio_floor(BASELINE),
                "sloserve/best_tuned_at_least": row.ratio_floor(row.best_tuned),
            }
            for row in rows
        ],
        "geometric_mean": {
            "sloserve/vllm-default": to_default,
            "sloserve/best_tuned": to_tuned,
            # True where a ratio in the mean is a floor: the mean is then a floor too.
            "sloserve/vllm-default_is_floor": default_floor,
            "sloserve/best_tuned_is_floor": tuned_floor,
        },
    }

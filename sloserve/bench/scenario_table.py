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
    # rate (the summary says 0).
    below: dict[str, float] = field(default_factory=dict)
    # The summary's floors on sloserve's ratios where the baselines failed every rate they
    # tried (`bench compare` works them out: against the tuned variants, only when all failed).
    default_floor: float | None = None
    tuned_floor: float | None = None

    def ratio(self, other: str | None) -> float | None:
        theirs = self.capacity.get(other or "", 0.0)
        return self.capacity[SLOSERVE] / theirs if theirs > 0 else None

    def to_default(self) -> tuple[float | None, bool]:
        """sloserve / vllm-default, else its floor; the flag says which."""
        return _or_floor(self.ratio(BASELINE), self.default_floor)

    def to_tuned(self) -> tuple[float | None, bool]:
        """sloserve / the best tuned variant, else its floor; the flag says which."""
        return _or_floor(self.ratio(self.best_tuned), self.tuned_floor)


def _or_floor(ratio: float | None, floor: float | None) -> tuple[float | None, bool]:
    return (ratio, False) if ratio is not None or floor is None else (floor, True)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def load_row(folder: Path) -> ScenarioRow:
    path = folder / "summary.json"
    try:
        summary: dict[str, Any] = json.loads(path.read_text())
        systems: dict[str, Any] = summary["systems"]
        scenario = str(summary["scenario"])
        headline: dict[str, Any] = summary.get("headline") or {}
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
        default_floor=_optional_float(headline.get("sloserve_vs_vllm_default_at_least")),
        tuned_floor=_optional_float(headline.get("sloserve_vs_best_tuned_vllm_at_least")),
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
        tuned, tuned_floor = row.to_tuned()
        best = "-" if tuned is None else f"{_ratio(tuned, tuned_floor)} ({row.best_tuned})"
        cells = [row.scenario, *(_capacity(row, s) for s in systems)]
        cells += [_ratio(*row.to_default()), best]
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
    return _mean([row.to_default() for row in rows]), _mean([row.to_tuned() for row in rows])


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
                "sloserve/vllm-default_at_least": row.default_floor,
                "sloserve/best_tuned_at_least": row.tuned_floor,
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

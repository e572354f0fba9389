"""The fair comparison protocol: every system's capacity over several seeds, systems
alternated, ratios as point estimates with their spread (methodology §3, §5, §7).

`run_protocol` drives the searches: for each seed, every system's capacity search on that
seed's request stream, in an order that rotates from seed to seed, so no system always runs
first (or last) on a machine whose speed drifts. Each system's first search starts from the
rate given for it; its later ones from its capacity on the seed before, a rate it has passed.

A ratio is paired by seed (both systems saw the same requests): its point estimate is the
median over seeds, its spread the lowest and highest. A seed on which the baseline passed no
rate at all gives no ratio, only a floor (sloserve's capacity over the lowest rate the
baseline failed); an estimate with such a seed says so and is never quoted as a ratio.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sloserve.bench.capacity import CapacityResult

# A capacity search of one system on one seed's stream, starting at a rate.
Search = Callable[[str, int, float], CapacityResult]


@dataclass
class SystemCapacity:
    """One system's capacity on each seed."""

    system: str
    by_seed: dict[int, CapacityResult] = field(default_factory=dict)

    @property
    def capacities(self) -> list[float]:
        return [r.capacity for r in self.by_seed.values()]

    @property
    def median(self) -> float:
        return statistics.median(self.capacities) if self.by_seed else 0.0

    def to_json(self) -> dict[str, Any]:
        values = self.capacities
        return {
            "capacity_rps": self.median,
            "capacity_min_rps": min(values, default=0.0),
            "capacity_max_rps": max(values, default=0.0),
            "by_seed": {str(seed): r.to_json() for seed, r in self.by_seed.items()},
        }


@dataclass(frozen=True)
class RatioEstimate:
    """One system's capacity over another's, paired by seed."""

    numerator: str
    denominator: str
    by_seed: dict[int, float | None]  # None: the denominator passed no rate on that seed
    floors: dict[int, float]  # for those seeds: numerator / lowest rate the other failed

    @property
    def complete(self) -> bool:
        """Every seed gave a ratio: the estimate is a point estimate, not a floor."""
        return bool(self.by_seed) and all(v is not None for v in self.by_seed.values())

    @property
    def median(self) -> float | None:
        values = [v for v in self.by_seed.values() if v is not None]
        return statistics.median(values) if self.complete else None

    @property
    def spread(self) -> tuple[float, float] | None:
        values = [v for v in self.by_seed.values() if v is not None]
        return (min(values), max(values)) if self.complete else None

    def describe(self) -> str:
        """The estimate in words: '2.31x (2.10-2.52, 3 seeds)', or a floor."""
        if self.median is not None and self.spread is not None:
            low, high = self.spread
            return f"{self.median:.2f}x ({low:.2f}-{high:.2f}, {len(self.by_seed)} seeds)"
        if self.floors:
            return f"> {min(self.floors.values()):.2f}x (a floor: no rate passed on some seed)"
        return "n/a"

    def to_json(self) -> dict[str, Any]:
        spread = self.spread
        return {
            "ratio": self.median,
            "ratio_min": spread[0] if spread else None,
            "ratio_max": spread[1] if spread else None,
            "by_seed": {str(seed): v for seed, v in self.by_seed.items()},
            "floors_by_seed": {str(seed): v for seed, v in self.floors.items()},
            "point_estimate": self.complete,
        }


def ratio(numerator: SystemCapacity, denominator: SystemCapacity) -> RatioEstimate:
    """`numerator`'s capacity over `denominator`'s, on each seed both ran."""
    by_seed: dict[int, float | None] = {}
    floors: dict[int, float] = {}
    for seed, theirs in denominator.by_seed.items():
        ours = numerator.by_seed.get(seed)
        if ours is None:
            continue
        if theirs.capacity > 0:
            by_seed[seed] = ours.capacity / theirs.capacity
            continue
        by_seed[seed] = None
        if theirs.lowest_failing and ours.capacity > 0:
            floors[seed] = ours.capacity / theirs.lowest_failing
    return RatioEstimate(numerator.system, denominator.system, by_seed, floors)


def best_of(systems: Sequence[SystemCapacity]) -> SystemCapacity | None:
    """The system of highest median capacity (the best tuned variant, say)."""
    return max(systems, key=lambda s: s.median, default=None)


def rotation(systems: Sequence[str], index: int) -> list[str]:
    """The systems in the order they run on the `index`-th seed: rotated by one per seed."""
    if not systems:
        return []
    shift = index % len(systems)
    return [*systems[shift:], *systems[:shift]]


def run_protocol(
    systems: Sequence[str],
    seeds: Sequence[int],
    start_rates: dict[str, float],
    search: Search,
    on_result: Callable[[dict[str, SystemCapacity]], None] | None = None,
) -> dict[str, SystemCapacity]:
    """Every system's capacity on every seed (see the module docstring). `on_result` is
    called after each search with everything so far, so a run cut short keeps its results."""
    results = {name: SystemCapacity(name) for name in systems}
    for index, seed in enumerate(seeds):
        for name in rotation(systems, index):
            done = results[name].by_seed
            start = start_rates[name]
            if done:  # from where the last seed's search ended, a rate it passed
                last = list(done.values())[-1]
                start = last.capacity if last.capacity > 0 else start
            done[seed] = search(name, seed, start)
            if on_result is not None:
                on_result(results)
    return results

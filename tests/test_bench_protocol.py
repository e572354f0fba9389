"""The fair comparison protocol (sloserve/bench/protocol.py): seeds, rotation, paired ratios."""

from __future__ import annotations

import pytest
from bench_helpers import fake_stats

from sloserve.bench.analysis import RunStats
from sloserve.bench.capacity import CapacityResult, find_capacity
from sloserve.bench.protocol import (
    Search,
    SystemCapacity,
    best_of,
    ratio,
    rotation,
    run_protocol,
)


def _search_for(
    capacities: dict[tuple[str, int], float], calls: list[tuple[str, int, float]]
) -> Search:
    def search(system: str, seed: int, start: float) -> CapacityResult:
        calls.append((system, seed, start))
        true = capacities[(system, seed)]

        def run_at(rate: float) -> RunStats:
            good = 0.95 if rate <= true else 0.5
            return fake_stats({"chat": good})

        return find_capacity(run_at, low=start, resolution=0.025, max_trials=30)

    return search


def test_every_system_runs_every_seed_in_a_rotating_order_from_a_rate_it_passed() -> None:
    capacities = {("a", 0): 4.0, ("a", 1): 5.0, ("b", 0): 2.0, ("b", 1): 2.2}
    calls: list[tuple[str, int, float]] = []
    results = run_protocol(["a", "b"], [0, 1], {"a": 1.0, "b": 1.0}, _search_for(capacities, calls))
    assert [(s, seed) for s, seed, _ in calls] == [("a", 0), ("b", 0), ("b", 1), ("a", 1)]
    # The second seed starts at the first seed's capacity, a rate the system passed.
    assert calls[2][2] == pytest.approx(results["b"].by_seed[0].capacity)
    assert results["a"].by_seed[1].capacity == pytest.approx(5.0, rel=0.03)


def test_a_ratio_is_paired_by_seed_with_its_median_and_spread() -> None:
    capacities = {("a", s): c for s, c in enumerate((4.0, 5.0, 6.0))}
    capacities |= {("b", s): c for s, c in enumerate((2.0, 2.0, 2.0))}
    results = run_protocol(["a", "b"], [0, 1, 2], {"a": 1.0, "b": 1.0}, _search_for(capacities, []))
    estimate = ratio(results["a"], results["b"])
    assert estimate.complete
    assert estimate.median == pytest.approx(2.5, rel=0.05)
    low, high = estimate.spread or (0.0, 0.0)
    assert low == pytest.approx(2.0, rel=0.05) and high == pytest.approx(3.0, rel=0.05)
    assert "3 seeds" in estimate.describe()
    assert best_of(list(results.values())) is results["a"]


def test_a_baseline_that_passed_nothing_on_a_seed_gives_a_floor_not_a_ratio() -> None:
    capacities = {("a", 0): 4.0, ("a", 1): 4.0, ("b", 0): 2.0, ("b", 1): 0.001}
    results = run_protocol(["a", "b"], [0, 1], {"a": 1.0, "b": 1.0}, _search_for(capacities, []))
    estimate = ratio(results["a"], results["b"])
    assert not estimate.complete and estimate.median is None
    assert estimate.floors and "floor" in estimate.describe()
    assert estimate.to_json()["point_estimate"] is False


def test_rotation() -> None:
    assert rotation(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rotation(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert rotation(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert rotation([], 3) == []


def test_a_system_with_no_seeds_has_no_capacity() -> None:
    assert SystemCapacity("x").median == 0.0

"""Arrival processes: Poisson, Gamma renewal and the burst test (sloserve.bench.arrivals)."""

from __future__ import annotations

import numpy as np
import pytest
from bench_helpers import cv, gaps

from sloserve.bench.arrivals import Burst, burst_arrivals, gamma_arrivals, poisson_arrivals


def test_poisson_has_the_rate_and_exponential_gaps() -> None:
    offsets = poisson_arrivals(4.0, count=20_000, seed=1)
    assert len(offsets) == 20_000 and offsets[0] == 0.0
    assert offsets == sorted(offsets)
    assert 1 / np.mean(gaps(offsets)) == pytest.approx(4.0, rel=0.03)
    assert cv(gaps(offsets)) == pytest.approx(1.0, abs=0.05)


def test_poisson_is_seeded_and_rate_only_rescales() -> None:
    base = poisson_arrivals(1.0, count=500, seed=3)
    assert poisson_arrivals(1.0, count=500, seed=3) == base
    assert poisson_arrivals(1.0, count=500, seed=4) != base
    assert poisson_arrivals(5.0, count=500, seed=3) == pytest.approx([t / 5 for t in base])


def test_arrivals_until_a_duration() -> None:
    offsets = poisson_arrivals(10.0, duration_s=300.0, seed=2)
    assert max(offsets) < 300.0
    assert len(offsets) == pytest.approx(3000, rel=0.06)
    # The same unit stream at another rate: a duration run is a prefix of the rescaled one.
    slower = poisson_arrivals(5.0, duration_s=300.0, seed=2)
    assert slower == pytest.approx([2 * t for t in offsets[: len(slower)]])


def test_count_and_duration_are_exclusive() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        poisson_arrivals(1.0, seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        poisson_arrivals(1.0, count=3, duration_s=3.0)
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(0.0, count=3)


def test_gamma_keeps_the_mean_rate_and_is_bursty() -> None:
    offsets = gamma_arrivals(2.0, cv=3.0, count=50_000, seed=5)
    assert 1 / np.mean(gaps(offsets)) == pytest.approx(2.0, rel=0.08)
    assert cv(gaps(offsets)) == pytest.approx(3.0, rel=0.15)
    assert gamma_arrivals(2.0, cv=3.0, count=100, seed=5) == offsets[:100]


def test_burst_doubles_the_rate_in_a_centred_window() -> None:
    burst = Burst(factor=2.0, duration_s=60.0)
    offsets = burst_arrivals(20.0, count=12_000, seed=8, burst=burst)
    assert offsets == sorted(offsets)
    run = offsets[-1]
    # Steady run of 600 s at 20/s shortened by the 60 s window at double rate: ~540 s.
    assert run == pytest.approx(540, rel=0.05)
    start = (run - 60.0) / 2
    times = np.array(offsets)
    inside = np.sum((times >= start) & (times < start + 60.0)) / 60.0
    before = np.sum(times < start) / start
    after = np.sum(times >= start + 60.0) / (run - start - 60.0)
    assert inside == pytest.approx(40.0, rel=0.1)
    assert before == pytest.approx(20.0, rel=0.1) and after == pytest.approx(20.0, rel=0.1)


def test_burst_over_a_duration_and_window_placement() -> None:
    offsets = burst_arrivals(10.0, duration_s=200.0, seed=9, burst=Burst(3.0, 40.0))
    times = np.array(offsets)
    assert times.max() < 200.0
    assert np.sum((times >= 80) & (times < 120)) / 40 == pytest.approx(30.0, rel=0.15)
    # A fixed start is kept; a short run caps a centred window at half of it.
    assert Burst(start_s=10.0, duration_s=30.0).window_in_run(100.0) == (10.0, 30.0)
    assert Burst(duration_s=45.0).window_in_run(40.0) == (10.0, 20.0)


def test_burst_warp_is_monotone_and_identity_before_the_window() -> None:
    burst = Burst(factor=2.0, duration_s=10.0)
    base = [0.0, 5.0, 10.0, 14.0, 30.0, 50.0]
    warped = burst.warp(base, (10.0, 10.0))
    assert warped == [0.0, 5.0, 10.0, 12.0, 20.0, 40.0]

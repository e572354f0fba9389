"""Capacity search on synthetic systems whose capacity is known, and the fluid bound (§3, §6)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
from bench_helpers import fake_stats

from sloserve.bench.analysis import RunStats
from sloserve.bench.capacity import (
    CapacityResult,
    Trial,
    capacity_from_trials,
    find_capacity,
    fluid_bound,
)
from sloserve.stepmodel import StepTimeModel


def step_system(limit: float, strict_limit: float | None = None) -> Callable[[float], RunStats]:
    """Meets 90% iff rate <= limit, and 99% iff rate <= strict_limit."""
    strict = limit if strict_limit is None else strict_limit

    def run_at(rate: float) -> RunStats:
        chat = 1.0 if rate <= strict else 0.95 if rate <= limit else 0.5
        return fake_stats({"chat": chat, "coding": 1.0})

    return run_at


def check_invariants(result: CapacityResult, limit: float) -> None:
    """What every search must guarantee, whatever its path."""
    assert result.capacity <= limit
    passed = [t.rate for t in result.trials if t.passed]
    if result.capacity > 0:
        assert result.capacity in passed  # capacity is a rate that was run and passed
    for trial in result.trials:
        assert trial.passed == (trial.rate <= limit)


def test_bisection_converges_within_resolution() -> None:
    result = find_capacity(step_system(7.3), low=1.0)
    check_invariants(result, 7.3)
    assert [t.rate for t in result.trials[:4]] == [1.0, 2.0, 4.0, 8.0]  # doubling to a failure
    assert result.status == "converged" and result.converged
    assert result.lowest_failing is not None and result.lowest_failing > 7.3
    assert (result.lowest_failing - result.capacity) / result.capacity <= 0.025
    assert (7.3 - result.capacity) / result.capacity <= 0.025
    assert len(result.trials) <= 20


def test_finer_resolution_gets_closer() -> None:
    result = find_capacity(step_system(7.3), low=1.0, resolution=0.001, max_trials=40)
    check_invariants(result, 7.3)
    assert result.capacity == pytest.approx(7.3, rel=0.001)


def test_doubling_grows_until_a_failure() -> None:
    result = find_capacity(step_system(100.0), low=1.0)
    check_invariants(result, 100.0)
    assert [t.rate for t in result.trials[:8]] == [2.0**k for k in range(8)]  # 1 .. 128
    assert not result.trials[7].passed
    assert result.converged


def test_growth_factor_sets_the_steps_up() -> None:
    result = find_capacity(step_system(3.0), low=1.0, growth=1.5)
    check_invariants(result, 3.0)
    assert [t.rate for t in result.trials[:4]] == [1.0, 1.5, 2.25, 3.375]
    assert not result.trials[3].passed
    assert result.converged
    with pytest.raises(ValueError, match="growth"):
        find_capacity(step_system(3.0), low=1.0, growth=1.0)


def test_given_high_is_tried_instead_of_doubling() -> None:
    result = find_capacity(step_system(7.3), low=1.0, high=10.0)
    check_invariants(result, 7.3)
    assert [t.rate for t in result.trials[:3]] == [1.0, 10.0, 5.5]
    assert result.converged


def test_passing_high_is_only_a_lower_bound() -> None:
    result = find_capacity(step_system(50.0), low=1.0, high=10.0)
    assert result.capacity == 10.0 and result.status == "no_failure"
    assert result.lowest_failing is None and len(result.trials) == 2


def test_failing_low_shrinks_by_halving() -> None:
    result = find_capacity(step_system(0.3), low=1.0)
    check_invariants(result, 0.3)
    assert [t.rate for t in result.trials[:3]] == [1.0, 0.5, 0.25]
    assert result.converged and result.capacity == pytest.approx(0.3, rel=0.025)


def test_zero_capacity_when_even_the_minimum_rate_fails() -> None:
    result = find_capacity(step_system(0.0), low=1.0, min_rate=0.1)
    assert result.capacity == 0.0 and result.status == "below_min_rate"
    assert [t.rate for t in result.trials] == [1.0, 0.5, 0.25, 0.125]  # 0.0625 < min_rate
    assert not any(t.passed for t in result.trials)
    default = find_capacity(step_system(0.0), low=1.0)
    assert len(default.trials) == 7 and default.trials[-1].rate == 1 / 64  # default: low / 64


def test_out_of_trials_still_reports_a_passing_rate() -> None:
    result = find_capacity(step_system(7.3), low=1.0, max_trials=5)
    check_invariants(result, 7.3)
    assert len(result.trials) == 5 and result.status == "out_of_trials"
    growing = find_capacity(step_system(1000.0), low=1.0, max_trials=3)
    assert growing.capacity == 4.0 and growing.status == "no_failure"


def test_backlog_that_does_not_drain_fails_the_rate() -> None:
    def run_at(rate: float) -> RunStats:
        return fake_stats({"chat": 1.0}, drained=rate <= 5.0)

    result = find_capacity(run_at, low=1.0)
    check_invariants(result, 5.0)
    assert result.capacity == pytest.approx(5.0, rel=0.025)


def test_capacity_at_99_percent_from_the_same_trials() -> None:
    result = find_capacity(step_system(7.3, strict_limit=5.0), low=1.0)
    check_invariants(result, 7.3)
    strict_passing = [t.rate for t in result.trials if t.stats.meets(0.99)]
    assert result.capacity_99 == max(strict_passing)
    assert result.capacity_99 <= 5.0 < result.capacity
    assert result.capacity_at(0.9) == result.capacity


def test_capacity_from_trials_ignores_a_noisy_pass_above_a_failure() -> None:
    trials = [
        Trial(2.0, fake_stats({"chat": 1.0}), True),
        Trial(4.0, fake_stats({"chat": 0.5}), False),
        Trial(6.0, fake_stats({"chat": 1.0}), True),
    ]
    assert capacity_from_trials(trials, 0.9) == 2.0
    assert capacity_from_trials(trials[1:2], 0.9) == 0.0


def test_progress_and_json() -> None:
    messages: list[str] = []
    result = find_capacity(step_system(7.3), low=1.0, progress=messages.append)
    assert len(messages) == len(result.trials)
    assert "8 req/s FAIL" in messages[3] and "chat=50.0%" in messages[3]
    data = result.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["capacity_rps"] == result.capacity
    assert [t["rate_rps"] for t in data["trials"]] == [t.rate for t in result.trials]


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        find_capacity(step_system(1.0), low=0.0)
    with pytest.raises(ValueError):
        find_capacity(step_system(1.0), low=2.0, high=1.0)
    with pytest.raises(ValueError):
        find_capacity(step_system(1.0), low=1.0, max_trials=0)


# -- fluid bound ---------------------------------------------------------------------------

# One piece: 10 ms fixed, 0.1 ms per token, 1 ms per request, 1 us per context token.
LINEAR = StepTimeModel(pieces=[(0.01, 1e-4, 1e-3, 1e-6)])


def test_fluid_bound_by_hand() -> None:
    # tau = 50 ms, P = 100, O = 50, no context. Per step: 0.01 + lambda * 0.05 *
    # (1e-4 * 150 + 50 * 1e-3) = 0.01 + lambda * 0.00325 <= 0.05, so lambda <= 12.3077.
    bound = fluid_bound(LINEAR, 100, 50, 0.05, max_batch=64, mean_context_tokens=0)
    assert bound == pytest.approx(0.04 / 0.00325)
    # Running requests at that rate: 12.3 * 50 * 0.05 = 30.8, under the batch limit.


def test_fluid_bound_counts_context() -> None:
    # 1000 context tokens per request add 50 * 1e-6 * 1000 = 0.05 s per unit rate per tau.
    bound = fluid_bound(LINEAR, 100, 50, 0.05, max_batch=64, mean_context_tokens=1000)
    assert bound == pytest.approx(0.04 / (0.05 * (0.015 + 0.1)))


def test_fluid_bound_limited_by_batch() -> None:
    # 16 running requests, each 50 tokens x 50 ms in the batch: 16 / 2.5 s = 6.4 req/s.
    assert fluid_bound(LINEAR, 100, 50, 0.05, max_batch=16, mean_context_tokens=0) == 6.4


def test_fluid_bound_takes_the_tightest_piece() -> None:
    # A compute-bound piece at 0.6 ms per token: lambda <= 0.05 / (0.05 * 0.09) = 11.1.
    model = StepTimeModel(pieces=[(0.01, 1e-4, 1e-3, 0.0), (0.0, 6e-4, 0.0, 0.0)])
    bound = fluid_bound(model, 100, 50, 0.05, max_batch=64, mean_context_tokens=0)
    assert bound == pytest.approx(1 / 0.09)


def test_fluid_bound_is_zero_when_an_empty_step_overruns() -> None:
    model = StepTimeModel(pieces=[(0.06, 1e-4, 0.0, 0.0)])
    assert fluid_bound(model, 100, 50, 0.05, max_batch=64, mean_context_tokens=0) == 0.0


def test_fluid_bound_agrees_with_tokens_within() -> None:
    """Just under the bound, a step's work fits tokens_within; just over it does not."""
    prompt, output, tau, context = 400.0, 200.0, 0.05, 800.0
    bound = fluid_bound(LINEAR, prompt, output, tau, max_batch=4096, mean_context_tokens=context)
    for factor, fits in ((0.98, True), (1.02, False)):
        rate = bound * factor
        running = rate * output * tau
        # round the batch in the direction that makes the claim harder to hold
        requests = math.ceil(running) if fits else math.floor(running)
        room = LINEAR.tokens_within(tau, requests, round(requests * context))
        assert (rate * (prompt + output) * tau <= room) == fits


def test_fluid_bound_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        fluid_bound(LINEAR, 100, 50, 0.0, max_batch=64, mean_context_tokens=0)
    with pytest.raises(ValueError):
        fluid_bound(LINEAR, 100, 0, 0.05, max_batch=64, mean_context_tokens=0)

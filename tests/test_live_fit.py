"""The live line admission uses for decode-only steps (replica/live_fit.py)."""

from __future__ import annotations

import pytest

from sloserve.replica.live_fit import LiveLine
from sloserve.replica.planner import PlannerSettings
from sloserve.replica.policy import SloPolicy
from sloserve.stepmodel import StepTimeModel


def test_one_batch_size_teaches_only_the_offset() -> None:
    line = LiveLine()
    for _ in range(100):
        line.observe(0.006, 0.009)  # single-request steps: 3 ms of loop cost beyond the model
    assert line.slope == 1.0
    assert line(0.006) == pytest.approx(0.009)
    assert line(0.020) == pytest.approx(0.023)  # a larger batch: the same 3 ms, not 1.5x


def test_spread_batch_sizes_recover_the_line() -> None:
    line = LiveLine()
    for i in range(200):
        predicted = 0.005 + 0.0001 * (i % 50)
        line.observe(predicted, 0.003 + 0.8 * predicted)  # large batches faster than modelled
    assert line.slope == pytest.approx(0.8)
    assert line.intercept_s == pytest.approx(0.003)


def test_the_policy_learns_the_line_from_decode_only_steps() -> None:
    model = StepTimeModel(pieces=[(0.005, 0.0001, 0.0, 0.0)])
    policy = SloPolicy(model, PlannerSettings(max_step_tokens=2048, max_running=64), 10**6)
    for _ in range(100):
        policy.observe_step(0.006, 0.008, decode_only=True)
        policy.observe_step(0.050, 0.040, decode_only=False)  # prefill steps do not count
    assert policy.limits.decode_line(0.006) == pytest.approx(0.008)

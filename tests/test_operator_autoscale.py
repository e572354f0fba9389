"""The autoscaler's decision: attainment and load within [min, max], with hysteresis."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sloserve.operator.autoscale import MIN_REQUESTS, ClassSignal, ScaleInput, decide

STEADY = ScaleInput(
    current=3,
    ready=3,
    minimum=1,
    maximum=6,
    classes=[
        ClassSignal("chat", target=0.95, arrived=200, attainment=0.96),
        ClassSignal("coding", target=0.99, arrived=100, attainment=0.995),
    ],
    in_flight=12,  # 3 replicas sized for 8 each: 24
    queued=0,
    target_in_flight_per_replica=8,
    hysteresis=0.02,
    window_s=60,
    since_last_change_s=600,
)


def _with_attainment(x: ScaleInput, chat: float, coding: float) -> ScaleInput:
    chat_signal, coding_signal = x.classes
    return replace(
        x,
        classes=[replace(chat_signal, attainment=chat), replace(coding_signal, attainment=coding)],
    )


def test_holds_inside_the_hysteresis_band() -> None:
    decision = decide(STEADY)  # chat 96% is above 95% but not above 95% + 2%
    assert decision.replicas == 3
    assert "hysteresis" in decision.reason


def test_a_missed_target_adds_a_replica() -> None:
    decision = decide(_with_attainment(STEADY, chat=0.90, coding=0.995))
    assert decision.replicas == 4
    assert "class chat attained 90.0% < target 95.0%" in decision.reason


def test_load_scales_straight_to_what_it_needs() -> None:
    decision = decide(replace(STEADY, in_flight=45))  # 45 / 8 -> 6 replicas
    assert decision.replicas == 6


def test_spillover_adds_a_replica() -> None:
    assert decide(replace(STEADY, queued=5)).replicas == 4


def test_never_beyond_max_or_below_min() -> None:
    at_max = replace(_with_attainment(STEADY, 0.5, 0.5), current=6, ready=6)
    assert decide(at_max).replicas == 6
    assert decide(at_max).reason.startswith("at max")
    comfortable = replace(_with_attainment(STEADY, 1.0, 1.0), current=1, ready=1, in_flight=0)
    assert decide(comfortable).replicas == 1


def test_a_value_outside_the_bounds_is_clamped() -> None:
    assert decide(replace(STEADY, current=9, ready=9)).replicas == 6
    assert decide(replace(STEADY, current=0, ready=0)).replicas == 1


def test_no_scale_up_while_replicas_start() -> None:
    decision = decide(replace(_with_attainment(STEADY, 0.5, 0.5), ready=2))
    assert decision.replicas == 3
    assert "waiting for 1 replicas" in decision.reason


def test_scale_down_needs_margin_low_load_and_a_quiet_window() -> None:
    comfortable = replace(_with_attainment(STEADY, 0.99, 1.0), in_flight=4)
    assert decide(comfortable).replicas == 2
    assert decide(replace(comfortable, since_last_change_s=30)).replicas == 3
    # 15 in flight fit 2 replicas of 8 only above the (1 - hysteresis) fill: stay at 3.
    assert decide(replace(comfortable, in_flight=16)).replicas == 3


@pytest.mark.parametrize("arrived", [0, MIN_REQUESTS - 1])
def test_too_few_requests_decide_nothing(arrived: int) -> None:
    chat, coding = STEADY.classes
    sparse = replace(
        STEADY,
        classes=[replace(chat, arrived=arrived, attainment=0.0 if arrived else None),
                 replace(coding, arrived=arrived, attainment=0.0 if arrived else None)],
        in_flight=0,
    )  # fmt: skip
    decision = decide(sparse)
    assert decision.replicas == 3
    assert "enough requests" in decision.reason

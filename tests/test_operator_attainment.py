"""Windowed attainment over the gateways' own summaries (GET /v1/slo/summary)."""

from __future__ import annotations

from typing import Any

from sloserve.gateway.slo_summary import ATTAINED, MISSED, SloSummary
from sloserve.operator.attainment import AttainmentWindow, Counts, GatewaySample


def _summary(attained: int, missed: int, in_flight: int = 0, queued: int = 0) -> dict[str, Any]:
    """The gateway's own JSON, made by its own code."""
    tally = SloSummary()
    for _ in range(attained):
        tally.record("chat", ATTAINED, 0.1, spilled=False)
    for _ in range(missed):
        tally.record("chat", MISSED, 2.0, spilled=False)
    return {
        "classes": tally.to_json(),
        "in_flight": in_flight,
        "queue": {"depth": {"chat": queued}},
    }


def test_reads_the_gateway_summary_format() -> None:
    sample = GatewaySample.from_summary("10.0.0.1", _summary(9, 1, in_flight=3, queued=2))
    assert sample.classes["chat"] == Counts(arrived=10, attained=9)
    assert (sample.in_flight, sample.queued) == (3, 2)


def test_window_counts_only_what_arrived_within_it() -> None:
    window = AttainmentWindow()
    window.observe(0, [GatewaySample.from_summary("a", _summary(100, 0))])
    window.observe(50, [GatewaySample.from_summary("a", _summary(150, 0))])
    window.observe(100, [GatewaySample.from_summary("a", _summary(160, 40))])
    view = window.view(now=100, window_s=60)
    assert view is not None
    assert view.window["chat"] == Counts(arrived=50, attained=10)  # since t=50
    assert view.lifetime["chat"] == Counts(arrived=200, attained=160)
    # After a scale change at t=75 only newer samples count: none yet besides the last.
    later = window.view(now=100, window_s=60, since=75)
    assert later is not None and later.window["chat"] == Counts(0, 0)


def test_pods_are_summed_and_a_restarted_pod_counts_from_zero() -> None:
    window = AttainmentWindow()
    window.observe(0, [GatewaySample.from_summary(p, _summary(50, 0)) for p in ("a", "b")])
    window.observe(
        30,
        [
            GatewaySample.from_summary("a", _summary(60, 10)),  # +20 arrived, +10 attained
            GatewaySample.from_summary("b", _summary(5, 0)),  # restarted: 5 new
        ],
    )
    view = window.view(now=30, window_s=60)
    assert view is not None
    assert view.window["chat"] == Counts(arrived=25, attained=15)


def test_no_samples_no_view() -> None:
    assert AttainmentWindow().view(now=0, window_s=60) is None

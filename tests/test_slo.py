"""Deadline arithmetic and SLO class configuration (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sloserve.errors import FieldError
from sloserve.slo import Budgets, RequestSlo, SloCatalog, judge

BUDGETS = Budgets(ttft_s=1.0, tpot_s=0.1)


def test_on_time_stream_meets_both_budgets() -> None:
    times = [0.5 + 0.1 * k for k in range(10)]
    outcome = judge(0.0, times, BUDGETS)
    assert outcome.met and outcome.late_tokens == 0
    assert outcome.ttft_s == pytest.approx(0.5)
    assert outcome.mean_tpot_s == pytest.approx(0.1)


def test_decode_clock_starts_at_ttft_deadline_when_prefill_is_early() -> None:
    # First token at 0.2 s; token k is due by 1.0 + (k-1) * 0.1, not 0.2 + ...: early prefill
    # buys decode no slack but loses nothing either.
    times = [0.2, 1.1, 1.2]
    assert judge(0.0, times, BUDGETS).tpot_met


def test_late_first_token_does_not_excuse_the_rest() -> None:
    times = [2.0, 2.1, 2.35]  # decode starts at 2.0; token 3 is due by 2.0 + 1.05 * 0.2 = 2.21
    outcome = judge(0.0, times, BUDGETS)
    assert not outcome.ttft_met
    assert not outcome.tpot_met and outcome.late_tokens == 1


def test_the_first_late_token_and_the_worst_margin_are_reported() -> None:
    # Token 3 is due by 2.21 and comes at 2.35 (0.14 s late); token 4 by 2.315, at 2.4.
    outcome = judge(0.0, [2.0, 2.1, 2.35, 2.4], BUDGETS)
    assert outcome.first_late_token == 1  # the first token itself missed 1.05 s
    assert outcome.worst_margin_s == pytest.approx(1.05 - 2.0)
    on_ttft = judge(0.0, [0.5, 1.1, 1.35], BUDGETS)  # decode starts at 1.0: token 3 due 1.21
    assert on_ttft.first_late_token == 3
    assert on_ttft.worst_margin_s == pytest.approx(1.21 - 1.35)
    on_time = judge(0.0, [0.5, 1.0], BUDGETS)
    assert on_time.first_late_token is None
    assert on_time.worst_margin_s == pytest.approx(0.105)  # token 2: due 1.105, at 1.0


def test_five_percent_tolerance() -> None:
    assert judge(0.0, [1.04], BUDGETS).ttft_met
    assert not judge(0.0, [1.06], BUDGETS).ttft_met


def test_thinking_stage_has_its_own_tpot() -> None:
    budgets = Budgets(ttft_s=1.0, tpot_s=0.1, thinking_tpot_s=0.05, thinking_tokens=3)
    # Tokens 1-2 after the first are thinking (0.05 each), then answer tokens (0.1 each).
    on_time = [1.0, 1.05, 1.1, 1.2, 1.3]
    assert judge(0.0, on_time, budgets).tpot_met
    too_slow_thinking = [1.0, 1.09, 1.18, 1.2, 1.3]
    assert judge(0.0, too_slow_thinking, budgets).late_tokens >= 1


def test_no_tokens_is_a_miss() -> None:
    assert not judge(0.0, [], BUDGETS).met


def test_default_catalog_loads() -> None:
    catalog = SloCatalog.default()
    assert catalog.default_class in catalog.classes
    assert catalog.classes["reasoning"].budgets.thinking_tpot_s == 0.05


def test_catalog_errors_name_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "classes.yaml"
    bad.write_text("classes:\n  - name: chat\n    ttft_ms: 100\n")
    with pytest.raises(FieldError) as e:
        SloCatalog.load(bad)
    assert e.value.field == "classes[0].tpot_ms"
    bad.write_text("classes:\n  - name: Chat\n    ttft_ms: 100\n    tpot_ms: 10\n")
    with pytest.raises(FieldError, match="lowercase"):
        SloCatalog.load(bad)
    bad.write_text("default_class: x\nclasses:\n  - {name: a, ttft_ms: 100, tpot_ms: 10}\n")
    with pytest.raises(FieldError) as e:
        SloCatalog.load(bad)
    assert e.value.field == "default_class"


def test_request_slo_round_trips_through_extra_args() -> None:
    slo = RequestSlo(
        request_id="r1", class_name="", budgets=Budgets(0.5, 0.05, 0.02, 10),
        allow_best_effort=True, arrival_time=123.5, tenant="t", labels={"app": "x"},
        already_waited_s=0.25,
    )  # fmt: skip
    assert RequestSlo.from_extra_args(slo.to_extra_args()) == slo
    assert slo.origin_time == 123.25  # deadlines count from the arrival upstream
    # Written without the field (an older replica): nothing waited upstream.
    args = slo.to_extra_args()
    del args["sloserve"]["already_waited_s"]
    parsed = RequestSlo.from_extra_args(args)
    assert parsed is not None and parsed.already_waited_s == 0.0
    assert parsed.origin_time == parsed.arrival_time
    assert RequestSlo.from_extra_args(None) is None
    assert RequestSlo.from_extra_args({"other": 1}) is None

"""Run analysis (docs/slo.md §2, §3, §7) on hand-built records with known timestamps."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sloserve.bench.analysis import analyze, check_drain, final_deadline, trim
from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.slo import Budgets

CHAT = Budgets(ttft_s=1.0, tpot_s=0.1)
CODING = Budgets(ttft_s=0.5, tpot_s=0.05)


def make_record(
    index: int,
    sent_at: float,
    *,
    slo_class: str = "chat",
    budgets: Budgets = CHAT,
    ttft: float = 0.5,
    tpot: float = 0.1,
    tokens: int = 5,
    **overrides: Any,
) -> RequestRecord:
    """A completed request: first token `ttft` after sending, then one every `tpot`."""
    request = BenchRequest(
        index=index,
        slo_class=slo_class,
        budgets=budgets,
        prompt_tokens=16,
        output_tokens=tokens,
        arrival_s=sent_at,
    )
    times = [sent_at + ttft + k * tpot for k in range(tokens)]
    fields: dict[str, Any] = {
        "token_times": times,
        "finished_at": times[-1] if times else sent_at,
        "completed": True,
    }
    fields.update(overrides)
    return RequestRecord(request=request, sent_at=sent_at, **fields)


def rejected(index: int, sent_at: float, reason: str = "QUEUE_FULL", **kw: Any) -> RequestRecord:
    return make_record(
        index, sent_at, token_times=[], completed=False, rejected=True, reject_reason=reason, **kw
    )


def mixed_run() -> list[RequestRecord]:
    """chat: 6 good of 10; coding: 3 good of 4. Sent 1 s apart."""
    chat = [make_record(i, float(i)) for i in range(6)]
    chat += [
        make_record(6, 6.0, ttft=1.2),  # first token past 1.05 x 1.0 s
        make_record(7, 7.0, ttft=1.0, tpot=0.12),  # decode slower than 1.05 x 0.1 s
        rejected(8, 8.0),
        make_record(9, 9.0, best_effort=True),  # on time, but not served in its class
    ]
    coding = [
        make_record(10 + i, 10.0 + i, slo_class="coding", budgets=CODING, ttft=0.2, tpot=0.05)
        for i in range(3)
    ]
    coding.append(
        make_record(13, 13.0, slo_class="coding", budgets=CODING, completed=False, error="boom")
    )
    return chat + coding


def test_attainment_counts_rejections_and_best_effort_as_misses() -> None:
    stats = analyze(mixed_run(), trim_fraction=0.0)
    chat, coding = stats.classes["chat"], stats.classes["coding"]
    assert stats.attainment == {"chat": 0.6, "coding": 0.75}
    assert (chat.arrived, chat.good, chat.late, chat.rejected, chat.best_effort) == (10, 6, 2, 1, 1)
    assert chat.rejected_by_reason == {"QUEUE_FULL": 1}
    assert (coding.arrived, coding.good, coding.errors) == (4, 3, 1)
    for c in (chat, coding):
        assert c.good + c.late + c.rejected + c.best_effort + c.errors + c.incomplete == c.arrived
    assert stats.overall_attainment == pytest.approx(9 / 14)
    assert stats.trimmed == 0 and stats.analyzed == 14


def test_admitted_attainment_counts_later_demotions_but_not_turned_away() -> None:
    records = mixed_run()  # chat: 8 admitted (6 good, 2 late), 1 rejected, 1 best effort
    records.append(make_record(14, 14.0, best_effort=True, demoted=True))  # admitted, expired
    never_sent = make_record(15, 15.0, token_times=[], completed=False, sent=False)
    never_sent.error = "session stopped: round 0 failed"
    records.append(never_sent)
    chat = analyze(records, trim_fraction=0.0).classes["chat"]
    assert (chat.admitted, chat.errors) == (9, 1)
    assert chat.admitted_attainment == pytest.approx(6 / 9)
    only_rejected = analyze([rejected(0, 0.0)], trim_fraction=0.0).classes["chat"]
    assert (only_rejected.admitted, only_rejected.admitted_attainment) == (0, None)


def test_best_effort_is_reported_on_its_own() -> None:
    records = mixed_run()
    records.append(make_record(14, 14.0, best_effort=True, completed=False, error="cut"))
    best_effort = analyze(records, trim_fraction=0.0).best_effort
    assert (best_effort.requests, best_effort.completed) == (2, 1)
    assert best_effort.completion_rate == 0.5
    assert best_effort.mean_ttft_s == pytest.approx(0.5)
    assert best_effort.output_tokens == 10
    assert best_effort.tokens_per_s == pytest.approx(10 / 14.0)  # span: sent 0 s to 14 s


def test_five_percent_tolerance_and_stage_budgets_come_from_judge() -> None:
    thinking = Budgets(ttft_s=1.0, tpot_s=0.1, thinking_tpot_s=0.05, thinking_tokens=4)
    records = [
        make_record(0, 0.0, ttft=1.04),  # within 5%
        make_record(1, 1.0, ttft=1.06),  # past it
        # thinking tokens at 0.1 s apart against a 0.05 s thinking budget: late
        make_record(2, 2.0, slo_class="reasoning", budgets=thinking, ttft=1.0, tpot=0.1),
        make_record(3, 3.0, slo_class="reasoning", budgets=thinking, ttft=1.0, tpot=0.05),
    ]
    stats = analyze(records, trim_fraction=0.0)
    assert stats.attainment == {"chat": 0.5, "reasoning": 0.5}


def test_latency_statistics() -> None:
    # TTFTs 0.1 .. 1.0 s, all well inside the budget; tokens 0.1 s apart.
    records = [make_record(i, float(i), ttft=0.1 * (i + 1)) for i in range(10)]
    records.append(rejected(10, 10.0))  # no latency sample
    chat = analyze(records, trim_fraction=0.0).classes["chat"]
    assert chat.ttft_s.p50 == pytest.approx(0.55)  # numpy's linear interpolation
    assert chat.ttft_s.p90 == pytest.approx(0.91)
    assert chat.ttft_s.p99 == pytest.approx(0.991)
    assert chat.inter_token_s.p50 == pytest.approx(0.1)
    assert chat.inter_token_s.p99 == pytest.approx(0.1)
    assert chat.mean_tpot_s == pytest.approx(0.1)


def test_class_with_no_tokens_has_empty_latencies() -> None:
    chat = analyze([rejected(0, 0.0)], trim_fraction=0.0).classes["chat"]
    assert chat.attainment == 0.0
    assert chat.mean_tpot_s is None and chat.ttft_s.p50 is None


def test_trimming_drops_first_and_last_arrivals_by_send_time() -> None:
    # 20 arrivals, listed out of order; the 2 first and 2 last are misses.
    records = [
        rejected(i, float(i)) if i in (0, 1, 18, 19) else make_record(i, float(i))
        for i in reversed(range(20))
    ]
    stats = analyze(records)  # default: 10% each end
    assert (stats.records, stats.trimmed, stats.analyzed) == (20, 4, 16)
    assert stats.attainment == {"chat": 1.0}
    assert stats.span_s == pytest.approx(15.0)  # sent at 2 s .. 17 s
    assert analyze(records, trim_fraction=0.0).attainment == {"chat": 0.8}


def test_trim_rounds_down_and_validates() -> None:
    records = [make_record(i, float(i)) for i in range(5)]
    assert len(trim(records, 0.1)) == 5  # 0.5 per side rounds down to 0
    assert [r.request.index for r in trim(records, 0.2)] == [1, 2, 3]
    with pytest.raises(ValueError):
        trim(records, 0.5)


def test_goodput_over_the_arrival_window() -> None:
    # 11 good requests sent 1 s apart (10 s window), 5 tokens each, plus one late one.
    records = [make_record(i, float(i)) for i in range(11)]
    records.append(make_record(11, 10.0, ttft=3.0))
    stats = analyze(records, trim_fraction=0.0)
    assert stats.span_s == pytest.approx(10.0)
    assert stats.offered_rps == pytest.approx(1.2)
    assert stats.goodput_rps == pytest.approx(1.1)
    assert stats.goodput_tokens_per_s == pytest.approx(5.5)
    assert stats.output_tokens_per_s == pytest.approx(6.0)


def test_final_deadline_follows_stage_budgets() -> None:
    assert final_deadline(make_record(0, 100.0, tokens=5)) == pytest.approx(101.4)
    thinking = Budgets(ttft_s=1.0, tpot_s=0.1, thinking_tpot_s=0.05, thinking_tokens=3)
    # tokens 2-3 thinking (0.05 each), tokens 4-5 answer (0.1 each)
    assert final_deadline(make_record(0, 0.0, budgets=thinking, tokens=5)) == pytest.approx(1.3)


def test_drain_within_grace_after_the_last_deadline() -> None:
    early = make_record(0, 0.0)
    last = make_record(1, 100.0)  # deadline 101.4
    assert check_drain([early, last]).drained
    late = make_record(1, 100.0, finished_at=121.3)
    drain = check_drain([early, late])
    assert drain.drained and drain.lag_s == pytest.approx(19.9)
    assert drain.last_deadline == pytest.approx(101.4)
    assert not check_drain([early, make_record(1, 100.0, finished_at=121.5)]).drained
    assert check_drain([early, make_record(1, 100.0, finished_at=121.5)], grace_s=30.0).drained


def test_unfinished_request_is_not_drained_but_a_rejection_is() -> None:
    never = make_record(1, 5.0, finished_at=None, completed=False)
    drain = check_drain([make_record(0, 0.0), never])
    assert not drain.drained and drain.unfinished == 1
    assert check_drain([make_record(0, 0.0), rejected(1, 5.0, finished_at=None)]).drained


def test_drain_looks_at_trimmed_records_too() -> None:
    records = [make_record(i, float(i)) for i in range(10)]
    records[-1] = make_record(9, 9.0, finished_at=None, completed=False)
    stats = analyze(records)
    assert stats.trimmed == 2 and stats.attainment == {"chat": 1.0}
    assert not stats.drain.drained and not stats.meets()


def test_meets_threshold() -> None:
    records = [make_record(i, float(i)) for i in range(9)] + [rejected(9, 9.0)]
    stats = analyze(records, trim_fraction=0.0)
    assert stats.meets(0.9) and not stats.meets(0.99)
    assert not analyze([], trim_fraction=0.0).meets(0.0)  # nothing measured proves nothing


def test_to_json_is_plain_json() -> None:
    data = analyze(mixed_run(), trim_fraction=0.0).to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["classes"]["chat"]["attainment"] == 0.6
    assert data["classes"]["chat"]["ttft_s"]["p50"] == pytest.approx(0.5)
    assert data["drain"]["drained"] is True

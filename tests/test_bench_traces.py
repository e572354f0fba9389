"""Trace replay (sloserve.bench.traces).

The real Azure traces are used when the shared trace folder is present (SLOSERVE_TRACE_DIR, else
../shared/traces).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import REAL_TRACES, cv, gaps, write_trace

from sloserve.bench.traces import (
    CODE_TRACE,
    CONV_TRACE,
    TraceRow,
    densest_stretches,
    load_trace,
    observed_rate,
    parse_timestamp_ns,
    scale_to_rate,
    trace_window,
    window_around,
)


def test_timestamp_parsing_keeps_seven_digits() -> None:
    first = parse_timestamp_ns("2023-11-16 18:15:46.6805900")
    assert parse_timestamp_ns("2023-11-16 18:15:46.6805901") - first == 100
    assert parse_timestamp_ns("2023-11-16T18:15:47Z") - first == 319_410_000
    assert parse_timestamp_ns("2023-11-16 19:15:46.68059+01:00") == first
    assert parse_timestamp_ns("1700158546.5") == 1_700_158_546_500_000_000
    with pytest.raises(ValueError, match="unrecognised"):
        parse_timestamp_ns("16/11/2023 18:15")


def test_load_trace_sorts_and_rebases(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "t.csv",
        [
            ("2023-11-16 18:15:47.0000000", 10, 2),
            ("2023-11-16 18:15:46.5000000", 374, 44),
            ("2023-11-16 18:15:50.2500000", 91, 16),
        ],
    )
    assert load_trace(path) == [
        TraceRow(0.0, 374, 44),
        TraceRow(0.5, 10, 2),
        TraceRow(3.75, 91, 16),
    ]


def test_load_trace_names_what_is_wrong(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    missing.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.5,3\n")
    with pytest.raises(ValueError, match="GeneratedTokens"):
        load_trace(missing)
    bad = write_trace(tmp_path / "bad.csv", [("2023-11-16 18:15:46.5", 3, 4), ("soon", 1, 1)])
    with pytest.raises(ValueError, match=r"bad\.csv:3"):
        load_trace(bad)


def test_window_and_rate_scaling_keep_the_shape() -> None:
    rows = [TraceRow(t, 10, 10) for t in (0.0, 1.0, 1.5, 4.0, 4.5, 9.0)]
    window = trace_window(rows, start_s=1.2, count=3)
    assert [r.offset_s for r in window] == [0.0, 2.5, 3.0]
    assert observed_rate(rows) == pytest.approx(5 / 9)
    scaled = scale_to_rate(rows, 5.0)
    assert observed_rate(scaled) == pytest.approx(5.0)
    assert [r.offset_s for r in scaled] == pytest.approx([t.offset_s / 9 for t in rows])
    with pytest.raises(ValueError, match="only 2"):
        trace_window(rows, start_s=4.2, count=3)


@pytest.mark.skipif(not (REAL_TRACES / CODE_TRACE).exists(), reason="no shared traces")
def test_real_traces_match_their_readme() -> None:
    code, conv = load_trace(REAL_TRACES / CODE_TRACE), load_trace(REAL_TRACES / CONV_TRACE)
    assert (len(code), len(conv)) == (8819, 19366)
    assert observed_rate(code) == pytest.approx(2.57, rel=0.02)
    assert observed_rate(conv) == pytest.approx(5.53, rel=0.02)
    assert np.mean([r.prompt_tokens for r in conv]) == pytest.approx(1155, rel=0.01)
    assert np.mean([r.output_tokens for r in code]) == pytest.approx(28, rel=0.05)
    # "The code trace is very bursty; the conversation trace is close to Poisson."
    code_cv = cv(gaps([r.offset_s for r in code]))
    conv_cv = cv(gaps([r.offset_s for r in conv]))
    assert code_cv > 1.5 * conv_cv


def test_densest_stretches_find_each_burst_once() -> None:
    # One row a second for 200 s, with 90 more rows in [120, 130) and 40 more in [40, 45).
    times = sorted([float(t) for t in range(200)] + [120 + i / 9 for i in range(90)])
    times = sorted(times + [40 + i / 8 for i in range(40)])
    rows = [TraceRow(t, 100, 10) for t in times]
    first, second, third = densest_stretches(rows, span_s=30.0, limit=3)
    # The densest 30 s hold the big burst and the background around it; the earliest start
    # that holds them all wins the tie.
    assert first.rows == 120 and first.offset_s <= 120.0 and first.offset_s + 30 >= 130.0
    assert second.rows == 70 and second.offset_s <= 40.0 and second.offset_s + 30 >= 45.0
    assert third.rows == 30
    # No two overlap.
    starts = sorted(b.offset_s for b in (first, second, third))
    assert all(b - a >= 30.0 for a, b in itertools.pairwise(starts))
    assert len(densest_stretches(rows[:5], span_s=30.0, limit=3)) == 1


def test_window_around_centres_in_time_not_in_rows() -> None:
    # 50 sparse rows (1 s apart), then 50 dense ones (0.01 s apart), then 50 sparse again.
    times = [float(i) for i in range(50)]
    times += [50 + i / 100 for i in range(50)]
    times += [51 + i for i in range(50)]
    rows = [TraceRow(t, 1, 1) for t in times]
    start = window_around(rows, centre_s=50.25, count=60)
    window = times[start : start + 60]
    assert (window[0] + window[-1]) / 2 == pytest.approx(50.25, abs=1.0)
    # Centring by rows would have put the window inside the dense stretch.
    assert window[0] < 50 - 1 and window[-1] > 51
    with pytest.raises(ValueError):
        window_around(rows, 0.0, count=151)

"""Benchmark workloads: arrival processes, trace replay, length scaling, SLO presets, scenarios.

Pure functions over a hand-made step-time model; no engine. The real Azure traces are used
when the shared trace folder is present (SLOSERVE_TRACE_DIR, else ../shared/traces).
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sloserve.bench.types import BenchRequest
from sloserve.bench.workloads import (
    CHAT,
    CODE_TRACE,
    CONV_TRACE,
    REASONING,
    SCENARIOS,
    Burst,
    LengthScale,
    SloReference,
    TraceRow,
    Workload,
    build_scenario,
    burst_arrivals,
    gamma_arrivals,
    load_trace,
    observed_rate,
    parse_timestamp_ns,
    poisson_arrivals,
    preset_budgets,
    scale_to_rate,
    trace_window,
    with_burst,
)
from sloserve.slo import Budgets
from sloserve.stepmodel import StepTimeModel

REAL_TRACES = Path(
    os.environ.get("SLOSERVE_TRACE_DIR", Path(__file__).resolve().parents[2] / "shared" / "traces")
)

# An engine whose idle decode step is 25 ms (a floor piece) and whose prefill costs 50 us per
# token past the knee: a 2,000-token prompt prefills in about 0.1 s.
MODEL = StepTimeModel(pieces=[(0.025, 0.0, 0.0, 0.0), (0.005, 5e-5, 0.0, 1e-8)])
IDLE = 0.025
# A small engine: quarter lengths, 1,024 tokens of context.
SMALL = LengthScale(prompt_factor=0.25, output_factor=0.25, max_model_len=1024)


def gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.array(offsets))


def cv(values: np.ndarray) -> float:
    return float(np.std(values) / np.mean(values))


def write_trace(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens", *(f"{t},{p},{o}" for t, p, o in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_traces(folder: Path, rows: int = 60) -> Path:
    """Both trace files, small: conversation at one request per 0.5 s, code in bursts of ten."""
    day = "2023-11-16 18:15"
    conv = [(f"{day}:{i // 2:02d}.{5 * (i % 2)}000000", 100 + i, 20 + i) for i in range(rows)]
    code = [(f"{day}:{(i // 10) * 5:02d}.0000000", 1000 + i, 5 + i) for i in range(rows)]
    write_trace(folder / CONV_TRACE, conv)
    write_trace(folder / CODE_TRACE, code)
    return folder


def build(name: str, **kwargs: Any) -> Workload:
    args: dict[str, Any] = {"model": MODEL, "rate": 2.0, "count": 300, "seed": 7}
    return build_scenario(name, **(args | kwargs))


def shape(request: BenchRequest) -> tuple[object, ...]:
    """Everything about a request but when it arrives."""
    return (
        request.index, request.slo_class, request.budgets, request.prompt_tokens,
        request.output_tokens, request.session, request.round, request.after, request.delay_s,
    )  # fmt: skip


# -- arrival processes -------------------------------------------------------------------------


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


# -- traces ------------------------------------------------------------------------------------


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


# -- length scaling ----------------------------------------------------------------------------


def test_length_scale_factors_floors_and_caps() -> None:
    scale = LengthScale(0.1, 0.5, max_prompt=300, max_output=100, max_model_len=350)
    assert scale.apply(1000, 50) == (100, 25)
    assert scale.apply(3, 1) == (1, 1)  # never below one token
    assert scale.apply(5000, 1000) == (250, 100)  # capped, then the prompt gives way to fit
    assert scale.clipped(5000, 1000) and not scale.clipped(1000, 50)
    assert scale.describe() == {
        "prompt_factor": 0.1,
        "output_factor": 0.5,
        "max_prompt": 300,
        "max_output": 100,
        "max_model_len": 350,
    }
    with pytest.raises(ValueError, match="factors"):
        LengthScale(prompt_factor=0.0)


# -- SLO presets -------------------------------------------------------------------------------


def test_presets_are_multiples_of_the_engine_profile() -> None:
    ref = SloReference(MODEL, chunk_tokens=512)
    long = ref.budgets(CHAT, 2000)
    assert long.tpot_s == pytest.approx(4 * IDLE)
    assert long.ttft_s == pytest.approx(5 * MODEL.prefill_s(2000, 512))
    # A tiny prompt prefills in one idle step: the floor (3 idle steps) holds its TTFT up.
    assert ref.budgets(REASONING, 5).ttft_s == pytest.approx(3 * IDLE)
    thinking = preset_budgets(MODEL, REASONING, 100, thinking_tokens=40)
    assert thinking == Budgets(
        ttft_s=3 * IDLE, tpot_s=4 * IDLE, thinking_tpot_s=2 * IDLE, thinking_tokens=40
    )


# -- scenarios ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_scenario_is_well_formed(name: str) -> None:
    workload = build(name, scale=SMALL)
    workload.validate()
    assert len(workload.requests) == 300
    assert {r.slo_class for r in workload.requests} == set(workload.classes)
    assert all(r.prompt_tokens + r.output_tokens <= 1024 for r in workload.requests)
    assert workload.scaling["max_model_len"] == 1024
    assert (workload.name, workload.seed, workload.rate) == (name, 7, 2.0)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenarios_are_reproducible_and_seeded(name: str) -> None:
    assert build(name) == build(name)
    other = build(name, seed=8)
    assert [shape(r) for r in other.requests] != [shape(r) for r in build(name).requests]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_rate_moves_only_arrivals(name: str) -> None:
    slow, fast = build(name, rate=1.0), build(name, rate=4.0)
    assert [shape(r) for r in slow.requests] == [shape(r) for r in fast.requests]
    expected = [r.arrival_s / 4 for r in slow.requests]
    assert [r.arrival_s for r in fast.requests] == pytest.approx(expected)


@pytest.mark.parametrize("name", ["chatbot", "summarization", "reasoning"])
def test_poisson_scenarios_arrive_at_the_rate(name: str) -> None:
    workload = build(name, rate=3.0, count=3000)
    last = workload.requests[-1].arrival_s
    assert (len(workload.requests) - 1) / last == pytest.approx(3.0, rel=0.06)


def test_chat_and_coding_replay_the_given_traces(tmp_path: Path) -> None:
    folder = tiny_traces(tmp_path)
    chat = build("chatbot", trace_dir=folder, count=40, rate=4.0)
    rows = {(r.prompt_tokens, r.output_tokens) for r in load_trace(folder / CONV_TRACE)}
    assert {(r.prompt_tokens, r.output_tokens) for r in chat.requests} <= rows
    assert chat.arrival == f"trace:{CONV_TRACE}"
    # Timestamps are scaled to the rate: the trace's evenly spaced rows stay evenly spaced.
    assert [r.arrival_s for r in chat.requests] == pytest.approx([i / 4 for i in range(40)])
    coding = build("coding", trace_dir=folder, count=60, rate=1.0)
    assert coding.source["first_row"] == 0
    # Code rows come ten at a time: bursts survive the scaling.
    assert Counter(r.arrival_s for r in coding.requests).most_common(1)[0][1] == 10
    with pytest.raises(ValueError, match="60 requests"):
        build("chatbot", trace_dir=folder, count=61)


def test_trace_scenarios_keep_requests_across_rates(tmp_path: Path) -> None:
    folder = tiny_traces(tmp_path)
    slow = build("mixed", trace_dir=folder, rate=1.0)
    fast = build("mixed", trace_dir=folder, rate=3.0)
    assert [shape(r) for r in slow.requests] == [shape(r) for r in fast.requests]
    assert [r.arrival_s for r in fast.requests] == pytest.approx(
        [r.arrival_s / 3 for r in slow.requests]
    )
    assert slow.source["parts"]["coding"]["trace"] == CODE_TRACE


def test_a_window_without_time_span_takes_the_trace_rate(tmp_path: Path) -> None:
    # Ten simultaneous rows, then one 5 s later: a 10-row window may hold only the burst.
    rows = [("2023-11-16 18:15:00.0000000", 100, 10)] * 10 + [("2023-11-16 18:15:05", 100, 10)]
    write_trace(tmp_path / CODE_TRACE, rows)
    starts = set()
    for seed in range(8):
        coding = build("coding", trace_dir=tmp_path, count=10, seed=seed, rate=2.0)
        starts.add(coding.source["first_row"])
        assert coding.source["trace_rate"] in (pytest.approx(2.0), pytest.approx(9 / 5))
        assert all(np.isfinite(r.arrival_s) for r in coding.requests)
    assert starts == {0, 1}


@pytest.mark.skipif(not (REAL_TRACES / CONV_TRACE).exists(), reason="no shared traces")
def test_chat_from_the_real_trace_at_the_asked_rate() -> None:
    chat = build("chatbot", trace_dir=REAL_TRACES, count=2000, rate=1.5)
    assert (len(chat.requests) - 1) / chat.requests[-1].arrival_s == pytest.approx(1.5)
    assert chat.source["trace"] == CONV_TRACE and chat.source["rows"] == 2000
    assert np.mean([r.prompt_tokens for r in chat.requests]) == pytest.approx(1155, rel=0.2)


def test_synthetic_coding_is_burstier_than_chat() -> None:
    coding, chat = build("coding", count=5000), build("chatbot", count=5000)
    coding_cv = cv(gaps([r.arrival_s for r in coding.requests]))
    assert coding_cv == pytest.approx(3.0, rel=0.2)
    assert cv(gaps([r.arrival_s for r in chat.requests])) == pytest.approx(1.0, abs=0.1)
    assert all(r.budgets.tpot_s == pytest.approx(2 * IDLE) for r in coding.requests)
    assert all(r.budgets.tpot_s == pytest.approx(4 * IDLE) for r in chat.requests)


def test_summarization_has_long_prompts_and_short_outputs() -> None:
    requests = build("summarization", count=2000).requests
    assert np.median([r.prompt_tokens for r in requests]) == pytest.approx(3000, rel=0.1)
    assert np.median([r.output_tokens for r in requests]) == pytest.approx(200, rel=0.1)


def test_reasoning_thinks_then_answers() -> None:
    requests = build("reasoning", scale=SMALL).requests
    for r in requests:
        assert 1 <= r.budgets.thinking_tokens < r.output_tokens
        assert r.budgets.thinking_tpot_s == pytest.approx(2 * IDLE)
        assert r.budgets.tpot_s == pytest.approx(4 * IDLE)
    # Short prompts, long outputs, mostly thinking.
    prompts, outputs = [r.prompt_tokens for r in requests], [r.output_tokens for r in requests]
    assert np.median(outputs) > 5 * np.median(prompts)
    thinking_share = [r.budgets.thinking_tokens / r.output_tokens for r in requests]
    assert 0.5 < float(np.median(thinking_share)) < 0.95


def sessions(workload: Workload) -> dict[int, list[BenchRequest]]:
    grouped: dict[int, list[BenchRequest]] = {}
    for r in workload.requests:
        assert r.session is not None
        grouped.setdefault(r.session, []).append(r)
    return grouped


@pytest.mark.parametrize("scale", [LengthScale(), LengthScale(1.0, 1.0, max_model_len=1500)])
def test_tool_sessions_grow_their_context(scale: LengthScale) -> None:
    workload = build("tool-calling", scale=scale)
    for rounds in sessions(workload).values():
        assert 2 <= len(rounds) <= 6
        assert [r.round for r in rounds] == list(range(len(rounds)))
        assert rounds[0].after is None and rounds[0].delay_s == 0.0
        for previous, this in itertools.pairwise(rounds):
            assert this.after == previous.index
            assert 0.2 <= this.delay_s <= 2.0
            assert this.arrival_s == rounds[0].arrival_s  # the session start
            assert this.prompt_tokens > previous.prompt_tokens + previous.output_tokens
        assert [r.budgets.tpot_s for r in rounds] == pytest.approx(
            [2 * IDLE] * (len(rounds) - 1) + [4 * IDLE]
        )
        if scale.max_model_len is not None:
            assert rounds[-1].prompt_tokens + rounds[-1].output_tokens <= scale.max_model_len
    # The tight engine makes some sessions shrink to fit, and the results say how many.
    assert (workload.scaling["clipped_requests"] > 0) == (scale.max_model_len is not None)


def test_tool_session_count_is_exact_in_requests() -> None:
    for count in (2, 3, 7, 11):
        workload = build("tool-calling", count=count)
        assert len(workload.requests) == count
        assert all(2 <= len(s) <= 6 for s in sessions(workload).values())


def test_mixed_splits_count_and_rate_evenly() -> None:
    workload = build("mixed", count=1003, rate=5.0)
    workload.validate()
    counts = Counter(r.slo_class for r in workload.requests)
    assert counts == {
        "chat": 201,
        "coding": 201,
        "summarization": 201,
        "reasoning": 200,
        "tool-calling": 200,
    }
    # Each part alone at rate 1: the chat part is the chatbot scenario at a fifth of the rate.
    chat_alone = build("chatbot", count=201, rate=1.0)
    chat_mixed = [r for r in workload.requests if r.slo_class == "chat"]
    assert [r.arrival_s for r in chat_mixed] == pytest.approx(
        [r.arrival_s for r in chat_alone.requests]
    )
    assert [r.prompt_tokens for r in chat_mixed] == [r.prompt_tokens for r in chat_alone.requests]


def test_unknown_scenario_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="chatbot, coding, summarization") as error:
        build_scenario("batch", model=MODEL, rate=1.0, count=1)
    assert "tool-calling" in str(error.value)


def test_build_scenario_applies_a_burst() -> None:
    steady = build("chatbot", count=2000, rate=10.0)
    bursty = build("chatbot", count=2000, rate=10.0, burst=Burst(2.0, 30.0))
    assert [shape(r) for r in bursty.requests] == [shape(r) for r in steady.requests]
    window = bursty.source["burst"]
    assert window["duration_s"] == 30.0
    assert bursty.requests[-1].arrival_s == pytest.approx(steady.requests[-1].arrival_s - 30.0)
    assert bursty == with_burst(steady, Burst(2.0, 30.0))


def test_validate_rejects_a_forward_dependency() -> None:
    workload = build("tool-calling", count=4)
    first, second = workload.requests[0], workload.requests[1]
    broken = replace(workload, requests=[replace(first, after=1), second, *workload.requests[2:]])
    with pytest.raises(ValueError, match="not an earlier one"):
        broken.validate()

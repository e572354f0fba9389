"""Benchmark scenarios and the workloads they build (sloserve.bench.workloads).

Pure functions over a hand-made step-time model; no engine. The real Azure traces are used
when the shared trace folder is present (SLOSERVE_TRACE_DIR, else ../shared/traces).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bench_helpers import REAL_TRACES, cv, gaps, write_trace

from sloserve.bench.arrivals import Burst
from sloserve.bench.presets import LengthScale
from sloserve.bench.traces import CODE_TRACE, CONV_TRACE, load_trace
from sloserve.bench.types import BenchRequest
from sloserve.bench.workloads import SCENARIOS, Workload, build_scenario, with_burst
from sloserve.stepmodel import StepTimeModel

# An engine whose idle decode step is 25 ms (a floor piece) and whose prefill costs 50 us per
# token past the knee: a 2,000-token prompt prefills in about 0.1 s.
MODEL = StepTimeModel(pieces=[(0.025, 0.0, 0.0, 0.0), (0.005, 5e-5, 0.0, 1e-8)])
IDLE = 0.025
# A small engine: quarter lengths, 1,024 tokens of context.
SMALL = LengthScale(prompt_factor=0.25, output_factor=0.25, max_model_len=1024)


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
    # Each part alone at rate 1: the chat part is the chatbot scenario at a fifth of the rate,
    # shifted by its own phase so the five parts do not all start at once.
    chat_alone = build("chatbot", count=201, rate=1.0)
    chat_mixed = [r for r in workload.requests if r.slo_class == "chat"]
    phase = chat_mixed[0].arrival_s
    assert 0 < phase < 1.0
    assert [r.arrival_s - phase for r in chat_mixed] == pytest.approx(
        [r.arrival_s for r in chat_alone.requests], abs=1e-9
    )
    first_arrivals = {
        c: min(r.arrival_s for r in workload.requests if r.slo_class == c) for c in counts
    }
    assert len(set(first_arrivals.values())) == len(counts)
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

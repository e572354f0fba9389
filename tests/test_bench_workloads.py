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
from sloserve.bench.workloads import (
    CODING_BURST_FACTOR,
    REASONING_BURST_FACTOR,
    SCENARIOS,
    Workload,
    build_scenario,
    with_burst,
)
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


# -- bursts ------------------------------------------------------------------------------------


def in_window(workload: Workload, slo_class: str | None = None) -> tuple[list[float], list[float]]:
    """Arrivals (of `slo_class`, or all) inside and outside the scenario's burst window."""
    window = workload.source["burst_window"]
    start, end = window["start_s"], window["start_s"] + window["duration_s"]
    arrivals = [
        r.arrival_s for r in workload.requests if slo_class is None or r.slo_class == slo_class
    ]
    return [t for t in arrivals if start <= t < end], [t for t in arrivals if not start <= t < end]


def test_reasoning_burst_is_a_chat_stream_with_reasoning_in_the_middle() -> None:
    workload = build("reasoning-burst", count=3000, rate=2.0)
    workload.validate()
    counts = Counter(r.slo_class for r in workload.requests)
    assert counts == {"chat": 2700, "reasoning": 300}
    assert workload.max_tokens == {"chat": 2048, "reasoning": 16384}  # each class's own cap
    window = workload.source["burst_window"]
    run = workload.requests[-1].arrival_s
    # Centred, 1/27 of the run; `rate` is the total rate over the run.
    assert window["start_s"] + window["duration_s"] / 2 == pytest.approx(run / 2, rel=0.05)
    assert window["duration_s"] == pytest.approx(3000 / (27 * 2.0))
    assert len(workload.requests) / run == pytest.approx(2.0, rel=0.05)
    # Every reasoning request arrives in the window (its Poisson tail may spill a little).
    reasoning = [r.arrival_s for r in workload.requests if r.slo_class == "reasoning"]
    assert min(reasoning) >= window["start_s"]
    assert max(reasoning) <= window["start_s"] + 1.15 * window["duration_s"]
    # Inside, reasoning arrives at 3x the chat rate; the chat stream keeps its pace throughout.
    chat_in, chat_out = in_window(workload, "chat")
    chat_rate_in = len(chat_in) / window["duration_s"]
    chat_rate_out = len(chat_out) / (run - window["duration_s"])
    assert chat_rate_out == pytest.approx(0.9 * 2.0, rel=0.1)
    assert chat_rate_in == pytest.approx(chat_rate_out, rel=0.3)
    reasoning_in, _ = in_window(workload, "reasoning")
    rate_in = len(reasoning_in) / window["duration_s"]
    assert rate_in == pytest.approx(REASONING_BURST_FACTOR * chat_rate_out, rel=0.15)


def test_reasoning_burst_reuses_the_chatbot_and_reasoning_requests() -> None:
    workload = build("reasoning-burst", count=1000, rate=2.0)
    # The chat stream is the chatbot scenario at 90% of the rate, request for request.
    chat = [r for r in workload.requests if r.slo_class == "chat"]
    alone = build("chatbot", count=900, rate=0.9 * 2.0).requests
    assert [(r.prompt_tokens, r.output_tokens, r.budgets) for r in chat] == [
        (r.prompt_tokens, r.output_tokens, r.budgets) for r in alone
    ]
    assert [r.arrival_s for r in chat] == pytest.approx([r.arrival_s for r in alone])
    # The reasoning requests are the reasoning scenario's lengths, thinking and budgets.
    reasoning = [r for r in workload.requests if r.slo_class == "reasoning"]
    reasoning_alone = build("reasoning", count=100).requests
    assert [(r.prompt_tokens, r.output_tokens, r.budgets) for r in reasoning] == [
        (r.prompt_tokens, r.output_tokens, r.budgets) for r in reasoning_alone
    ]
    assert all(r.budgets.thinking_tokens >= 1 for r in reasoning)


def test_reasoning_burst_replays_the_conversation_trace(tmp_path: Path) -> None:
    folder = tiny_traces(tmp_path)
    workload = build("reasoning-burst", trace_dir=folder, count=50, rate=1.0)
    workload.validate()
    assert workload.source["parts"]["chat"]["trace"] == CONV_TRACE
    assert Counter(r.slo_class for r in workload.requests) == {"chat": 45, "reasoning": 5}


def test_synthetic_coding_burst_doubles_the_coding_rate_mid_run() -> None:
    steady = build("coding", count=3000, rate=2.0)
    bursty = build("coding-burst", count=3000, rate=2.0)
    bursty.validate()
    # The coding scenario's requests, only their arrivals warped.
    assert [shape(r) for r in bursty.requests] == [shape(r) for r in steady.requests]
    assert bursty.max_tokens == steady.max_tokens
    window = bursty.source["burst_window"]
    start, length = window["start_s"], window["duration_s"]
    assert window["factor"] == CODING_BURST_FACTOR == 2.0
    run = bursty.requests[-1].arrival_s
    assert length == pytest.approx(0.2 * run)  # the middle fifth
    assert start + length / 2 == pytest.approx(run / 2)
    # Time runs twice as fast in the window: before it nothing moves, after it everything
    # arrives `length` earlier, and the window holds what 2 x `length` held.
    pairs = list(zip(steady.requests, bursty.requests, strict=True))
    assert all(b.arrival_s == a.arrival_s for a, b in pairs if a.arrival_s <= start)
    after = [(a, b) for a, b in pairs if a.arrival_s > start + 2 * length]
    assert after and all(b.arrival_s == pytest.approx(a.arrival_s - length) for a, b in after)
    inside, _ = in_window(bursty)
    assert len(inside) == sum(
        1 for r in steady.requests if start <= r.arrival_s < start + 2 * length
    )


def bursty_code_trace(folder: Path) -> Path:
    """A code trace: one request a second for 300 s, plus 120 in [150, 160) and 40 in [50, 55)."""
    times = [float(t) for t in range(300)]
    times += [150 + i / 12 for i in range(120)] + [50 + i / 8 for i in range(40)]
    rows = [
        (f"{1_700_000_000 + t:.6f}", 1000 + i % 7, 10 + i % 5) for i, t in enumerate(sorted(times))
    ]
    write_trace(folder / CODE_TRACE, rows)
    return folder


def test_coding_burst_replays_the_code_trace_around_its_densest_burst(tmp_path: Path) -> None:
    folder = bursty_code_trace(tmp_path)
    workload = build("coding-burst", trace_dir=folder, count=250, rate=3.0, seed=0)
    workload.validate()
    assert workload.arrival == f"trace:{CODE_TRACE}"
    window = workload.source["burst_window"]
    assert window["rank"] == 1 and window["arrivals"] == 150  # the burst and 30 s around it
    # The window is centred on the burst, which arrives far faster than the rest.
    run = workload.requests[-1].arrival_s
    assert window["start_s"] + window["duration_s"] / 2 == pytest.approx(run / 2, rel=0.1)
    inside, outside = in_window(workload)
    rate_in = len(inside) / window["duration_s"]
    rate_out = len(outside) / (run - window["duration_s"])
    assert rate_in > 3 * rate_out
    assert window["rate_over_mean"] == pytest.approx(rate_in / 3.0, rel=0.05)
    # The next seed replays the next burst; the seeds cycle through the candidates.
    second = build("coding-burst", trace_dir=folder, count=250, rate=3.0, seed=1)
    assert second.source["burst_window"]["rank"] == 2
    assert second.source["first_row"] != workload.source["first_row"]
    ranks = {
        build("coding-burst", trace_dir=folder, count=250, seed=s).source["burst_window"]["rank"]
        for s in range(12)
    }
    assert ranks == {1, 2, 3, 4, 5}
    # Rate only rescales.
    slow = build("coding-burst", trace_dir=folder, count=250, rate=1.0, seed=0)
    assert [r.arrival_s / 3.0 for r in slow.requests] == pytest.approx(
        [r.arrival_s for r in workload.requests]
    )


@pytest.mark.skipif(not (REAL_TRACES / CODE_TRACE).exists(), reason="no shared traces")
def test_coding_burst_on_the_real_code_trace() -> None:
    workload = build("coding-burst", trace_dir=REAL_TRACES, count=1000, rate=5.0, seed=0)
    window = workload.source["burst_window"]
    assert window["rank"] == 1 and window["arrivals"] > 500  # 557 requests in 30 trace-s
    assert window["rate_over_mean"] > 5

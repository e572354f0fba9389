"""Replaying a trace a user brings (sloserve.bench.user_trace, workloads.replay_user_trace),
and the workload options both CLIs share (sloserve.bench.workload_options).

Pure functions over a hand-made step-time model, and the simulator's CLI end to end; no engine.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest

from sloserve.bench import cli as bench_cli
from sloserve.bench import workload_options
from sloserve.bench.arrivals import Burst
from sloserve.bench.presets import LengthScale
from sloserve.bench.runner import PromptBook, run
from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.bench.user_trace import ArrivalKind, TraceFormat, UserTraceError, read_user_trace
from sloserve.bench.workloads import (
    DEFAULT_TRACE_CLASS,
    TRACE_CLASSES,
    Workload,
    read_trace_file,
    replay_user_trace,
    with_burst,
)
from sloserve.cli import main as cli_main
from sloserve.stepmodel import StepTimeModel

# Idle decode 25 ms, 50 us per prefill token past the knee (as tests/test_bench_workloads.py).
MODEL = StepTimeModel(pieces=[(0.025, 0.0, 0.0, 0.0), (0.005, 5e-5, 0.0, 1e-8)])
IDLE = 0.025


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def replay(trace_path: Path, rate: float = 2.0, count: int = 1000, **kwargs: Any) -> Workload:
    return replay_user_trace(
        read_trace_file(trace_path), model=MODEL, rate=rate, count=count, **kwargs
    )


# A chat agent's log: two conversations of three and two rounds, two one-off requests sharing a
# system prompt, and a reasoning request, in the file out of order.
def row(arrival: float, input_tokens: int, output_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "arrival": arrival,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
    } | extra


SESSIONS = [
    row(0.0, 400, 50, session="a", prefix_hash="sys"),
    row(1.0, 300, 40, session=7, **{"class": "tool-calling"}),
    row(4.0, 500, 60, session="a"),
    row(3.0, 350, 30, session=7, **{"class": "tool-calling"}),
    row(5.0, 600, 70, session=7, **{"class": "tool-calling"}),
    row(6.0, 200, 20, prefix_hash="sys", prefix_tokens=120),
    row(6.5, 250, 25, prefix_hash="sys"),
    row(8.0, 100, 1000, thinking_tokens=900, **{"class": "reasoning"}),
    row(10.0, 700, 80, session="a"),
]


def test_jsonl_and_csv_read_the_same_requests(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "t.jsonl", SESSIONS)
    fields = ["arrival", "input_tokens", "output_tokens", "class", "session", "prefix_hash"]
    fields += ["prefix_tokens", "thinking_tokens"]
    table = [[row.get(f, "") for f in fields] for row in SESSIONS]
    # CSV with blank lines and padded cells: empty cells are absent fields.
    path = write_csv(tmp_path / "t.csv", fields, table)
    path.write_text(path.read_text().replace("\n", "\n\n", 2).replace(",a,", ", a ,"))
    from_jsonl, from_csv = read_trace_file(jsonl), read_trace_file(path)
    assert from_jsonl.format is TraceFormat.JSONL and from_csv.format is TraceFormat.CSV
    assert from_jsonl.arrival_kind is ArrivalKind.SECONDS
    strip = [(r.arrival_ns, r.input_tokens, r.slo_class, r.session, r.prefix_hash)
             for r in from_jsonl.rows]  # fmt: skip
    assert strip == [
        (r.arrival_ns, r.input_tokens, r.slo_class, r.session, r.prefix_hash) for r in from_csv.rows
    ]
    # Sorted by arrival; a missing class is the default one.
    assert [r.arrival_ns for r in from_jsonl.rows] == sorted(r.arrival_ns for r in from_jsonl.rows)
    assert from_jsonl.rows[0].slo_class == DEFAULT_TRACE_CLASS == "chat"
    assert not from_jsonl.truncated


def test_iso_timestamps_are_rebased(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "iso.jsonl",
        [
            {"arrival": "2024-05-01T12:00:01.5Z", "input_tokens": 10, "output_tokens": 5},
            {"arrival": "2024-05-01T14:00:00+02:00", "input_tokens": 10, "output_tokens": 5},
            {"arrival": "2024-05-01 12:00:03", "input_tokens": 10, "output_tokens": 5},
        ],
    )
    trace = read_trace_file(path)
    assert trace.arrival_kind is ArrivalKind.TIMESTAMP
    # 14:00 at +02:00 is 12:00 UTC, the earliest; naive times count as UTC.
    assert trace.offsets_s() == [0.0, 1.5, 3.0]
    assert [r.line for r in trace.rows] == [2, 1, 3]
    workload = replay(path, rate=1.0)  # 2 gaps over 3 s: scaled by 2/3
    assert [r.arrival_s for r in workload.requests] == pytest.approx([0.0, 1.0, 2.0])


def test_sessions_become_rounds_released_by_completion(tmp_path: Path) -> None:
    workload = replay(write_jsonl(tmp_path / "t.jsonl", SESSIONS), rate=0.5)
    workload.validate()
    rounds: dict[int, list[Any]] = {}
    for r in workload.requests:
        if r.session is not None:
            rounds.setdefault(r.session, []).append(r)
    assert [len(v) for v in rounds.values()] == [3, 3]
    conversation, agent = rounds[0], rounds[1]  # numbered in order of first arrival
    assert [r.prompt_tokens for r in conversation] == [400, 500, 700]
    assert [r.round for r in conversation] == [0, 1, 2]
    assert conversation[0].after is None
    for previous, this in itertools.pairwise(conversation):
        assert this.after == previous.index
    # The rate under test is 0.5 req/s; the file's 9 rows over 10 s are 0.8 req/s: every gap
    # stretches by 1.6, the delays between rounds too (4 - 0 and 10 - 4 trace seconds).
    assert [r.delay_s for r in conversation] == pytest.approx([0.0, 6.4, 9.6])
    assert [r.arrival_s for r in workload.requests] == pytest.approx(
        [1.6 * t for t in (0, 1, 3, 4, 5, 6, 6.5, 8, 10)]
    )
    # A tool-calling session: loop rounds at 2x, its last round at 4x, as the scenario.
    assert [r.budgets.tpot_s for r in agent] == pytest.approx([2 * IDLE, 2 * IDLE, 4 * IDLE])
    assert all(r.budgets.tpot_s == pytest.approx(4 * IDLE) for r in conversation)  # chat
    assert workload.source["sessions"] == 2


def test_classes_thinking_and_caps(tmp_path: Path) -> None:
    rows = [
        {"arrival": 0, "input_tokens": 100, "output_tokens": 300, "class": "coding"},
        {"arrival": 1, "input_tokens": 100, "output_tokens": 1000, "class": "reasoning"},
        {"arrival": 2, "input_tokens": 100, "output_tokens": 1000, "class": "reasoning",
         "thinking_tokens": 250},
        {"arrival": 3, "input_tokens": 100, "output_tokens": 40, "class": "coding"},
        {"arrival": 4, "input_tokens": 5000, "output_tokens": 3000, "class": "summarization"},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    workload = replay(path, count=4)
    assert set(workload.classes) == {"coding", "reasoning"}  # the replayed rows' classes
    # One cap per class, from the longest output of the class in the file; never per request.
    assert workload.max_tokens == {"coding": 512, "reasoning": 1024}
    assert [r.max_tokens for r in workload.requests] == [512, 1024, 1024, 512]
    reasoning = [r for r in workload.requests if r.slo_class == "reasoning"]
    assert [r.budgets.thinking_tokens for r in reasoning] == [800, 250]  # default share 80%
    assert all(r.budgets.thinking_tpot_s == pytest.approx(2 * IDLE) for r in reasoning)
    # Lengths scale like every scenario's; the caps follow the scaled lengths.
    small = replay(path, count=5, scale=LengthScale(0.25, 0.25, max_model_len=1024))
    assert [r.output_tokens for r in small.requests] == [75, 250, 250, 10, 750]
    assert small.max_tokens["summarization"] == 1024
    assert small.requests[-1].max_tokens == 1024 - small.requests[-1].prompt_tokens


def test_rate_only_rescales_a_trace(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", SESSIONS)
    slow, fast = replay(path, rate=1.0), replay(path, rate=4.0)
    assert [r.arrival_s / 4 for r in slow.requests] == pytest.approx(
        [r.arrival_s for r in fast.requests]
    )
    assert [r.delay_s / 4 for r in slow.requests] == pytest.approx(
        [r.delay_s for r in fast.requests]
    )
    assert [(r.prompt_tokens, r.budgets, r.after) for r in slow.requests] == [
        (r.prompt_tokens, r.budgets, r.after) for r in fast.requests
    ]
    # A load point replays the first `count` rows by arrival; the rate is theirs.
    first = replay(path, rate=1.0, count=4)
    assert len(first.requests) == 4 and first.source["rows"] == 4
    assert first.requests[-1].arrival_s == pytest.approx(3.0)


def test_prefix_hashes_share_leading_tokens(tmp_path: Path) -> None:
    workload = replay(write_jsonl(tmp_path / "t.jsonl", SESSIONS))
    by_arrival = {r.index: r for r in workload.requests}
    assert workload.describe()["shared_prefixes"] == {"requests": 3, "groups": 1, "tokens": 520}
    # The first round of conversation "a" and the two one-off requests: "sys", default length
    # the group's shortest prompt (200), or the row's own prefix_tokens.
    assert {i: (p.group, p.tokens) for i, p in workload.prefixes.items()} == {
        0: ("sys", 200),
        5: ("sys", 120),
        6: ("sys", 200),
    }
    book = PromptBook(vocab_size=1000, seed=3, prefixes=workload.prefixes)
    prompts = {i: book.prompt(r) for i, r in by_arrival.items()}
    assert prompts[5][:120] == prompts[0][:120] == prompts[6][:120]
    assert prompts[6][:200] == prompts[0][:200]
    assert prompts[5][120:] != prompts[0][120:200]  # only the declared prefix is shared
    assert all(len(prompts[i]) == r.prompt_tokens for i, r in by_arrival.items())
    # A later round extends its previous round (and so keeps the prefix).
    later = next(r for r in workload.requests if r.session == 0 and r.round == 1)
    assert prompts[later.index][:400] == prompts[0]
    # Requests without a hash share nothing; another seed gives another prefix.
    assert prompts[1][:50] != prompts[0][:50]
    other = PromptBook(vocab_size=1000, seed=4, prefixes=workload.prefixes)
    assert other.prompt(by_arrival[5])[:120] != prompts[5][:120]


def test_a_burst_applies_to_a_trace(tmp_path: Path) -> None:
    rows = [{"arrival": i * 0.5, "input_tokens": 50, "output_tokens": 10} for i in range(400)]
    steady = replay(write_jsonl(tmp_path / "t.jsonl", rows), rate=2.0)
    bursty = with_burst(steady, Burst(factor=2.0, duration_s=30.0))
    window = bursty.source["burst"]
    start, end = window["start_s"], window["start_s"] + window["duration_s"]
    inside = [r for r in bursty.requests if start <= r.arrival_s < end]
    assert len(inside) / 30.0 == pytest.approx(4.0, rel=0.05)
    assert bursty.prefixes == steady.prefixes


def error_of(tmp_path: Path, text: str, name: str = "bad.jsonl", **kwargs: Any) -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserTraceError) as caught:
        read_user_trace(path, classes=TRACE_CLASSES, default_class="chat", **kwargs)
    return str(caught.value)


GOOD = '{"arrival": 0, "input_tokens": 10, "output_tokens": 5}\n'


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"arrival": 1, "input_tokens": 10}', "bad.jsonl:3: field 'output_tokens': missing"),
        ('{"arrival": 1, "input_tokens": 10.5, "output_tokens": 5}', "3: field 'input_tokens'"),
        ('{"arrival": 1, "input_tokens": 0, "output_tokens": 5}', "3: field 'input_tokens': 0"),
        ('{"arrival": -1, "input_tokens": 1, "output_tokens": 5}', "3: field 'arrival'"),
        ('{"arrival": "noon", "input_tokens": 1, "output_tokens": 5}', "3: field 'arrival'"),
        (
            '{"arrival": "2024-01-01T00:00:00Z", "input_tokens": 1, "output_tokens": 5}',
            "3: field 'arrival': timestamps, where the rows before gave seconds",
        ),
        (
            '{"arrival": 1, "input_tokens": 1, "output_tokens": 5, "class": "chatt"}',
            "3: field 'class': 'chatt' is not a known SLO class (known: chat, coding,",
        ),
        (
            '{"arrival": 1, "input_tokens": 1, "output_tokens": 5, "output_token": 5}',
            "3: unknown field(s) ['output_token']",
        ),
        (
            '{"arrival": 1, "input_tokens": 1, "output_tokens": 5, "thinking_tokens": 2}',
            "3: field 'thinking_tokens': only class 'reasoning'",
        ),
        (
            '{"arrival": 1, "input_tokens": 8, "output_tokens": 5, "prefix_hash": "p", '
            '"prefix_tokens": 9}',
            "3: field 'prefix_tokens': 9 is more than the row's input_tokens (8)",
        ),
        (
            '{"arrival": 1, "input_tokens": 8, "output_tokens": 5, "prefix_tokens": 4}',
            "3: field 'prefix_tokens': given without a prefix_hash",
        ),
        ('{"arrival": 1, "input_tokens": 8, "output_tokens": 5, "session": [1]}', "'session'"),
        ("[1, 2, 3]", "bad.jsonl:3: a request must be a JSON object"),
        ('{"arrival": 1,', "bad.jsonl:3: not JSON"),
    ],
)
def test_bad_jsonl_rows_name_the_line_and_field(tmp_path: Path, line: str, expected: str) -> None:
    # Line 2 is blank: line numbers count the file's lines, not its requests.
    assert expected in error_of(tmp_path, GOOD + "\n" + line + "\n")


def test_bad_csv_rows_name_the_line(tmp_path: Path) -> None:
    header = "arrival,input_tokens,output_tokens,class\n"
    assert "bad.csv:3: 2 cells under 4 columns" in error_of(
        tmp_path, header + "0,10,5,chat\n1,10\n", "bad.csv"
    )
    assert "bad.csv:3: field 'class': 'batch'" in error_of(
        tmp_path, header + "0,10,5,\n1,10,5,batch\n", "bad.csv"
    )
    assert "bad.csv:1: unknown field(s) ['prompt']" in error_of(
        tmp_path, "arrival,prompt,output_tokens\n0,1,1\n", "bad.csv"
    )
    assert "bad.csv:2: field 'input_tokens': missing" in error_of(
        tmp_path, "arrival,output_tokens\n0,1\n", "bad.csv"
    )
    assert "no requests" in error_of(tmp_path, header, "bad.csv")
    assert "cannot tell the format" in error_of(tmp_path, header, "bad.txt")
    # The suffix can be overridden.
    path = tmp_path / "log.txt"
    path.write_text(header + "0,10,5,coding\n")
    trace = read_user_trace(path, classes=TRACE_CLASSES, default_class="chat", fmt=TraceFormat.CSV)
    assert trace.rows[0].slo_class == "coding"


def test_a_long_file_is_cut_at_the_row_cap(tmp_path: Path) -> None:
    rows = [{"arrival": i, "input_tokens": 10, "output_tokens": 5} for i in range(50)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    # A broken line past the cap is never parsed.
    path.write_text(path.read_text() + "not json\n")
    trace = read_trace_file(path, max_rows=20)
    assert len(trace.rows) == 20 and trace.truncated
    assert trace.describe()["truncated"] is True
    assert not read_trace_file(write_jsonl(tmp_path / "u.jsonl", rows), max_rows=50).truncated


# -- the CLIs ----------------------------------------------------------------------------------


def simulate(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "out"
    argv = ["simulate", *args, "--policy", "sloserve,vllm-default", "--out", str(out)]
    assert cli_main(argv) == 0
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


def test_simulate_reasoning_burst(tmp_path: Path) -> None:
    summary = simulate(
        tmp_path, "--scenario", "reasoning-burst", "--rate", "2", "--requests", "200"
    )
    assert summary["scenario"] == "reasoning-burst"
    assert summary["workload"]["classes"].keys() == {"chat", "reasoning"}
    for result in summary["policies"].values():
        assert result["stats"]["records"] == 200
        assert set(result["stats"]["classes"]) == {"chat", "reasoning"}


def test_simulate_a_trace_file_with_a_burst(tmp_path: Path) -> None:
    rows = [
        {"arrival": i * 0.4, "input_tokens": 300 + 7 * (i % 11), "output_tokens": 20 + i % 13,
         "class": "coding" if i % 3 else "chat", "session": f"s{i % 40}" if i % 5 == 0 else None,
         "prefix_hash": "sys" if i % 4 == 0 else None}
        for i in range(150)
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    args = ["--trace-file", str(path), "--rate", "3", "--requests", "120"]
    summary = simulate(tmp_path, *args, "--burst-factor", "2", "--burst-duration", "8")
    assert summary["scenario"] == "trace:mine.jsonl"
    workload = summary["workload"]
    assert workload["source"]["burst"]["factor"] == 2.0
    assert workload["source"]["rows"] == 120 and workload["source"]["format"] == "jsonl"
    assert set(workload["classes"]) == {"chat", "coding"}
    for result in summary["policies"].values():
        assert result["stats"]["records"] == 120


def test_the_clis_name_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + '{"arrival": 1, "input_tokens": 1, "output_tokens": 5, "class": "x"}\n')
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: field 'class'"):
        cli_main(["simulate", "--trace-file", str(bad), "--rate", "1", "--out", out])
    with pytest.raises(SystemExit, match=r"bad\.jsonl:2: field 'class'"):
        cli_main(["bench", "run", "--trace-file", str(bad), "--target", "openai:x", "--out", out])
    with pytest.raises(SystemExit, match="one of --scenario and --trace-file"):
        cli_main(["simulate", "--rate", "1", "--out", out])
    with pytest.raises(SystemExit, match="go with --burst-factor"):
        cli_main(["simulate", "--scenario", "chatbot", "--burst-duration", "30", "--out", out])
    with pytest.raises(SystemExit, match="burst factor must be positive"):
        cli_main(["simulate", "--scenario", "chatbot", "--burst-factor", "0", "--out", out])
    at_once = write_jsonl(tmp_path / "batch.jsonl", [row(5.0, 10, 5), row(5.0, 20, 5)])
    with pytest.raises(SystemExit, match="every request arrives at the same time"):
        cli_main(["simulate", "--trace-file", str(at_once), "--rate", "1", "--out", out])
    with pytest.raises(SystemExit, match="cannot read"):
        cli_main(["simulate", "--trace-file", str(tmp_path / "no.csv"), "--out", out])


def test_bench_builds_its_load_points_from_a_trace_file(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers(dest="command"))
    path = write_jsonl(tmp_path / "t.jsonl", SESSIONS)
    argv = ["bench", "run", "--trace-file", str(path), "--target", "openai:x", "--out", "o"]
    args = parser.parse_args([*argv, "--burst-factor", "3", "--burst-duration", "2"])
    choice = workload_options.resolve(args)
    assert args.scenario == "trace:t.jsonl" and choice.burst == Burst(3.0, 2.0)
    workload = bench_cli._workload(args, MODEL, 1.0, 5)
    assert len(workload.requests) == 5 and workload.source["burst"]["factor"] == 3.0
    # The bench's CPU scaling applies, prefixes included.
    assert workload.requests[0].prompt_tokens == 50  # 400 / 8
    assert workload.prefixes[0].tokens == 25  # the group's shortest replayed prompt, 200 / 8
    assert workload_options.resolve(args) is choice  # the file is read once


class _RecordingTarget:
    """Serves every request at once, noting when it came and with what prompt."""

    name = "fake"

    def __init__(self) -> None:
        self.prompts: dict[int, list[int]] = {}
        self.sent_at: dict[int, float] = {}
        self.done_at: dict[int, float] = {}

    async def send(self, request: BenchRequest, prompt: list[int], record: RequestRecord) -> None:
        self.prompts[request.index] = prompt
        self.sent_at[request.index] = time.time()
        record.token_times.extend(time.time() for _ in range(request.output_tokens))
        record.completed = True
        record.finished_at = self.done_at[request.index] = time.time()

    async def close(self) -> None:
        return None


def test_the_bench_client_replays_sessions_and_prefixes(tmp_path: Path) -> None:
    # 9 rows over 10 s at 20 req/s: the replay takes 0.4 s.
    workload = replay(write_jsonl(tmp_path / "t.jsonl", SESSIONS), rate=20.0)
    target = _RecordingTarget()
    book = PromptBook(vocab_size=1000, seed=1, prefixes=workload.prefixes)
    records = asyncio.run(run(target, workload.requests, book))
    assert all(r.completed for r in records) and len(records) == 9
    for r in workload.requests:
        assert len(target.prompts[r.index]) == r.prompt_tokens
        if r.after is not None:  # sent once the round before completed, after its delay
            assert target.sent_at[r.index] >= target.done_at[r.after] + r.delay_s - 0.005
            previous = target.prompts[r.after]
            assert target.prompts[r.index][: len(previous)] == previous
    assert target.prompts[5][:120] == target.prompts[0][:120] == target.prompts[6][:120]

"""Report files: JSON results, Markdown tables, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sloserve.bench.analysis import RunStats, analyze
from sloserve.bench.capacity import find_capacity
from sloserve.bench.report import (
    AttainmentRow,
    CapacityRow,
    capacity_table,
    markdown_table,
    outcome_table,
    plot_attainment,
    plot_latency_distributions,
    rows_from_capacity,
    write_results,
)
from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.slo import Budgets


def make_record(index: int, slo_class: str, ttft: float, tpot: float) -> RequestRecord:
    request = BenchRequest(index, slo_class, Budgets(1.0, 0.1), 16, 8, float(index))
    times = [index + ttft + k * tpot for k in range(8)]
    return RequestRecord(request, float(index), times, times[-1], completed=True)


def records(scale: float) -> list[RequestRecord]:
    """Two classes, latencies growing with the index (so the CDFs have a spread)."""
    return [
        make_record(i, "chat" if i % 2 else "coding", scale * (0.1 + 0.01 * i), scale * 0.02)
        for i in range(40)
    ]


def test_write_results_is_stable_json(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "results.json"
    payload = {"b": 1, "a": {"z": [1.5, None], "y": "text"}}
    write_results(out, payload)
    text = out.read_text()
    assert json.loads(text) == payload
    assert text.index('"a"') < text.index('"b"') and text.index('"y"') < text.index('"z"')
    assert text.endswith("}\n") and '\n  "a": {' in text  # indent 2
    with pytest.raises(ValueError):
        write_results(out, {"x": float("nan")})


def test_write_results_takes_run_stats_json(tmp_path: Path) -> None:
    stats = analyze(records(1.0))
    write_results(tmp_path / "run.json", {"stats": stats.to_json()})
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["stats"]["classes"]["chat"]["attainment"] == 1.0


def test_markdown_attainment_table() -> None:
    rows = [
        AttainmentRow("sloserve", 2.0, {"chat": 0.95, "coding": 0.9}, True, True),
        AttainmentRow("vllm", 1.0, {"chat": 1.0}),
        AttainmentRow("sloserve", 1.0, {"chat": 1.0, "coding": 1.0}, True, True),
        AttainmentRow("vllm", 2.0, {"chat": 0.5, "coding": 0.25}, False, False),
    ]
    assert markdown_table(rows) == (
        "| system | rate (req/s) | chat | coding | drained | passed |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        "| sloserve | 1 | 100.0% | 100.0% | yes | yes |\n"
        "| sloserve | 2 | 95.0% | 90.0% | yes | yes |\n"
        "| vllm | 1 | 100.0% | - | yes | - |\n"
        "| vllm | 2 | 50.0% | 25.0% | no | no |\n"
    )


def test_outcome_table_shows_where_each_request_went() -> None:
    records = [make_record(i, "chat", ttft=0.2, tpot=0.05) for i in range(3)]
    records.append(make_record(3, "chat", ttft=2.0, tpot=0.05))  # late
    turned_away = make_record(4, "chat", ttft=0.2, tpot=0.05)
    turned_away.token_times, turned_away.completed = [], False
    turned_away.rejected, turned_away.reject_reason = True, "COMPUTE"
    table = outcome_table(analyze([*records, turned_away], trim_fraction=0.0))
    row = table.splitlines()[2]
    assert row == "| chat | 5 | 60.0% | 4 | 75.0% | 1 | 1 (COMPUTE 1) | 0 | 0 | 0 |"


def test_capacity_table_with_fluid_bound_and_baseline() -> None:
    rows = [
        CapacityRow("sloserve", 6.0, 4.0),
        CapacityRow("vllm", 3.0, 1.5),
        CapacityRow("vllm-priority", 0.0, lower_bound=False),
        CapacityRow("oracle", 12.0, lower_bound=True),
        CapacityRow("vllm-budget", 0.0, below=3.0),
    ]
    table = capacity_table(rows, fluid_bound=12.0, baselines=["vllm"])
    assert table.splitlines() == [
        "| system | capacity (req/s) | capacity @99% (req/s) | of fluid bound | vs vllm |",
        "| --- | --- | --- | --- | --- |",
        "| sloserve | 6 | 4 | 50.0% | 2.00x |",
        "| vllm | 3 | 1.5 | 25.0% | 1.00x |",
        "| vllm-priority | 0 | - | 0.0% | 0.00x |",
        "| oracle | >= 12 | - | >= 100.0% | 4.00x |",
        "| vllm-budget | < 3 | - | < 25.0% | 0.00x |",
    ]
    no_bound = capacity_table(rows[:2])
    assert "| sloserve | 6 | 4 | - |" in no_bound
    with pytest.raises(ValueError, match="baselines"):
        capacity_table(rows, baselines=["sglang"])


def test_zero_baseline_gives_no_ratio() -> None:
    rows = [CapacityRow("a", 2.0), CapacityRow("b", 0.0)]
    assert "| a | 2 | - | - | - |" in capacity_table(rows, baselines=["b"])


def test_rows_from_capacity_search() -> None:
    def run_at(rate: float) -> RunStats:
        return analyze(records(1.0 if rate <= 3.0 else 20.0), trim_fraction=0.0)

    result = find_capacity(run_at, low=1.0)
    rows = rows_from_capacity("sloserve", result)
    assert [r.rate for r in rows] == [t.rate for t in result.trials]
    assert [r.passed for r in rows] == [r.rate <= 3.0 for r in rows]
    assert "| sloserve | 4 | 0.0% | 0.0% | yes | no |" in markdown_table(rows)  # late, drained
    assert CapacityRow.from_result("sloserve", result).capacity == result.capacity


def open_png(path: Path) -> tuple[int, int]:
    image_module = pytest.importorskip("PIL.Image")
    assert path.stat().st_size > 0
    with image_module.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        width, height = image.size
        return int(width), int(height)


def test_plot_attainment_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    series = {
        "sloserve": [(4.0, {"chat": 0.8, "coding": 0.7}), (1.0, {"chat": 1.0, "coding": 1.0})],
        "vllm": [(1.0, {"chat": 0.97}), (4.0, {"chat": 0.3, "coding": 0.1})],
    }
    out = tmp_path / "plots" / "attainment.png"
    plot_attainment(out, series)
    width, height = open_png(out)
    assert width > 400 and height > 300


def test_plot_latency_distributions_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "latency.png"
    plot_latency_distributions(out, {"sloserve": records(1.0), "vllm": records(2.0)})
    width, height = open_png(out)
    assert width > height  # two panels side by side


def test_plots_survive_empty_input(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot_attainment(tmp_path / "a.png", {})
    plot_latency_distributions(tmp_path / "l.png", {"none": []})
    assert open_png(tmp_path / "a.png") and open_png(tmp_path / "l.png")

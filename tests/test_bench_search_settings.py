"""`bench compare` and `bench run --sweep` search settings: start rates per system, the growth
factor, and a comparison's summary written after every system (so a long run cut short keeps
what it finished)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from bench_helpers import fake_stats

from sloserve.bench import cli as bench_cli
from sloserve.bench.capacity import CapacityResult, find_capacity
from sloserve.stepmodel import shipped_profile


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "compare", "--scenario", "mixed", "--out", "x", *argv])


def test_one_start_rate_applies_to_every_system() -> None:
    args = _parse("--start-rate", "2.5")
    mode = bench_cli._mode(args)
    assert bench_cli._start_rate(args, mode, fluid=20.0, system="sloserve") == 2.5
    assert bench_cli._start_rate(args, mode, fluid=20.0, system="vllm-default") == 2.5


def test_start_rates_per_system_fall_back_to_the_default_and_then_the_fluid_bound() -> None:
    args = _parse("--quick", "--start-rate", "vllm-default=1.7,sloserve=5.6")
    mode = bench_cli._mode(args)
    assert bench_cli._start_rate(args, mode, 20.0, "vllm-default") == 1.7
    assert bench_cli._start_rate(args, mode, 20.0, "sloserve") == 5.6
    # not named: a quarter of the fluid bound, as with no --start-rate at all
    assert bench_cli._start_rate(args, mode, 20.0, "vllm-priority") == 5.0
    with_default = _parse("--start-rate", "3,sloserve=5.6")
    assert bench_cli._start_rate(with_default, mode, 20.0, "vllm-priority") == 3.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("vllm-fast=2", "unknown system 'vllm-fast'"),
        ("sloserve=fast", "'fast' is not a rate"),
        ("sloserve=0", "must be positive"),
    ],
)
def test_a_bad_start_rate_is_refused_naming_the_problem(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _parse("--start-rate", value)
    assert message in capsys.readouterr().err


def test_growth_replaces_the_modes_step_and_is_recorded_with_it() -> None:
    args = _parse("--quick", "--growth", "1.25")
    assert bench_cli._mode(args).growth == 1.25
    assert bench_cli._mode(_parse("--quick")).growth == bench_cli.QUICK.growth
    with pytest.raises(SystemExit):
        _parse("--growth", "1")


def test_a_compare_cut_short_leaves_the_finished_systems_in_its_summary(tmp_path: Path) -> None:
    args = _parse("--quick", "--out", str(tmp_path))
    args.out = tmp_path
    mode = bench_cli._mode(args)
    model = shipped_profile("cpu-bench")
    reference = bench_cli._workload(args, model, 1.0, mode.requests)
    planned = ["vllm-default", "vllm-priority", "sloserve"]

    def capacity(of: float) -> CapacityResult:
        return find_capacity(lambda rate: fake_stats({"chat": 1.0 if rate <= of else 0.5}), 1.0)

    results = {"vllm-default": capacity(2.0), "sloserve": capacity(5.0)}
    markdown = bench_cli._write_compare(
        args,
        mode,
        model,
        reference,
        results,
        10.0,
        1,
        {},
        planned,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["systems_pending"] == ["vllm-priority"]
    assert set(summary["systems"]) == {"vllm-default", "sloserve"}
    default = summary["systems"]["vllm-default"]["capacity_rps"]
    assert summary["headline"]["sloserve_vs_vllm_default"] == pytest.approx(
        summary["systems"]["sloserve"]["capacity_rps"] / default
    )
    assert "Still to run: vllm-priority" in markdown
    assert (tmp_path / "summary.md").read_text() == markdown


def test_a_baseline_failing_down_to_the_min_rate_gives_a_floor_on_the_ratio(
    tmp_path: Path,
) -> None:
    args = _parse("--quick", "--min-rate", "1.0")
    args.out = tmp_path
    mode = bench_cli._mode(args)
    model = shipped_profile("cpu-bench")
    reference = bench_cli._workload(args, model, 1.0, mode.requests)
    never = fake_stats({"coding": 0.85})
    vllm = find_capacity(lambda rate: never, low=2.0, min_rate=args.min_rate)
    assert [t.rate for t in vllm.trials] == [2.0, 1.0]  # stops at the floor, not at 2/64
    assert vllm.status == "below_min_rate" and vllm.lowest_failing == 1.0
    ours = find_capacity(lambda rate: fake_stats({"coding": 0.95 if rate <= 5.6 else 0.8}), 5.6)
    results = {"vllm-default": vllm, "vllm-priority": vllm, "sloserve": ours}
    planned = list(results)
    markdown = bench_cli._write_compare(args, mode, model, reference, results, 10.0, 1, {}, planned)
    headline = json.loads((tmp_path / "summary.json").read_text())["headline"]
    assert headline["sloserve_vs_vllm_default"] is None  # no capacity to divide by
    assert headline["sloserve_vs_vllm_default_at_least"] == pytest.approx(ours.capacity / 1.0)
    assert headline["sloserve_vs_best_tuned_vllm_at_least"] == pytest.approx(ours.capacity)
    assert "| vllm-default | < 1 |" in markdown
    assert f"> {ours.capacity:.2f}x" in markdown

    # sloserve failing every rate too: no floor, rather than a floor of 0
    failing = find_capacity(lambda rate: never, low=5.1, min_rate=args.min_rate)
    results["sloserve"] = failing
    bench_cli._write_compare(args, mode, model, reference, results, 10.0, 1, {}, planned)
    headline = json.loads((tmp_path / "summary.json").read_text())["headline"]
    assert headline["sloserve_vs_vllm_default_at_least"] is None
    assert headline["sloserve_vs_best_tuned_vllm_at_least"] is None


def test_the_mode_note_names_each_way_the_search_departs_from_the_methodology() -> None:
    quick = bench_cli._mode_note(bench_cli._mode(_parse("--quick")))
    assert "40 requests per load point" in quick and "10.0% resolution" in quick
    thousand_a_point = _parse("--quick", "--load-point-requests", "1000")
    thousand = bench_cli._mode_note(bench_cli._mode(thousand_a_point))
    assert "requests per load point" not in thousand  # 1,000 is what the methodology asks
    assert "10.0% resolution, coarser than 2.5%" in thousand and "one seed" in thousand
    assert bench_cli._mode_note(bench_cli.FULL).startswith("the methodology's search")

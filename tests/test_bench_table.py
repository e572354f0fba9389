"""`sloserve bench table`: several scenarios' `bench compare` summaries in one table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sloserve.bench.scenario_table import TableError, load_row, markdown, to_json


def _summary(folder: Path, scenario: str, capacity: dict[str, float | None], best: str) -> Path:
    """A summary as `bench compare` writes it; capacity None: the search found no failing
    rate (the value then is 10 req/s, a lower bound)."""
    folder.mkdir(parents=True)
    systems = {
        name: {
            "capacity_rps": 10.0 if rps is None else rps,
            "search": {"lowest_failing_rps": None if rps is None else rps * 1.1},
        }
        for name, rps in capacity.items()
    }
    summary = {
        "scenario": scenario,
        "systems": systems,
        "best_tuned_vllm": best,
        "requests_per_load_point": 100,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_rows_ratios_and_geometric_means(tmp_path: Path) -> None:
    a = _summary(
        tmp_path / "a",
        "coding",
        {"vllm-default": 4.0, "vllm-budget-512": 5.0, "sloserve": 16.0},
        "vllm-budget-512",
    )
    b = _summary(
        tmp_path / "b",
        "tool-calling",
        {"vllm-default": None, "vllm-budget-512": None, "sloserve": None},
        "vllm-budget-512",
    )
    rows = [load_row(a), load_row(b)]
    assert rows[0].ratio("vllm-default") == 4.0 and rows[0].ratio("vllm-budget-512") == 3.2
    assert rows[1].lower_bounds == {"vllm-default", "vllm-budget-512", "sloserve"}
    table = markdown(rows)
    header, _, coding, tools, _, mean = table.splitlines()
    assert header.split(" | ")[1:4] == ["vllm-default", "vllm-budget-512", "sloserve"]
    assert coding == "| coding | 4 | 5 | 16 | 4.00x | 3.20x (vllm-budget-512) |"
    assert tools.startswith("| tool-calling | ≥10 | ≥10 | ≥10 | 1.00x |")
    assert mean.endswith(f"vllm-default {math.sqrt(4.0):.2f}x, sloserve / best tuned 1.79x")
    means = to_json(rows)["geometric_mean"]
    assert means["sloserve/vllm-default"] == pytest.approx(2.0)
    assert means["sloserve/best_tuned"] == pytest.approx(math.sqrt(3.2))


def test_a_folder_without_a_compare_summary_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="not a `bench compare` summary"):
        load_row(tmp_path)
    no_baseline = _summary(tmp_path / "x", "chatbot", {"sloserve": 3.0}, "vllm-budget-512")
    with pytest.raises(TableError, match="has no vllm-default"):
        load_row(no_baseline)


def test_command_writes_the_table(tmp_path: Path) -> None:
    run = _summary(
        tmp_path / "run", "mixed", {"vllm-default": 2.0, "sloserve": 5.0}, "vllm-budget-512"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "sloserve", "bench", "table", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| mixed | 2 | 5 | 2.50x | - |" in done.stdout  # no tuned variant in the run
    assert (out / "table.md").read_text() == done.stdout
    assert json.loads((out / "table.json").read_text())["scenarios"][0]["scenario"] == "mixed"
    bad = subprocess.run(
        [sys.executable, "-m", "sloserve", "bench", "table", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "not a `bench compare` summary" in bad.stderr


def test_a_baseline_below_every_rate_tried_gives_floors(tmp_path: Path) -> None:
    coding = _summary(
        tmp_path / "coding", "coding", {"vllm-default": 4.0, "sloserve": 16.0}, "vllm-default"
    )
    mixed = _summary(
        tmp_path / "mixed", "mixed", {"vllm-default": 0.0, "sloserve": 6.0}, "vllm-default"
    )
    summary = json.loads((mixed / "summary.json").read_text())
    summary["systems"]["vllm-default"]["search"] = {
        "status": "below_min_rate",
        "lowest_failing_rps": 2.0,
    }
    # As `bench compare` writes them: 6.0 / 2.0 for both, vllm-default being the only variant.
    summary["headline"] = {
        "sloserve_vs_vllm_default_at_least": 3.0,
        "sloserve_vs_best_tuned_vllm_at_least": 3.0,
    }
    (mixed / "summary.json").write_text(json.dumps(summary))
    rows = [load_row(coding), load_row(mixed)]
    assert rows[1].ratio("vllm-default") is None and rows[1].to_default() == (3.0, True)
    assert rows[0].to_default() == (4.0, False)
    lines = markdown(rows).splitlines()
    assert lines[3] == "| mixed | <2 | 6 | > 3.00x | > 3.00x (vllm-default) |"
    mean = f"{math.sqrt(12.0):.2f}x"  # over 4.00x and the floor 3.00x: a floor too
    assert lines[-1].endswith(f"vllm-default > {mean}, sloserve / best tuned > {mean}")
    as_json = to_json(rows)
    assert as_json["scenarios"][1]["sloserve/vllm-default_at_least"] == 3.0
    assert as_json["geometric_mean"]["sloserve/vllm-default"] == pytest.approx(math.sqrt(12.0))
    assert as_json["geometric_mean"]["sloserve/vllm-default_is_floor"] is True

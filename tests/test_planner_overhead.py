"""`sloserve bench planner`: the policy timed at a steady load (small sizes; the figures
themselves come from the benchmark command, not from tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sloserve.bench import planner_overhead
from sloserve.stepmodel import shipped_profile


def test_measure_keeps_the_load_and_times_plans_and_admissions() -> None:
    model = shipped_profile("gpu-llama-3-8b-a100-vidur")
    result = planner_overhead.measure(model, running=32, steps=200)
    assert result.steps == 200 and result.arrivals > 0
    for quantiles in (result.plan_ms, result.admission_ms):
        assert 0 < quantiles["p50"] <= quantiles["p99"] <= quantiles["max"]


def test_cli_writes_json_and_a_table(tmp_path: Path) -> None:
    out = tmp_path / "planner"
    done = subprocess.run(
        [sys.executable, "-m", "sloserve", "bench", "planner", "--running", "16,32",
         "--steps", "50", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "| 16 | 50 |" in done.stdout and "| 32 | 50 |" in done.stdout
    payload = json.loads((out / "planner.json").read_text())
    assert [r["running"] for r in payload["results"]] == [16, 32]
    assert payload["profile"]["hardware"] and payload["machine"].startswith("CPU ")

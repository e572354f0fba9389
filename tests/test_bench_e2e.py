"""The benchmark harness against real servers: a sloserve replica and stock vLLM's server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Replica

from sloserve.bench.systems import SYSTEMS, EngineShape, running


def _bench_run(
    target: str, model: Path, profile: Path, out: Path, *extra: str
) -> dict[str, object]:
    run = subprocess.run(
        [
            sys.executable, "-m", "sloserve", "bench", "run", "--scenario", "chatbot",
            "--target", target, "--rate", "4", "--requests", "12", "--quick",
            "--model", str(model), "--profile", str(profile), "--out", str(out), *extra,
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return dict(json.loads((out / "results.json").read_text()))


def _check(results: dict[str, object], out: Path) -> None:
    stats = results["stats"]
    assert isinstance(stats, dict)
    chat = stats["classes"]["chat"]
    # Every analyzed request ended explicitly: served with all its tokens or turned away at
    # admission; none lost, none failed. The run is light, but its TTFT budgets are a few
    # milliseconds of the tiny model's prefill: on a noisy machine sloserve may turn one away.
    assert chat["arrived"] >= 8
    assert chat["errors"] == 0 and chat["incomplete"] == 0
    assert chat["rejected"] <= chat["arrived"] // 4
    assert chat["ttft_s"]["p50"] > 0
    assert stats["drain"]["drained"] is True
    assert (out / "latency.png").stat().st_size > 0
    assert (out / "results.md").read_text().startswith("| system |")
    # The request log has one line per request of the run (the first and last 10% that the
    # tables trim included), each judged as the tables are.
    lines = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert sorted(e["index"] for e in lines) == list(range(12))
    overload = results["overload"]
    assert isinstance(overload, dict)
    assert sum(e["outcome"] == "rejected" for e in lines) == overload["rejected"]
    assert sum(e["outcome"] == "best_effort" for e in lines) == overload["best_effort"]
    served = [e for e in lines if e["outcome"] in ("good", "late")]
    assert served
    for entry in served:
        assert entry["tokens_received"] == entry["output_tokens"]
        assert (entry["outcome"] == "good") == (entry["first_late_token"] is None)
        assert (entry["worst_margin_s"] >= 0) == (entry["outcome"] == "good")


def test_bench_run_against_a_sloserve_replica(
    replica: Replica, tiny_model: Path, tiny_profile: Path, tmp_path: Path
) -> None:
    results = _bench_run(f"sloserve:{replica.endpoint}", tiny_model, tiny_profile, tmp_path)
    _check(results, tmp_path)
    assert results["workload"]["name"] == "chatbot"  # type: ignore[index]


@pytest.fixture(scope="module")
def stock_vllm(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    shape = EngineShape(model=tiny_model, max_model_len=1024, kv_cache_gib=0.25)
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with running(SYSTEMS["vllm-default"], shape, log) as target:
        yield target


def test_bench_run_against_stock_vllm_server(
    stock_vllm: str, tiny_model: Path, tiny_profile: Path, tmp_path: Path
) -> None:
    assert stock_vllm.startswith("openai:http://127.0.0.1:")
    _check(_bench_run(stock_vllm, tiny_model, tiny_profile, tmp_path), tmp_path)

"""What `bench compare` starts, without starting it: sloserve replicas plan with the profile the
bench scales SLOs by, and replicas sharing a machine get cores of their own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from sloserve.bench import cli as bench_cli
from sloserve.bench import systems
from sloserve.bench.systems import SYSTEMS, EngineShape
from sloserve.stepmodel import shipped_profile, shipped_profile_path


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", "compare", "--scenario", "mixed", "--out", "x", *argv])


def _flag(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def test_replicas_plan_with_the_profile_the_slos_are_scaled_by(tmp_path: Path) -> None:
    default = bench_cli._engine_shape(_parse())
    assert default.profile == shipped_profile_path(bench_cli.DEFAULT_PROFILE)
    given = tmp_path / "measured.json"
    shape = bench_cli._engine_shape(_parse("--profile", str(given)))
    assert shape.profile == given
    replica = systems._command(SYSTEMS["sloserve"], shape, 50051)
    assert _flag(replica, "--profile") == str(given)
    ablation = systems._command(SYSTEMS["sloserve-vllm-policy"], shape, 50051)
    assert _flag(ablation, "--profile") == str(given)
    # stock vLLM has no profile to take
    assert "--profile" not in systems._command(SYSTEMS["vllm-default"], shape, 8000)


def test_a_shape_without_a_profile_leaves_the_replica_its_own_default(tmp_path: Path) -> None:
    shape = EngineShape(model=tmp_path, max_model_len=1024)
    assert "--profile" not in systems._replica_command(shape, 50051)


def test_a_profile_without_the_per_request_cost_is_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partial = tmp_path / "partial.json"
    model = shipped_profile("gpu-llama-3-8b-a100-vidur")
    del model.metadata["request_overhead_s"]  # as a hand-written profile may leave it out
    model.save(partial)
    bench_cli._load_profile(partial)
    assert "has no request_overhead_s" in capsys.readouterr().err
    bench_cli._load_profile(None)  # the shipped bench profile carries it
    assert capsys.readouterr().err == ""


def test_compare_over_seeds_searches_each_system_on_each_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring of `bench compare --seeds` (protocol.py is tested on its own): each search
    runs on a freshly started system with its seed's stream, and summary.json carries the
    paired ratios. The servers are stood in for; the searches are real."""
    from contextlib import contextmanager

    from bench_helpers import fake_stats

    started: list[str] = []
    seen: list[tuple[str, int]] = []
    capacity = {"sloserve": 4.0, "vllm-default": 2.0, "vllm-budget-512": 2.5}

    @contextmanager
    def system(spec: systems.SystemSpec, *_: object):  # type: ignore[no-untyped-def]
        started.append(spec.name)
        yield spec.name

    def run_once(target: str, workload: object, *_: object, **__: object) -> str:
        seen.append((target, args_seed[0]))
        return target

    args_seed = [0]
    real_workload = bench_cli._workload

    def workload(args: argparse.Namespace, *rest: object) -> object:
        args_seed[0] = args.seed
        return real_workload(args, *rest)  # type: ignore[arg-type]

    def analyze(target: str) -> object:
        rate = rates[-1]
        return fake_stats({"chat": 0.95 if rate <= capacity[target] else 0.5})

    rates: list[float] = []
    from sloserve.bench.capacity import find_capacity as real_search

    def find_capacity(run_at, **kwargs):  # type: ignore[no-untyped-def]
        def tracked(rate: float):  # type: ignore[no-untyped-def]
            rates.append(rate)
            return run_at(rate)

        return real_search(tracked, **kwargs)

    monkeypatch.setattr(bench_cli, "_system", system)
    monkeypatch.setattr(bench_cli, "_run_once", run_once)
    monkeypatch.setattr(bench_cli, "_workload", workload)
    monkeypatch.setattr(bench_cli, "analyze", analyze)
    monkeypatch.setattr(bench_cli, "find_capacity", find_capacity)
    out = tmp_path / "out"
    args = _parse("--seeds", "0,1", "--systems", "vllm-default,vllm-budget-512,sloserve",
                  "--quick", "--start-rate", "1.0")  # fmt: skip
    args.out = out
    assert bench_cli.compare_command(args) == 0
    # every system started once per seed, rotated: the second seed starts with another system
    assert len(started) == 6 and set(started[:3]) == set(started[3:]) == set(capacity)
    assert started[:3] != started[3:]
    assert {seed for _, seed in seen} == {0, 1}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["searches_pending"] == []
    assert summary["best_tuned_vllm"] == "vllm-budget-512"
    headline = summary["headline"]["sloserve_vs_vllm_default"]
    assert headline["point_estimate"] and headline["ratio"] == pytest.approx(2.0, rel=0.15)
    assert "sloserve vs best tuned vllm (vllm-budget-512)" in (out / "summary.md").read_text()

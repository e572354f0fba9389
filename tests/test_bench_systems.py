"""What `bench compare` starts, without starting it: sloserve replicas plan with the profile the
bench scales SLOs by, and replicas sharing a machine get cores of their own."""

from __future__ import annotations

import argparse
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

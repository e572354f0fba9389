"""The virtual engine and `sloserve simulate`: policies driven step by step on a virtual clock.

Every check is computed from a simulation of the shipped CPU profile on synthetic workloads
(no trace files, no vLLM), so each test takes a second or two.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

from sloserve.bench.analysis import analyze, is_good
from sloserve.bench.capacity import fluid_bound
from sloserve.bench.cli import CPU_LENGTH_SCALE
from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.bench.workloads import build_scenario
from sloserve.cli import main as cli_main
from sloserve.replica.planner import StepPlan
from sloserve.replica.slo_request import SloRequest
from sloserve.simulator import SimResult, SimulationError, StepNoise, VirtualEngine, simulate
from sloserve.simulator_policies import EngineLimits, VllmConfig, VllmScheduler, make_policy
from sloserve.stepmodel import StepTimeModel, shipped_profile

KV_TOKENS = 116_508  # the CLI's default: the bench model in a 1 GiB cache
MIXED_CLASSES = {"chat", "coding", "reasoning", "summarization", "tool-calling"}


@cache
def _model() -> StepTimeModel:
    return shipped_profile("cpu-bench")


def _limits(kv_tokens: int = KV_TOKENS) -> EngineLimits:
    return EngineLimits.from_profile(_model(), kv_tokens)


def _mixed(rate: float, count: int, seed: int = 0) -> list[BenchRequest]:
    """The mixed scenario as `bench run` builds it on the CPU profile (synthetic: no traces)."""
    return build_scenario(
        "mixed",
        model=_model(),
        rate=rate,
        count=count,
        seed=seed,
        scale=CPU_LENGTH_SCALE,
        chunk_tokens=_limits().max_step_tokens,
    ).requests


def _fluid_rate(requests: Sequence[BenchRequest]) -> float:
    """The §6 bound of the workload: no policy can serve more, so it is above capacity."""
    prompt = statistics.fmean(r.prompt_tokens for r in requests)
    output = statistics.fmean(r.output_tokens for r in requests)
    tightest = min(min(r.budgets.tpot_s, r.budgets.thinking_tpot_s or 1e9) for r in requests)
    limits = _limits()
    return fluid_bound(_model(), prompt, output, tightest, limits.max_running, prompt + output / 2)


def _served_in_class(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if not r.rejected and not r.best_effort and not r.error]


def _check_tokens(result: SimResult) -> None:
    """Every completed request got exactly its tokens, in time order, after it arrived."""
    for record in result.records:
        if not record.completed:
            assert record.rejected or record.error, record
            continue
        times = record.token_times
        assert len(times) == record.request.output_tokens
        assert times[0] > record.sent_at
        assert all(a < b for a, b in itertools.pairwise(times))
        assert record.finished_at == times[-1]


def test_low_rate_meets_every_slo() -> None:
    result = simulate(_mixed(rate=0.05, count=100), _model(), _limits(), "sloserve")
    stats = analyze(result.records)
    assert set(stats.attainment) == MIXED_CLASSES
    assert all(a == 1.0 for a in stats.attainment.values()), stats.attainment
    assert stats.meets() and stats.drain.drained
    assert result.stats.steps > 0 and result.stats.preemptions == {"best_effort": 0, "admitted": 0}


def test_overload_rejects_and_keeps_admitted_on_time() -> None:
    probe = _mixed(rate=1.0, count=150)
    rate = _fluid_rate(probe)  # an upper bound on any policy's capacity
    requests = _mixed(rate=rate, count=150)
    slo = simulate(requests, _model(), _limits(), "sloserve")
    fcfs = simulate(requests, _model(), _limits(), "vllm-default")

    rejected = [r for r in slo.records if r.rejected]
    assert rejected and all(r.reject_reason == "COMPUTE" for r in rejected)
    served = _served_in_class(slo.records)
    assert sum(map(is_good, served)) / len(served) >= 0.9
    # A session whose round was turned away sends it again as best effort and goes on
    # once that retry has run: the round stays a rejection, its later rounds are sent.
    by_index = {r.request.index: r for r in slo.records}
    retried = [r for r in rejected if r.retry_completed]
    assert retried
    for record in slo.records:
        after = by_index.get(record.request.after) if record.request.after is not None else None
        if after is not None and after.rejected:
            assert after.retry_completed
            assert record.sent_at >= (after.finished_at or 0.0)
            assert not record.error.startswith("session stopped")

    assert not any(r.rejected for r in fcfs.records)  # stock vLLM admits everything
    slo_stats, fcfs_stats = analyze(slo.records), analyze(fcfs.records)
    assert fcfs_stats.overall_attainment is not None and slo_stats.overall_attainment is not None
    assert fcfs_stats.overall_attainment < slo_stats.overall_attainment
    assert min(fcfs_stats.attainment.values()) < min(slo_stats.attainment.values())


@pytest.mark.parametrize("policy", ["sloserve", "vllm-default", "vllm-budget-512"])
def test_token_accounting(policy: str) -> None:
    requests = _mixed(rate=6.0, count=120)
    result = simulate(requests, _model(), _limits(), policy)
    assert [r.request for r in result.records] == requests  # workload order, none missing
    _check_tokens(result)
    by_index = {r.request.index: r for r in result.records}
    for record in result.records:
        request = record.request
        if request.after is not None and by_index[request.after].completed:
            released = by_index[request.after].finished_at
            assert released is not None
            assert record.sent_at == pytest.approx(released + request.delay_s)
    # Every output token took a step: at least as many steps as the longest request's tokens.
    assert result.stats.steps >= max(len(r.token_times) for r in result.records)


def test_same_seed_same_records() -> None:
    requests = _mixed(rate=4.0, count=80)
    runs = [
        simulate(requests, _model(), _limits(), "sloserve", noise_seed=seed).records
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # the noise is drawn from the seed, so it does move tokens


class _CheckedEngine(VirtualEngine):
    """Checks the KV bound after every step."""

    def _step(self) -> None:
        super()._step()
        assert self.held_tokens <= self.limits.kv_capacity_tokens


@pytest.mark.parametrize("policy", ["vllm-default", "sloserve"])
def test_kv_pressure_preempts_without_losing_tokens(policy: str) -> None:
    # Best effort allowed, so the SLO policy admits what its KV bound turns away as best
    # effort, and the engine preempts those first.
    requests = [replace(r, allow_best_effort=True) for r in _mixed(rate=6.0, count=100)]
    largest = max(r.prompt_tokens + r.output_tokens for r in requests)
    limits = _limits(kv_tokens=largest + 64)
    engine = _CheckedEngine(_model(), limits, make_policy(policy, _model(), limits), policy)
    result = engine.run(requests)

    preempted = result.stats.preemptions
    assert preempted["best_effort"] + preempted["admitted"] > 0
    assert result.stats.recomputed_tokens > 0
    if policy == "sloserve":  # admitted requests fit by admission; best effort gives way
        assert preempted["best_effort"] > 0
    _check_tokens(result)
    assert all(r.completed for r in result.records if not r.rejected)
    assert engine.held_tokens == 0


def test_stalled_policy_fails_loudly() -> None:
    class Idle(VllmScheduler):
        def plan(
            self, now: float, decoding: Sequence[SloRequest], prefilling: Sequence[SloRequest]
        ) -> StepPlan:
            return StepPlan()

    engine = VirtualEngine(_model(), _limits(), Idle(VllmConfig(2048, 8), KV_TOKENS), "idle")
    with pytest.raises(SimulationError, match="schedules nothing"):
        engine.run(_mixed(rate=1.0, count=5))


def test_noise_follows_residual_quantiles() -> None:
    quantiles = _model().residual_quantiles
    noise = StepNoise(quantiles, seed=1)
    draws = sorted(noise.factor() for _ in range(20_000))
    for name, level in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        assert draws[int(level * len(draws))] == pytest.approx(1 + quantiles[name], abs=0.03)
    assert StepNoise({}, seed=1).factor() == 1.0


def test_cli_rate_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", "--scenario", "mixed", "--rate", "3", "--requests", "40"]
    policies = "sloserve,vllm-default,vllm-budget-512"
    assert cli_main([*argv, "--policy", policies, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["policies"]) == {"sloserve", "vllm-default", "vllm-budget-512"}
    for name, result in summary["policies"].items():
        assert result["stats"]["records"] == 40
        assert result["simulator"]["policy"] == name and result["simulator"]["steps"] > 0
    assert summary["length_scale"]["prompt_factor"] == CPU_LENGTH_SCALE.prompt_factor
    assert summary["simulated_requests"] == 120
    printed = capsys.readouterr().out
    assert printed.strip() == (out / "summary.md").read_text().strip()
    assert "| sloserve | 3 |" in printed


def test_cli_sweep(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = ["simulate", "--scenario", "mixed", "--sweep", "--requests", "60"]
    argv += ["--policy", "sloserve,vllm-default,vllm-budget-512"]
    assert cli_main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    fluid = summary["fluid_bound_rps"]
    assert set(summary["capacity_ratios"]) == {
        "sloserve/vllm-default",
        "sloserve/vllm-budget-512",
    }
    assert summary["best_tuned_vllm"] == "vllm-budget-512"
    for result in summary["policies"].values():
        trials = result["search"]["trials"]
        assert trials and len(result["simulator_by_trial"]) == len(trials)
        passing = [t["rate_rps"] for t in trials if t["passed"]]
        assert result["capacity_rps"] == max(passing, default=0.0)
        assert result["capacity_rps"] <= fluid
        assert result["capacity_fraction_of_fluid_bound"] == pytest.approx(
            result["capacity_rps"] / fluid
        )
    markdown = (out / "summary.md").read_text()
    assert "vs vllm-default" in markdown and "vs best tuned (vllm-budget-512)" in markdown


def test_cli_protocol_over_seeds(tmp_path: Path) -> None:
    """--seeds: every policy searched on each seed's stream; sloserve's ratios paired by seed,
    with their spread."""
    out = tmp_path / "protocol"
    argv = ["simulate", "--scenario", "chatbot", "--sweep", "--requests", "60", "--seeds", "0,1"]
    argv += ["--policy", "sloserve,vllm-default,vllm-budget-512"]
    assert cli_main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert summary["best_tuned_vllm"] == "vllm-budget-512"
    for result in summary["policies"].values():
        by_seed = result["by_seed"]
        assert set(by_seed) == {"0", "1"}
        capacities = sorted(seed["capacity_rps"] for seed in by_seed.values())
        assert result["capacity_min_rps"] == capacities[0]
        assert result["capacity_max_rps"] == capacities[-1]
    ours = summary["policies"]["sloserve"]["by_seed"]
    theirs = summary["policies"]["vllm-default"]["by_seed"]
    estimate = summary["headline"]["sloserve_vs_vllm_default"]
    for seed in ("0", "1"):
        if theirs[seed]["capacity_rps"] > 0:
            expected = ours[seed]["capacity_rps"] / theirs[seed]["capacity_rps"]
            assert estimate["by_seed"][seed] == pytest.approx(expected)
    assert "sloserve vs best tuned (vllm-budget-512)" in (out / "summary.md").read_text()

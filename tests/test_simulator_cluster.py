"""Several virtual engines behind the gateway's router (simulator_cluster.py) and
`sloserve simulate --replicas`. Small synthetic workloads on the shipped CPU profile: each
test takes a second or two."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

from sloserve.bench.cli import CPU_LENGTH_SCALE
from sloserve.bench.types import BenchRequest
from sloserve.bench.workloads import build_scenario
from sloserve.cli import main as cli_main
from sloserve.simulator import simulate
from sloserve.simulator_cluster import VirtualCluster, profile_costs, simulate_cluster
from sloserve.simulator_policies import EngineLimits
from sloserve.slo import Budgets
from sloserve.stepmodel import StepShape, StepTimeModel, shipped_profile

KV_TOKENS = 116_508  # the simulate CLI's default


@cache
def _model() -> StepTimeModel:
    return shipped_profile("cpu-bench")


def _limits(kv_tokens: int = KV_TOKENS) -> EngineLimits:
    return EngineLimits.from_profile(_model(), kv_tokens)


def _mixed(rate: float, count: int) -> list[BenchRequest]:
    return build_scenario(
        "mixed",
        model=_model(),
        rate=rate,
        count=count,
        seed=0,
        scale=CPU_LENGTH_SCALE,
        chunk_tokens=_limits().max_step_tokens,
    ).requests


def test_one_replica_behind_the_router_is_the_engine_alone() -> None:
    requests = _mixed(rate=3.0, count=80)
    alone = simulate(requests, _model(), _limits()).records
    routed = simulate_cluster(requests, _model(), _limits(), replicas=1).records
    assert [(r.sent_at, r.token_times, r.rejected, r.error) for r in routed] == [
        (r.sent_at, r.token_times, r.rejected, r.error) for r in alone
    ]


@pytest.mark.parametrize("routing", ["slack", "packing", "round-robin", "least-outstanding"])
def test_every_request_ends_exactly_once_on_some_replica(routing: str) -> None:
    requests = _mixed(rate=6.0, count=120)  # sessions included: rounds go through the router
    cluster = VirtualCluster(_model(), _limits(), 3, routing)
    records = cluster.run(requests).records
    assert [r.request.index for r in records] == [r.index for r in requests]
    assert all(r.finished_at is not None for r in records)
    served_by = [len(replica.engine.records) for replica in cluster.replicas]
    assert sum(served_by) == len(requests)
    if routing == "packing":  # fills replicas one by one
        assert served_by[0] == max(served_by) and served_by[-1] == min(served_by)
    else:  # spreads
        assert all(n > 0 for n in served_by), f"{routing} left a replica idle: {served_by}"


def _big(index: int, prompt_tokens: int) -> BenchRequest:
    return BenchRequest(
        index=index,
        slo_class="chat",
        budgets=Budgets(ttft_s=60.0, tpot_s=1.0),
        prompt_tokens=prompt_tokens,
        output_tokens=8,
        arrival_s=0.0,
    )


def test_a_request_one_replica_rejects_is_served_by_another() -> None:
    # The KV cache holds one such request at a time: the second is turned away (MEMORY) by
    # the replica packing routing puts both on first, and retried on the other.
    limits = _limits(kv_tokens=1_500)
    requests = [_big(0, 1_000), _big(1, 1_000)]
    alone = simulate(requests, _model(), limits).records
    assert [r.rejected for r in alone] == [False, True]
    cluster = VirtualCluster(_model(), limits, 2, "packing")
    routed = cluster.run(requests).records
    assert [r.completed for r in routed] == [True, True]
    assert sorted(len(replica.engine.records) for replica in cluster.replicas) == [1, 1]


def test_the_router_costs_follow_the_profile() -> None:
    model, chunk = _model(), _limits().max_step_tokens
    costs = profile_costs(model, chunk)
    step_s = model.predict(StepShape(tokens=chunk, requests=1, context_tokens=chunk))
    assert costs.prefill_tokens_per_s == pytest.approx(chunk / step_s)
    assert 0 < costs.running_request_s < step_s


def test_simulate_replicas_reports_capacity_and_scaling_efficiency(tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    code = cli_main(
        [
            "simulate", "--scenario", "reasoning", "--replicas", "1,2",
            "--routing", "round-robin", "--requests", "20", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    one = summary["capacity_1_replica_rps"]
    two = summary["scaling"]["round-robin"]["2"]
    assert one > 0
    assert two["scaling_efficiency"] == pytest.approx(two["capacity_rps"] / (2 * one))
    assert summary["scaling"]["round-robin"]["1"]["scaling_efficiency"] == pytest.approx(1.0)
    assert "scaling efficiency" in (out / "summary.md").read_text()


def test_simulate_replicas_rejects_a_bad_count(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="at least 1"):
        cli_main(["simulate", "--scenario", "chatbot", "--replicas", "0,2", "--out", str(tmp_path)])


def test_a_retried_requests_deadlines_still_count_from_its_first_arrival() -> None:
    limits = _limits(kv_tokens=1_500)
    requests = [_big(0, 1_000), replace(_big(1, 1_000), arrival_s=0.001)]
    records = simulate_cluster(requests, _model(), limits, 2, "packing").records
    assert [r.sent_at for r in records] == [0.0, 0.001]

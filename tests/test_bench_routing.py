"""The bench's routing comparison and overload reporting, without servers: which systems a
compare runs, the routing ratios in summary.json, every request of an overload run in one
bucket, and best effort accepted on request."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sloserve.bench import cli as bench_cli
from sloserve.bench import workload_options
from sloserve.bench.overload import overload_report, overload_table
from sloserve.bench.systems import ROUTING_VARIANTS, SYSTEMS
from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.slo import Budgets
from sloserve.stepmodel import shipped_profile

BUDGETS = Budgets(ttft_s=1.0, tpot_s=0.1)


def _args(**given: object) -> argparse.Namespace:
    workload_parser = argparse.ArgumentParser()
    workload_options.add_arguments(workload_parser)
    defaults: dict[str, object] = vars(workload_parser.parse_args([])) | {
        "systems": None,
        "replicas": None,
        "scenario": "mixed",
        "seed": 0,
        "trace_dir": None,
        "best_effort": False,
    }
    return argparse.Namespace(**(defaults | given))


def test_replicas_alone_compares_the_three_routing_variants() -> None:
    systems = bench_cli._compare_systems(_args(replicas=2))
    assert systems == ["gateway-slack", "gateway-round-robin", "gateway-least-outstanding"]
    assert [SYSTEMS[s].routing for s in systems] == ["slack", "round-robin", "least-outstanding"]


def test_single_replica_systems_run_before_the_shared_replicas_start() -> None:
    systems = bench_cli._compare_systems(_args(systems="gateway-slack,sloserve,vllm-default"))
    assert systems == ["sloserve", "vllm-default", "gateway-slack"]


def test_several_replicas_are_for_gateway_systems_only() -> None:
    with pytest.raises(SystemExit, match="--replicas 2 applies to gateway systems"):
        bench_cli._compare_systems(_args(systems="sloserve,gateway-slack", replicas=2))


def test_summary_carries_each_variants_capacity_and_sloserve_routings_ratios() -> None:
    capacity = dict(zip(ROUTING_VARIANTS, (6.0, 4.0, 5.0), strict=True))
    routing = bench_cli._routing_headline(capacity, replicas=2)
    assert routing["capacity_rps"] == capacity
    assert routing["capacity_per_replica_rps"]["gateway-slack"] == pytest.approx(3.0)
    assert routing["sloserve/round-robin"] == pytest.approx(1.5)
    assert routing["sloserve/least-outstanding"] == pytest.approx(1.2)
    assert bench_cli._routing_headline({"sloserve": 3.0}, replicas=1) == {}


def test_best_effort_is_accepted_by_every_request_on_request() -> None:
    model = shipped_profile("cpu-bench")
    plain = bench_cli._workload(_args(), model, rate=2.0, count=30).requests
    lenient = bench_cli._workload(_args(best_effort=True), model, rate=2.0, count=30).requests
    assert not any(r.allow_best_effort for r in plain)
    assert all(r.allow_best_effort for r in lenient)
    # the same stream otherwise
    assert [(r.arrival_s, r.prompt_tokens) for r in lenient] == [
        (r.arrival_s, r.prompt_tokens) for r in plain
    ]


def _record(
    index: int, sent_at: float, finished_at: float | None, **state: object
) -> RequestRecord:
    request = BenchRequest(index, "chat", BUDGETS, prompt_tokens=10, output_tokens=2, arrival_s=0)
    record = RequestRecord(request, sent_at=sent_at, finished_at=finished_at)
    for name, value in state.items():
        setattr(record, name, value)
    return record


def test_an_overload_report_puts_every_request_in_one_bucket() -> None:
    on_time = [100.0, 100.1]  # within the 1 s TTFT and 0.1 s TPOT
    records = [
        _record(0, 100.0, 100.2, completed=True, token_times=on_time),
        _record(1, 101.0, 104.0, completed=True, token_times=[103.0, 103.1]),  # late
        _record(2, 102.0, 102.0, rejected=True, reject_reason="QUEUE_FULL"),
        # best effort from the queue, done after the last arrival (103 s)
        _record(3, 102.5, 110.0, completed=True, best_effort=True, token_times=[109.0, 110.0]),
        _record(4, 103.0, 403.0, error="no complete response within 300.0 s"),  # hung
        _record(5, 103.0, None),  # sent, never answered
        _record(6, 103.0, 103.0, error="session stopped: round 1 failed", sent=False),
    ]
    report = overload_report(records)
    assert report.requests == 7
    assert report.arrivals_end_s == pytest.approx(3.0)
    assert (report.admitted, report.admitted_good) == (4, 1)  # 0, 1, 4 and 5 were admitted
    assert report.rejected_by_reason == {"QUEUE_FULL": 1}
    assert (report.best_effort, report.best_effort_completed) == (1, 1)
    assert report.best_effort_completed_after_arrivals == 1
    assert report.best_effort_last_done_s == pytest.approx(10.0)
    assert (report.errors, report.never_sent, report.hung, report.unanswered) == (1, 1, 1, 1)
    assert not report.every_request_answered
    assert "| hung / unanswered | 1 / 1 |" in overload_table(report)


def test_bench_run_starts_a_system_or_takes_a_target(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["bench", "run", "--scenario", "mixed", "--system", "gateway-slack", "--replicas", "2",
         "--rate", "8", "--duration", "60", "--best-effort", "--out", str(tmp_path)]
    )  # fmt: skip
    assert (args.system, args.replicas, args.best_effort, args.duration) == (
        "gateway-slack",
        2,
        True,
        60,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["bench", "run", "--scenario", "mixed", "--target", "sloserve:h:1",
             "--system", "sloserve", "--out", str(tmp_path)]
        )  # fmt: skip

"""Routing policies, on load reports built by hand, and what a retry sends (no replicas
needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from sloserve.client import build_request
from sloserve.errors import FieldError
from sloserve.gateway.dispatch import Dispatcher, with_already_waited
from sloserve.gateway.metrics import GatewayMetrics
from sloserve.gateway.replica_pool import Outstanding, Probed, ReplicaPool
from sloserve.gateway.routing import CostModel, RequestShape, Router, estimate_prompt_tokens
from sloserve.gateway.slo_summary import SloSummary
from sloserve.gateway.spillover import SpilloverDrainer, SpilloverQueue
from sloserve.protoconv import duration, seconds
from sloserve.slo import SloCatalog
from sloserve.v1 import inference_pb2, replica_control_pb2

COSTS = CostModel(prefill_tokens_per_s=1000.0, running_request_s=0.01)
SHAPE = RequestShape(prompt_tokens=100, ttft_budget_s=1.0)


@dataclass
class FakeReplica:
    endpoint: str
    report: replica_control_pb2.LoadReport | None
    outstanding: Outstanding = field(default_factory=Outstanding)
    probed: Probed | None = None
    lag_s: float = 0.0


def replica(endpoint: str, pending: int = 0, running: int = 0) -> FakeReplica:
    report = replica_control_pb2.LoadReport(
        ready=True, running=running, pending_prefill_tokens=pending
    )
    return FakeReplica(endpoint, report)


def names(replicas: list[FakeReplica]) -> list[str]:
    return [r.endpoint for r in replicas]


def test_slack_prefers_the_replica_with_the_least_queued_prefill() -> None:
    busy, idle, medium = replica("a", pending=800), replica("b"), replica("c", pending=300)
    ranked = Router("slack", COSTS).rank([busy, idle, medium], SHAPE)
    assert names(ranked) == ["b", "c", "a"]


def test_slack_counts_what_the_gateway_sent_since_the_last_report() -> None:
    # Both report the same load, but the gateway just sent 500 prompt tokens to "a".
    a, b = replica("a", pending=100), replica("b", pending=100)
    a.outstanding = Outstanding(1, 1, awaiting_prompt_tokens=500, unreported_prompt_tokens=500)
    assert names(Router("slack", COSTS).rank([a, b], SHAPE)) == ["b", "a"]


def test_prompts_already_in_the_report_are_not_counted_twice() -> None:
    # "a" reports the 500-token prompt the gateway sent before the report; "b" has 700
    # tokens of other clients' work. Counted twice, "a" would look like 1,000 tokens.
    a, b = replica("a", pending=500), replica("b", pending=700)
    a.outstanding = Outstanding(1, 1, awaiting_prompt_tokens=500, unreported_prompt_tokens=0)
    b.outstanding = Outstanding()
    assert COSTS.predicted_ttft_s(a, 100) == pytest.approx(0.6 + 0.01)
    assert names(Router("slack", COSTS).rank([a, b], SHAPE)) == ["a", "b"]


def test_a_probe_answer_newer_than_the_report_replaces_its_queue() -> None:
    # The stale report says 2,000 tokens wait; the probe says the queue is 0.1 s now.
    a = replica("a", pending=2000)
    a.probed = Probed(at=0.0, queue_s=0.1)
    a.outstanding = Outstanding(1, 1, awaiting_prompt_tokens=200, unreported_prompt_tokens=200)
    # 0.1 s queue + (200 sent since + 100) tokens at 1,000 tokens/s + 1 running x 10 ms
    assert COSTS.predicted_ttft_s(a, 100) == pytest.approx(0.1 + 0.3 + 0.01)


def test_slack_counts_running_requests() -> None:
    a, b = replica("a", running=30), replica("b", running=2)
    assert names(Router("slack", COSTS).rank([a, b], SHAPE)) == ["b", "a"]


def test_predicted_slack_is_budget_minus_predicted_ttft() -> None:
    r = replica("a", pending=400, running=10)
    # (400 + 100) tokens at 1000 tokens/s, plus 10 running x 10 ms
    assert COSTS.predicted_ttft_s(r, 100) == pytest.approx(0.6)
    assert COSTS.slack_s(r, SHAPE) == pytest.approx(0.4)


def test_packing_fills_the_tightest_feasible_replica_first() -> None:
    idle = replica("idle")
    half = replica("half", pending=500)  # predicted 0.6 s of 1 s: feasible, least slack
    full = replica("full", pending=5000)  # predicted 5.1 s: infeasible
    ranked = Router("packing", COSTS).rank([idle, full, half], SHAPE)
    assert names(ranked) == ["half", "idle", "full"]


def test_round_robin_rotates() -> None:
    replicas = [replica("a"), replica("b"), replica("c")]
    router = Router("round-robin", COSTS)
    firsts = [router.rank(replicas, SHAPE)[0].endpoint for _ in range(4)]
    assert firsts == ["a", "b", "c", "a"]
    assert sorted(names(router.rank(replicas, SHAPE))) == ["a", "b", "c"]


def test_least_outstanding_counts_the_gateways_own_requests() -> None:
    a, b = replica("a"), replica("b", running=1)
    a.outstanding = Outstanding(in_flight=3)
    assert names(Router("least-outstanding", COSTS).rank([a, b], SHAPE)) == ["b", "a"]


def test_no_replicas_rank_to_nothing() -> None:
    assert Router("slack").rank([], SHAPE) == []


def test_an_unknown_policy_names_the_field() -> None:
    with pytest.raises(FieldError) as bad:
        Router("fastest")
    assert bad.value.field == "routing"


def test_prompt_length_estimates() -> None:
    ids = inference_pb2.Prompt(token_ids=inference_pb2.TokenIds(ids=[1, 2, 3]))
    assert estimate_prompt_tokens(ids) == 3
    assert estimate_prompt_tokens(inference_pb2.Prompt(text="x" * 400)) == 100
    assert estimate_prompt_tokens(inference_pb2.Prompt(text="hi")) == 1


def test_round_robin_takes_no_turn_for_a_retry() -> None:
    replicas = [replica("a"), replica("b")]
    router = Router("round-robin", COSTS)
    assert router.rank(replicas, SHAPE)[0].endpoint == "a"
    # "a" turned the request away: ranking the rest again is no new turn
    assert names(router.rank(replicas[1:], SHAPE, retry=True)) == ["b"]
    assert router.rank(replicas, SHAPE)[0].endpoint == "b"


# -- what a retry sends --------------------------------------------------------------------


def test_a_retry_keeps_the_class_and_says_how_long_the_request_waited() -> None:
    request = build_request([5] * 8, slo_class="coding", max_tokens=4)
    retry = with_already_waited(request, 0.4)
    assert retry.slo.class_name == "coding" and retry.slo.WhichOneof("target") == "class_name"
    assert seconds(retry.already_waited) == pytest.approx(0.4)
    assert not request.HasField("already_waited")  # the first attempt's request is untouched


def test_the_gateway_takes_a_clients_already_waited_and_checks_it() -> None:
    """The gateway serves the same contract as a replica: time a request already waited
    upstream counts from the gateway's arrival on, within the TTFT budget."""
    pool, router, queue = ReplicaPool(0.25), Router("slack"), SpilloverQueue(1, 1.0)
    catalog = SloCatalog.default()
    dispatcher = Dispatcher(
        pool, router, catalog, queue, SpilloverDrainer(queue, pool, router), GatewayMetrics(),
        SloSummary(),
    )  # fmt: skip
    coding = catalog.get("coding")
    assert coding is not None
    request = build_request([5] * 8, slo_class="coding", max_tokens=4)
    assert dispatcher._check(request) == ("coding", coding.budgets, 0.0)
    request.already_waited.CopyFrom(duration(0.25))
    assert dispatcher._check(request) == ("coding", coding.budgets, 0.25)
    request.already_waited.CopyFrom(duration(coding.budgets.ttft_s))
    with pytest.raises(FieldError) as bad:
        dispatcher._check(request)
    assert bad.value.field == "already_waited"

"""Session affinity: the rounds of one session go to one replica.

The table (gateway/affinity.py) is tested alone; then a real gateway in front of two real
replicas (vLLM on CPU, the tiny model) routes round-robin, so that without affinity the
rounds of a session would alternate between the replicas."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import openai
import pytest
from conftest import Gateway, Replica, metric_sum

from sloserve.client import Client, build_request
from sloserve.errors import FieldError
from sloserve.gateway.affinity import AffinityTable
from sloserve.gateway.dispatch import Dispatcher
from sloserve.gateway.metrics import GatewayMetrics
from sloserve.gateway.openai_format import body_field, generate_request
from sloserve.gateway.replica_pool import Outstanding, Probed, ReplicaPool
from sloserve.gateway.routing import RequestShape, Router
from sloserve.gateway.slo_summary import SloSummary
from sloserve.gateway.spillover import SpilloverDrainer, SpilloverQueue
from sloserve.slo import SloCatalog
from sloserve.v1 import replica_control_pb2


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the table ----------------------------------------------------------------------------


def test_a_pinned_session_is_remembered_and_re_pinned() -> None:
    table = AffinityTable(capacity=10, ttl_s=60, clock=FakeClock())
    assert table.get(("t", "s1")) is None
    table.pin(("t", "s1"), "host-a:1")
    assert table.get(("t", "s1")) == "host-a:1"
    # Sessions are per tenant: the same id of another tenant is another session.
    assert table.get(("u", "s1")) is None
    table.pin(("t", "s1"), "host-b:1")  # it moved
    assert table.get(("t", "s1")) == "host-b:1"
    assert len(table) == 1


def test_a_session_is_forgotten_ttl_after_its_last_round() -> None:
    clock = FakeClock()
    table = AffinityTable(capacity=10, ttl_s=60, clock=clock)
    table.pin(("t", "s1"), "a")
    clock.now = 50
    table.pin(("t", "s2"), "b")
    table.pin(("t", "s1"), "a")  # a new round renews it
    clock.now = 105
    assert table.get(("t", "s1")) == "a"
    clock.now = 111  # s1's last round was at 50
    assert table.get(("t", "s1")) is None
    # An expired entry at the old end is dropped when anything is pinned, unread or not.
    clock.now = 200
    table.pin(("t", "s3"), "c")
    assert len(table) == 1


def test_beyond_capacity_the_least_recently_used_session_goes_first() -> None:
    table = AffinityTable(capacity=2, ttl_s=60, clock=FakeClock())
    table.pin(("t", "old"), "a")
    table.pin(("t", "used"), "b")
    table.pin(("t", "old"), "a")  # now "used" is the least recently pinned
    table.pin(("t", "new"), "c")
    assert table.get(("t", "used")) is None
    assert table.get(("t", "old")) == "a" and table.get(("t", "new")) == "c"
    assert len(table) == 2


def test_a_table_needs_room_and_a_ttl() -> None:
    with pytest.raises(ValueError):
        AffinityTable(capacity=0)
    with pytest.raises(ValueError):
        AffinityTable(ttl_s=0)


def test_http_names_a_session_by_header_or_body() -> None:
    body = {"model": "tiny", "prompt": "hi"}
    by_header = generate_request(body, "hi", {"x-sloserve-session": "s-1"}, "max_tokens")
    assert by_header.labels["session"] == "s-1"
    by_body = generate_request(
        body | {"session_id": "s-2"}, "hi", {"x-sloserve-session": "s-1"}, "max_tokens"
    )
    assert by_body.labels["session"] == "s-2"  # the body wins, as slo_class does
    assert "session" not in generate_request(body, "hi", {}, "max_tokens").labels
    with pytest.raises(FieldError) as caught:
        generate_request(body | {"session_id": 7}, "hi", {}, "max_tokens")
    assert caught.value.field == "session_id"
    # The gateway's own length check names the body's field in HTTP errors.
    assert body_field("labels[session]", "prompt") == "session_id"


@dataclass
class FakeReplica:
    endpoint: str
    report: replica_control_pb2.LoadReport | None
    outstanding: Outstanding = field(default_factory=Outstanding)
    probed: Probed | None = None
    lag_s: float = 0.0


def dispatcher(policy: str) -> Dispatcher:
    pool, router, queue = ReplicaPool(0.25), Router(policy), SpilloverQueue(1, 1.0)
    return Dispatcher(
        pool,
        router,
        SloCatalog.default(),
        queue,
        SpilloverDrainer(queue, pool, router),
        GatewayMetrics(),
        SloSummary(),
    )


def test_the_pinned_replica_goes_first_only_while_it_is_ranked_and_feasible() -> None:
    d = dispatcher("slack")
    shape = RequestShape(prompt_tokens=100, ttft_budget_s=1.0)
    idle = FakeReplica("idle:1", replica_control_pb2.LoadReport(ready=True))
    busy = FakeReplica("busy:1", replica_control_pb2.LoadReport(ready=True))
    session = ("t", "s")

    def order(ranked: list[FakeReplica]) -> list[str]:
        return [r.endpoint for r in d._prefer_pinned(session, ranked, shape)]

    assert order([idle, busy]) == ["idle:1", "busy:1"]  # not pinned yet: the router's order
    d.affinity.pin(session, "busy:1")
    assert order([idle, busy]) == ["busy:1", "idle:1"]  # kept, though it is not first
    # Its predicted TTFT (8,000 queued tokens at 4,000/s) no longer fits a 1 s budget.
    busy.report = replica_control_pb2.LoadReport(ready=True, pending_prefill_tokens=8000)
    assert order([idle, busy]) == ["idle:1", "busy:1"]
    # Out of rotation: not among the candidates at all.
    assert order([idle]) == ["idle:1"]
    routes = {
        result: d.metrics.session_routes.labels(result)._value.get()
        for result in ("new", "kept", "moved")
    }
    assert routes == {"new": 1, "kept": 1, "moved": 2}


# -- real processes -----------------------------------------------------------------------

TIMEOUT_S = 120
PROMPT = list(range(10, 40))


@pytest.fixture(scope="module")
def gateway(
    replica: Replica, other_replica: Replica, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    server = Gateway(
        workdir=tmp_path_factory.mktemp("gateway"),
        replicas=[replica.endpoint, other_replica.endpoint],
        args=["--routing", "round-robin"],
    )
    server.start()
    try:
        server.wait_serving()
        yield server
    finally:
        assert server.stop() == 0


def served(replicas: list[Replica]) -> list[float]:
    return [metric_sum(r.metrics_url, "sloserve_requests_total") for r in replicas]


def served_since(before: list[float], replicas: list[Replica], total: int) -> list[float]:
    """Requests each replica served since `before`, once all `total` are counted (a replica
    counts a request as it finishes, which may be just after the client saw the end)."""
    deadline = time.monotonic() + 10
    while True:
        deltas = [a - b for a, b in zip(served(replicas), before, strict=True)]
        if sum(deltas) >= total or time.monotonic() > deadline:
            return deltas
        time.sleep(0.05)


@pytest.mark.engine
def test_the_rounds_of_a_session_stay_on_one_replica(
    gateway: Gateway, replica: Replica, other_replica: Replica
) -> None:
    replicas = [replica, other_replica]
    rounds = 4
    with Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client:
        # Without a session, round-robin alternates: both replicas serve.
        before = served(replicas)
        for _ in range(2):
            client.generate(PROMPT, slo_class="chat", max_tokens=2, ignore_eos=True)
        assert served_since(before, replicas, 2) == [1, 1]

        # gRPC: the session id rides in labels["session"].
        before = served(replicas)
        for _ in range(rounds):
            request = build_request(PROMPT, slo_class="chat", max_tokens=2, ignore_eos=True)
            request.labels["session"] = "grpc-session"
            events = [r.WhichOneof("event") for r in client.stream(request)]
            assert events[-1] == "completion"
        assert sorted(served_since(before, replicas, rounds)) == [0, rounds]

    # HTTP: the x-sloserve-session header (and the body's session_id, below).
    oai = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    before = served(replicas)
    for i in range(rounds):
        extra = {"session_id": "http-session"} if i % 2 else {}
        headers = {} if i % 2 else {"x-sloserve-session": "http-session"}
        oai.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"round {i}"}],
            max_tokens=2,
            extra_body={"slo_class": "chat", "ignore_eos": True, **extra},
            extra_headers=headers,
        )
    assert sorted(served_since(before, replicas, rounds)) == [0, rounds]

    routes = {
        result: metric_sum(
            gateway.metrics_url, "sloserve_gateway_session_routes_total", result=result
        )
        for result in ("new", "kept", "moved")
    }
    # The gateway is this test's alone: two sessions, each pinned once and then kept.
    assert routes == {"new": 2, "kept": 2 * (rounds - 1), "moved": 0}

"""Routing details behind real replicas: a replica whose load reports stopped is asked with
Probe before it is routed to, and a retry tells the next replica how long the request already
waited (it keeps its SLO class, and only the TTFT budget that is left).

The odd replica out is a small in-process gRPC server (it reports, probes and rejects as told);
the replica that serves is the shared real one."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import Gateway, Replica, free_port, metric_sum
from fake_mux import add_fake_inference

from sloserve.client import build_request
from sloserve.protoconv import duration, seconds
from sloserve.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    replica_control_pb2,
    replica_control_pb2_grpc,
    slo_pb2,
)

pytestmark = pytest.mark.engine

PROMPT = list(range(10, 40))
TTFT_BUDGET_S = 3.0
REJECT_AFTER_S = 0.4
TIMEOUT_S = 120


@dataclass
class FakeReplica(
    inference_pb2_grpc.InferenceServicer, replica_control_pb2_grpc.ReplicaControlServicer
):
    """Rejects every request after `reject_after_s`; sends `reports` load reports, then keeps
    its watch open and silent; answers probes while `answers_probes`."""

    reports: int = 1_000_000
    reject_after_s: float = 0.0
    answers_probes: bool = True
    generates: list[inference_pb2.GenerateRequest] = field(default_factory=list)
    probes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateResponse]:
        with self.lock:
            self.generates.append(request)
        time.sleep(self.reject_after_s)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "not admitted: compute")
        yield inference_pb2.GenerateResponse()  # not reached

    def WatchLoad(
        self, request: replica_control_pb2.WatchLoadRequest, context: grpc.ServicerContext
    ) -> Iterator[replica_control_pb2.WatchLoadResponse]:
        for _ in range(self.reports):
            if not context.is_active():
                return
            yield replica_control_pb2.WatchLoadResponse(
                report=replica_control_pb2.LoadReport(ready=True)
            )
            time.sleep(0.1)
        while context.is_active():  # connected, but silent: its report goes stale
            time.sleep(0.1)

    def Probe(
        self, request: replica_control_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> replica_control_pb2.ProbeResponse:
        with self.lock:
            self.probes += 1
        if not self.answers_probes:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault")
        return replica_control_pb2.ProbeResponse(
            admissible=True, predicted_ttft=duration(0.0), slack=duration(1.0)
        )


@dataclass
class Served:
    endpoint: str
    server: grpc.Server
    fake: FakeReplica


def serve(fake: FakeReplica) -> Served:
    server = grpc.server(futures.ThreadPoolExecutor(16))
    add_fake_inference(fake, server)
    replica_control_pb2_grpc.add_ReplicaControlServicer_to_server(fake, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return Served(f"127.0.0.1:{port}", server, fake)


@pytest.fixture
def fakes() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for served in started:
        served.server.stop(grace=None)


def start_gateway(tmp_path: Path, replicas: list[str]) -> Gateway:
    # Round robin: each of two requests in a row goes first to a different replica.
    gateway = Gateway(workdir=tmp_path, replicas=replicas, args=["--routing", "round-robin"])
    gateway.start()
    gateway.wait_serving()  # every replica in rotation: else a turn may find one only
    return gateway


def send(
    gateway: Gateway, request: inference_pb2.GenerateRequest | None = None
) -> list[inference_pb2.GenerateResponse]:
    """Sends one request (by default with explicit budgets) and reads its stream to the end."""
    if request is None:
        request = build_request(
            PROMPT, ttft_s=TTFT_BUDGET_S, tpot_s=1.0, max_tokens=2, ignore_eos=True
        )
    with grpc.insecure_channel(gateway.endpoint) as channel:
        stream = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=TIMEOUT_S)
        responses: list[inference_pb2.GenerateResponse] = list(stream)
    assert responses[-1].WhichOneof("event") == "completion"
    return responses


def first_message(gateway: Gateway) -> inference_pb2.GenerateResponse:
    """Sends one request with explicit budgets; returns the Admission it began with."""
    return send(gateway)[0]


def added_events(replica: Replica) -> dict[str, dict[str, object]]:
    """The scheduler trace's "added" event of each request the replica's engine saw, by id."""
    events = [json.loads(line) for line in replica.trace_path.read_text().splitlines()]
    return {str(e["request_id"]): e for e in events if e["event"] == "added"}


def test_a_retry_carries_the_time_already_waited(
    replica: Replica, fakes: list[Served], tmp_path: Path
) -> None:
    slow = serve(FakeReplica(reject_after_s=REJECT_AFTER_S))
    fakes.append(slow)
    gateway = start_gateway(tmp_path, [slow.endpoint, replica.endpoint])
    try:
        admissions = [first_message(gateway).admission for _ in range(2)]
    finally:
        assert gateway.stop() == 0
    retried = len(slow.fake.generates)
    assert retried == 1, "round robin sends one of the two there first"
    # What the rejecting replica got: the request as the client sent it, nothing waited yet.
    first_try = slow.fake.generates[0]
    assert seconds(first_try.slo.budgets.ttft) == pytest.approx(TTFT_BUDGET_S)
    assert not first_try.HasField("already_waited")
    # What the real replica got: the same budgets both times (explicit ones stay explicit),
    # and for the retried request the time it already spent in the gateway and on the
    # rejecting replica, which the replica counts against the TTFT budget.
    for admission in admissions:
        assert seconds(admission.budgets.ttft) == pytest.approx(TTFT_BUDGET_S)
        assert seconds(admission.budgets.tpot) == pytest.approx(1.0)
        assert admission.class_name == ""
    added = added_events(replica)
    ids = {a.request_id for a in admissions}
    assert first_try.request_id in ids
    (direct,) = ids - {first_try.request_id}
    assert added[direct]["already_waited_s"] == 0.0
    assert REJECT_AFTER_S <= float(str(added[first_try.request_id]["already_waited_s"])) < 1.0
    assert added[first_try.request_id]["ttft_s"] == pytest.approx(TTFT_BUDGET_S)


def test_a_retried_class_request_is_served_and_counted_in_its_class(
    replica: Replica, fakes: list[Served], tmp_path: Path
) -> None:
    """A class name cannot carry a shorter budget; `already_waited` lets the retry keep the
    class, so the replica serves it with the class's policy and counts it under the class."""
    slow = serve(FakeReplica(reject_after_s=REJECT_AFTER_S))
    fakes.append(slow)
    gateway = start_gateway(tmp_path, [slow.endpoint, replica.endpoint])

    def outcomes(slo_class: str) -> dict[str, float]:
        return {
            o: metric_sum(
                replica.metrics_url, "sloserve_requests_total", slo_class=slo_class, outcome=o
            )
            for o in ("attained", "missed", "best_effort", "cancelled", "rejected", "error")
        }

    def served(slo_class: str) -> float:
        return sum(outcomes(slo_class).values())

    def admitted(slo_class: str) -> float:
        """The engine's SLO admissions under the class (counted as each is decided)."""
        return metric_sum(
            replica.metrics_url, "sloserve_admission_verdicts_total", slo_class=slo_class,
            event="admitted",
        )  # fmt: skip

    before = served("coding"), served("")
    cancelled_before = outcomes("coding")["cancelled"]
    admitted_before = admitted("coding"), admitted("")
    try:
        streams = [
            send(
                gateway,
                build_request(PROMPT, slo_class="coding", max_tokens=2, ignore_eos=True),
            )
            for _ in range(2)
        ]
    finally:
        assert gateway.stop() == 0
    assert len(slow.fake.generates) == 1, "round robin sends one of the two there first"
    retried_id = slow.fake.generates[0].request_id
    retried = next(s for s in streams if s[0].admission.request_id == retried_id)
    # The replica admitted the retry under its class, with the class's budgets
    # (tests/classes.yaml: coding is 4 s and 250 ms), ...
    admission = retried[0].admission
    assert admission.class_name == "coding"
    assert admission.mode == slo_pb2.ADMISSION_MODE_ADMITTED
    assert admission.budgets.ttft.ToMilliseconds() == 4000
    assert admission.budgets.tpot.ToMilliseconds() == 250
    # ... planned for the client's deadline, ...
    added = added_events(replica)[retried_id]
    assert added["class_name"] == "coding"
    assert REJECT_AFTER_S <= float(str(added["already_waited_s"])) < 1.0
    # ... and both requests count in the class on the replica, none under explicit budgets
    # (a replica counts a request as its stream closes, which the gateway need not wait for).
    deadline = time.monotonic() + 10
    while served("coding") < before[0] + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served("coding") == before[0] + 2, outcomes("coding")
    assert served("") == before[1]
    # The gateway ends each call once it has the Completion: a finished request, not a
    # cancelled one.
    assert outcomes("coding")["cancelled"] == cancelled_before, outcomes("coding")
    assert (admitted("coding"), admitted("")) == (admitted_before[0] + 2, admitted_before[1])
    # The gateway judges from its own arrival: the time on the rejecting replica counts.
    assert seconds(retried[-1].completion.slo_outcome.ttft) >= REJECT_AFTER_S


def test_a_replica_with_a_stale_report_is_probed_and_still_routed_to(
    replica: Replica, fakes: list[Served], tmp_path: Path
) -> None:
    # Two reports, then silence: without the probe it would be out of rotation after 1 s.
    quiet = serve(FakeReplica(reports=2))
    fakes.append(quiet)
    gateway = start_gateway(tmp_path, [quiet.endpoint, replica.endpoint])
    try:
        time.sleep(1.5)
        for _ in range(2):
            first_message(gateway)
    finally:
        assert gateway.stop() == 0
    assert quiet.fake.probes >= 1
    assert len(quiet.fake.generates) >= 1, "the probed replica was left out"


def test_a_stale_replica_that_does_not_answer_its_probe_is_left_out(
    replica: Replica, fakes: list[Served], tmp_path: Path
) -> None:
    mute = serve(FakeReplica(reports=2, answers_probes=False))
    fakes.append(mute)
    gateway = start_gateway(tmp_path, [mute.endpoint, replica.endpoint])
    try:
        time.sleep(1.5)
        for _ in range(2):
            admission = first_message(gateway).admission
            assert admission.mode == slo_pb2.ADMISSION_MODE_ADMITTED
    finally:
        assert gateway.stop() == 0
    assert mute.fake.probes >= 1
    assert mute.fake.generates == []


def test_a_class_that_forbids_best_effort_is_rejected_not_spilled(
    fakes: list[Served], tmp_path: Path
) -> None:
    """No replica admits anything (a full one, injected); a request that accepts best effort
    spills to the queue, unless its class says `spill_to_best_effort: false`."""
    full = serve(FakeReplica())
    fakes.append(full)
    classes = tmp_path / "classes.yaml"
    classes.write_text(
        "classes:\n"
        "  - {name: chat, ttft_ms: 5000, tpot_ms: 500}\n"
        "  - {name: coding, ttft_ms: 4000, tpot_ms: 250, spill_to_best_effort: false}\n"
    )
    gateway = Gateway(
        workdir=tmp_path,
        replicas=[full.endpoint],
        args=["--classes", str(classes), "--queue-ttl", "1"],
    )
    gateway.start()

    def spilled(slo_class: str) -> float:
        return metric_sum(
            gateway.metrics_url, "sloserve_gateway_spilled_total", slo_class=slo_class
        )

    def answer(slo_class: str) -> grpc.RpcError:
        request = build_request(PROMPT, slo_class=slo_class, max_tokens=2, allow_best_effort=True)
        with (
            grpc.insecure_channel(gateway.endpoint) as channel,
            pytest.raises(grpc.RpcError) as error,
        ):
            list(inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=TIMEOUT_S))
        return error.value

    try:
        gateway.wait_serving()
        coding = answer("coding")
        assert coding.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no replica can meet this SLO now" in str(coding.details())
        assert spilled("coding") == 0
        chat = answer("chat")  # queued, finds no room within the 1 s TTL
        assert chat.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert spilled("chat") == 1
    finally:
        assert gateway.stop() == 0

"""Routing details behind real replicas: a replica whose load reports stopped is asked with
Probe before it is routed to, and a retry carries only the TTFT budget that is left.

The odd replica out is a small in-process gRPC server (it reports, probes and rejects as told);
the replica that serves is the shared real one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import Gateway, Replica, free_port

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
    inference_pb2_grpc.add_InferenceServicer_to_server(fake, server)
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
    gateway.wait_serving()
    return gateway


def first_message(gateway: Gateway) -> inference_pb2.GenerateResponse:
    """Sends one request with explicit budgets and reads its stream to the end; returns the
    Admission it began with."""
    request = build_request(PROMPT, ttft_s=TTFT_BUDGET_S, tpot_s=1.0, max_tokens=2, ignore_eos=True)
    with grpc.insecure_channel(gateway.endpoint) as channel:
        stream = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=TIMEOUT_S)
        responses: list[inference_pb2.GenerateResponse] = list(stream)
    assert responses[-1].WhichOneof("event") == "completion"
    return responses[0]


def test_a_retry_carries_the_ttft_budget_that_is_left(
    replica: Replica, fakes: list[Served], tmp_path: Path
) -> None:
    slow = serve(FakeReplica(reject_after_s=REJECT_AFTER_S))
    fakes.append(slow)
    gateway = start_gateway(tmp_path, [slow.endpoint, replica.endpoint])
    try:
        budgets = [first_message(gateway).admission.budgets for _ in range(2)]
    finally:
        assert gateway.stop() == 0
    retried = len(slow.fake.generates)
    assert retried == 1, "round robin sends one of the two there first"
    # What the rejecting replica got: the full budget. What the real replica planned for:
    # the full budget for the request it saw first, the rest of it for the retried one.
    assert seconds(slow.fake.generates[0].slo.budgets.ttft) == pytest.approx(TTFT_BUDGET_S)
    ttfts = sorted(seconds(b.ttft) for b in budgets)
    assert ttfts[1] == pytest.approx(TTFT_BUDGET_S)
    assert TTFT_BUDGET_S - 1.0 < ttfts[0] <= TTFT_BUDGET_S - REJECT_AFTER_S
    assert all(seconds(b.tpot) == pytest.approx(1.0) for b in budgets)


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

"""Faults behind the gateway: a replica killed mid-run, a replica that fails every call (an
injected fault), a replica coming back, and the gateway's own SIGTERM drain. No client may
hang: every call has a timeout, and every request ends complete or with an explicit error."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import Gateway, Replica, free_port, metric_sum, start_replica, wait_for_rotation
from fake_mux import add_fake_inference

from sloserve.client import Client, GenerationResult, build_request
from sloserve.errors import SloserveError, UnavailableError
from sloserve.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    replica_control_pb2,
    replica_control_pb2_grpc,
)

pytestmark = pytest.mark.engine

PROMPT = list(range(10, 60))
TIMEOUT_S = 120


@dataclass
class Watched:
    """One streaming request, run in a thread: what it received and how it ended."""

    tokens: int = 0
    result: GenerationResult | None = None
    error: SloserveError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def run(self, endpoint: str, max_tokens: int) -> None:
        result = GenerationResult(sent_at=time.time())
        request = build_request(PROMPT, slo_class="chat", max_tokens=max_tokens, ignore_eos=True)
        try:
            with Client(endpoint, timeout_s=TIMEOUT_S) as client:
                for response in client.stream(request):
                    result.feed(response, time.time())
                    self.tokens = len(result.token_ids)
            self.result = result
        except SloserveError as error:
            self.error = error
        finally:
            self.done.set()


# -- a replica killed during a run --------------------------------------------------------


@pytest.fixture(scope="module")
def victim(tiny_profile: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    server = start_replica(tmp_path_factory.mktemp("victim"), ["--profile", str(tiny_profile)])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(
    replica: Replica, victim: Replica, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    server = Gateway(
        workdir=tmp_path_factory.mktemp("faults-gateway"),
        replicas=[replica.endpoint, victim.endpoint],
    )
    server.start()
    try:
        server.wait_serving()
        yield server
    finally:
        assert server.stop() == 0


def test_killing_a_replica_ends_its_streams_explicitly_and_reroutes_new_requests(
    gateway: Gateway, replica: Replica, victim: Replica
) -> None:
    streams: list[Watched] = []

    def start_stream() -> None:
        stream = Watched()
        streams.append(stream)
        threading.Thread(target=stream.run, args=(gateway.endpoint, 900), daemon=True).start()

    def victim_running() -> float:
        return metric_sum(victim.metrics_url, "sloserve_running_requests")

    for _ in range(4):
        start_stream()
    deadline = time.monotonic() + 60
    while not all(s.tokens > 0 for s in streams) or victim_running() == 0:
        assert time.monotonic() < deadline, "streams did not start on both replicas"
        if all(s.tokens > 0 for s in streams) and len(streams) < 12:
            # Slack routing spreads streams by the replicas' reported load, which timing can
            # tip: all four may land on the shared replica. One more until the victim has one.
            time.sleep(0.5)  # a load report or two: the victim's gauge may lag its streams
            if victim_running() == 0:
                start_stream()
        time.sleep(0.05)
    victim.kill()  # SIGKILL to its processes: no drain, connections just drop

    # Requests sent right after the kill: none may be lost or hang.
    with Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client, ThreadPoolExecutor(4) as pool:
        later = list(
            pool.map(
                lambda _: client.generate(PROMPT, slo_class="chat", max_tokens=4, ignore_eos=True),
                range(4),
            )
        )
    assert all(r.completion_tokens == 4 for r in later)

    for stream in streams:
        assert stream.done.wait(TIMEOUT_S), "a client hangs"
    failed = [s for s in streams if s.error is not None]
    completed = [s for s in streams if s.result is not None]
    assert failed, "no stream was on the killed replica"
    assert completed, "the surviving replica's streams must complete"
    for stream in failed:
        assert isinstance(stream.error, UnavailableError)
        # The error says how many tokens the client got before the replica died.
        assert f"after {stream.tokens} tokens were delivered" in stream.error.message
        assert victim.endpoint in stream.error.message
    for stream in completed:
        assert stream.result is not None and stream.result.completion_tokens == 900
    wait_for_rotation(gateway, victim.endpoint, False)
    assert metric_sum(gateway.metrics_url, "sloserve_gateway_replicas_in_rotation") == 1


def test_a_replica_that_comes_back_rejoins_the_rotation(gateway: Gateway, victim: Replica) -> None:
    assert victim.process is not None and victim.process.poll() is not None  # killed above
    victim.start()  # the same port: the gateway keeps watching it with backoff
    victim.wait_until("SERVING")
    wait_for_rotation(gateway, victim.endpoint, True)
    before = metric_sum(victim.metrics_url, "sloserve_requests_total")
    # Routing picks by load, so a round of requests may all go to the other replica: a few
    # rounds, until the one that came back has served some.
    with Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client, ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            results = list(
                pool.map(
                    lambda _: client.generate(PROMPT, slo_class="chat", max_tokens=16), range(4)
                )
            )
            assert all(r.completion_tokens >= 1 for r in results)
            if metric_sum(victim.metrics_url, "sloserve_requests_total") > before:
                break
    assert metric_sum(victim.metrics_url, "sloserve_requests_total") > before


# -- an injected fault: a replica that reports ready but fails every call ------------------


class _BrokenInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self) -> None:
        self.calls = 0

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateResponse]:
        self.calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "injected fault: connection lost")
        yield inference_pb2.GenerateResponse()  # not reached


class _HealthyLooking(replica_control_pb2_grpc.ReplicaControlServicer):
    def WatchLoad(
        self, request: replica_control_pb2.WatchLoadRequest, context: grpc.ServicerContext
    ) -> Iterator[replica_control_pb2.WatchLoadResponse]:
        while context.is_active():
            yield replica_control_pb2.WatchLoadResponse(
                report=replica_control_pb2.LoadReport(ready=True)
            )
            time.sleep(0.1)


@pytest.fixture
def broken_replica() -> Iterator[tuple[str, _BrokenInference]]:
    server = grpc.server(futures.ThreadPoolExecutor(8))
    inference = _BrokenInference()
    add_fake_inference(inference, server)
    replica_control_pb2_grpc.add_ReplicaControlServicer_to_server(_HealthyLooking(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}", inference
    finally:
        server.stop(grace=None)


def test_a_request_with_no_tokens_sent_is_rerouted_transparently(
    replica: Replica,
    broken_replica: tuple[str, _BrokenInference],
    tmp_path: Path,
) -> None:
    broken_endpoint, broken = broken_replica
    # Round robin: every other request goes to the broken replica first.
    gateway = Gateway(
        workdir=tmp_path,
        replicas=[broken_endpoint, replica.endpoint],
        args=["--routing", "round-robin"],
    )
    gateway.start()
    try:
        gateway.wait_serving()
        with Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client:
            results = []
            for _ in range(4):
                results.append(client.generate(PROMPT, slo_class="chat", max_tokens=4))
                wait_for_rotation(gateway, broken_endpoint, True)  # back after its next report
        assert all(r.completion_tokens >= 1 for r in results)
        assert broken.calls >= 1, "the broken replica was never tried"
        rerouted = metric_sum(
            gateway.metrics_url, "sloserve_gateway_rerouted_total", why="unreachable"
        )
        assert rerouted == broken.calls
    finally:
        assert gateway.stop() == 0


# -- the gateway's SIGTERM drain ------------------------------------------------------------


def test_sigterm_drains_the_gateway(replica: Replica, tmp_path: Path) -> None:
    gateway = Gateway(workdir=tmp_path, replicas=[replica.endpoint])
    gateway.start()
    try:
        gateway.wait_serving()
        stream = Watched()
        thread = threading.Thread(target=stream.run, args=(gateway.endpoint, 200), daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while stream.tokens == 0:
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.02)
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while gateway.serving():
            assert time.monotonic() < deadline, "health still SERVING while draining"
            time.sleep(0.02)
        # New requests are refused while the one in flight finishes ...
        with Client(gateway.endpoint, timeout_s=10) as client, pytest.raises(UnavailableError):
            client.generate(PROMPT, max_tokens=4)
        # ... and the process then exits cleanly.
        assert stream.done.wait(TIMEOUT_S)
        assert stream.error is None and stream.result is not None
        assert stream.result.completion_tokens == 200
        assert gateway.process.wait(TIMEOUT_S) == 0
    finally:
        gateway.stop()


def test_after_sigterm_a_gateway_with_a_shutdown_delay_serves_on_while_health_fails(
    replica: Replica, tmp_path: Path
) -> None:
    """A rolling update: the load balancer sends for a few seconds more after SIGTERM. With
    --shutdown-delay, health turns NOT_SERVING at once and those requests are still served;
    then the gateway drains and exits 0."""
    gateway = Gateway(
        workdir=tmp_path, replicas=[replica.endpoint], args=["--shutdown-delay", "10"]
    )
    gateway.start()
    try:
        gateway.wait_serving()
        assert gateway.process is not None
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        deadline = signalled + 3
        while gateway.serving():
            assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
            time.sleep(0.02)
        healthz = urllib.request.Request(f"http://127.0.0.1:{gateway.http_port}/healthz")
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(healthz, timeout=5)
        assert not_ready.value.code == 503
        summary_url = f"{gateway.base_url}/slo/summary"
        # The loop's lag is measured every 50 ms from start-up: the signal may come first.
        while True:
            with urllib.request.urlopen(summary_url, timeout=5) as response:
                summary = json.load(response)
            assert summary["leaving"] and not summary["draining"]
            if summary["event_loop_lag_s"]["recent_max"] is not None:
                break
            assert time.monotonic() < deadline, "no event-loop lag measured while leaving"
            time.sleep(0.02)
        # What the load balancer still sends is served, over gRPC and HTTP.
        with Client(gateway.endpoint, timeout_s=30) as client:
            served = client.generate(PROMPT, slo_class="chat", max_tokens=4, ignore_eos=True)
        assert served.completion_tokens == 4
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 3}).encode()
        post = urllib.request.Request(
            f"{gateway.base_url}/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(post, timeout=30) as response:
            assert json.load(response)["usage"]["completion_tokens"] == 3
        assert time.monotonic() - signalled < 10, "the requests came after the delay"
        assert gateway.process.wait(TIMEOUT_S) == 0
        assert time.monotonic() - signalled >= 10
        log = gateway.log_path.read_text()
        assert "serving for 10 s more before draining" in log
    finally:
        gateway.stop()

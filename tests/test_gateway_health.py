"""Health that tells the truth: a replica whose engine dies or wedges says so and exits, and
the gateway routes around a dead, hung or slow-to-answer replica without failing requests.

Faults are real: `kill -9` or SIGSTOP of a replica's `VLLM::EngineCore` process, found as a
child of the replica. Slow probes come from a proxy in front of the shared replica that
forwards everything but holds its load reports back and answers probes late. Every client
call has a timeout, and every HTTP answer must be a 200 or an explicit 503/429 JSON error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from conftest import Gateway, Replica, metric_sum, start_replica, wait_for_rotation

from sloserve.client import Client
from sloserve.errors import UnavailableError
from sloserve.gateway.failure_log import ThrottledLog
from sloserve.replica.mux_service import InferenceMuxService
from sloserve.replica.server import ENGINE_FAILED_EXIT_CODE
from sloserve.v1 import (
    inference_mux_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    replica_control_pb2,
    replica_control_pb2_grpc,
)

PROMPT = list(range(10, 40))
TIMEOUT_S = 120
STALL_TIMEOUT_S = 3.0
WEDGE_TIMEOUT_S = 10.0
# vLLM notices a dead engine-core process within about a second; the replica then waits
# its grace (2 s) and shuts down. Generous for a busy 2-core machine.
DETECTION_BOUND_S = 15.0
EXIT_BOUND_S = 45.0


# -- the throttled failure log (no engine) -------------------------------------------------


def test_the_failure_log_keeps_one_line_per_reason_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    throttled = ThrottledLog(logging.getLogger("test.failures"), 1.0, lambda: now[0])
    with caplog.at_level(logging.INFO, "test.failures"):
        assert throttled.log(logging.WARNING, "NO_REPLICA", "first")
        assert not throttled.log(logging.WARNING, "NO_REPLICA", "second")
        assert throttled.log(logging.WARNING, "REPLICA_FAILED", "another reason")
        now[0] = 0.5
        assert not throttled.log(logging.WARNING, "NO_REPLICA", "third")
        now[0] = 1.2
        assert throttled.log(logging.WARNING, "NO_REPLICA", "fourth")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "first",
        "another reason",
        "fourth (2 more like it in the last 1.2 s)",
    ]


# -- helpers ---------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(c) for c in (task / "children").read_text().split()]
    return children


def engine_core(replica: Replica) -> int:
    """The pid of the replica's `VLLM::EngineCore` process (vLLM names it so), from /proc."""
    assert replica.process is not None
    pending = _children(replica.process.pid)
    while pending:
        pid = pending.pop()
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/comm").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "EngineCore" in name or "EngineCore" in command:
                return pid
            pending += _children(pid)
    raise AssertionError(f"no VLLM::EngineCore process under replica {replica.process.pid}")


def signal_process(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def gone(pid: int, timeout_s: float = 10) -> bool:
    """Whether the process ends within `timeout_s` (a zombie counts: its parent is gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.1)
    return False


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    error: dict[str, Any] | None  # an error answer's, or a stream's last event's, error
    sent_at: float  # time.monotonic()
    seconds: float


def complete(gateway: Gateway, stream: bool = False, max_tokens: int = 8) -> HttpAnswer:
    """One /v1/completions request, read to the end. Any status but 200 must carry an
    OpenAI error JSON (else json.loads or the key lookup fails the test)."""
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }
    request = urllib.request.Request(
        f"{gateway.base_url}/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    sent_at = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    seconds = time.monotonic() - sent_at
    if status != 200:
        return HttpAnswer(status, json.loads(text)["error"], sent_at, seconds)
    if stream:
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        if events[-1] != "[DONE]":
            return HttpAnswer(status, json.loads(events[-1])["error"], sent_at, seconds)
    return HttpAnswer(status, None, sent_at, seconds)


# -- a replica whose engine is killed or stopped, behind a gateway ---------------------------


@pytest.fixture(scope="module")
def victim(tiny_profile: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    server = start_replica(
        tmp_path_factory.mktemp("health-victim"),
        ["--profile", str(tiny_profile), "--wedge-timeout", str(WEDGE_TIMEOUT_S)],
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gateway(
    replica: Replica, victim: Replica, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    # Round robin: every other request goes to the victim first, whatever the loads.
    server = Gateway(
        workdir=tmp_path_factory.mktemp("health-gateway"),
        replicas=[replica.endpoint, victim.endpoint],
        args=["--routing", "round-robin", "--stall-timeout", str(STALL_TIMEOUT_S)],
    )
    server.start()
    try:
        server.wait_serving()
        yield server
    finally:
        assert server.stop() == 0


@pytest.mark.engine
def test_a_stalled_replica_is_ejected_once_and_returns_after_its_backoff(
    gateway: Gateway, replica: Replica, victim: Replica
) -> None:
    core = engine_core(victim)
    served_before = metric_sum(victim.metrics_url, "sloserve_requests_total")
    signal_process(core, signal.SIGSTOP)  # gRPC and load reports go on: only the engine hangs
    try:
        answers = [complete(gateway) for _ in range(10)]
    finally:
        signal_process(core, signal.SIGCONT)
    slow = [a for a in answers if a.seconds >= STALL_TIMEOUT_S]
    print(
        f"\n{len(slow)} of {len(answers)} requests waited the {STALL_TIMEOUT_S:g} s stall "
        f"timeout; times: {[round(a.seconds, 2) for a in answers]}"
    )
    assert all(a.status == 200 and a.error is None for a in answers), answers
    assert 1 <= len(slow) <= 2, "the stalled replica must be ejected after its first stall"
    stalls = metric_sum(
        gateway.metrics_url, "sloserve_gateway_replica_stalls_total", replica=victim.endpoint
    )
    assert stalls == len(slow)
    rerouted = metric_sum(gateway.metrics_url, "sloserve_gateway_rerouted_total", why="stalled")
    assert rerouted == len(slow)
    # The stalled calls were cancelled in time: the victim's engine never looked wedged.
    assert victim.process is not None and victim.process.poll() is None
    assert victim.health() == "SERVING"

    # Back after its back-off (10 s for a first stall), and serving again.
    wait_for_rotation(gateway, victim.endpoint, True)
    deadline = time.monotonic() + 60
    while metric_sum(victim.metrics_url, "sloserve_requests_total") <= served_before:
        assert time.monotonic() < deadline, "the victim served nothing after SIGCONT"
        assert complete(gateway).status == 200
    log = gateway.log_path.read_text()
    assert f"replica {victim.endpoint} sent nothing for {STALL_TIMEOUT_S:g} s" in log


@pytest.mark.engine
def test_a_killed_engine_core_takes_its_replica_out_and_no_client_sees_a_500(
    gateway: Gateway, replica: Replica, victim: Replica
) -> None:
    assert victim.process is not None
    answers: list[HttpAnswer] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        while not stop.is_set():
            answers.append(complete(gateway, stream=worker % 2 == 1, max_tokens=16))

    with ThreadPoolExecutor(4) as pool:
        workers = [pool.submit(load, i) for i in range(4)]
        time.sleep(2)  # requests on both replicas
        signal_process(engine_core(victim), signal.SIGKILL)
        killed_at = time.monotonic()
        not_serving_at = None
        while victim.process.poll() is None:
            if not_serving_at is None and victim.health() != "SERVING":
                not_serving_at = time.monotonic()
            assert time.monotonic() - killed_at < EXIT_BOUND_S, "the replica did not exit"
            time.sleep(0.1)
        exited_at = time.monotonic()
        time.sleep(3)  # and requests after the replica is gone
        stop.set()
        for worker in workers:
            worker.result()

    code = victim.process.returncode
    detected_s = (not_serving_at or exited_at) - killed_at
    print(
        f"\nkill -9 of the engine core: NOT_SERVING after {detected_s:.2f} s, exit {code} "
        f"after {exited_at - killed_at:.2f} s; {len(answers)} requests, statuses "
        f"{sorted({a.status for a in answers})}, failed "
        f"{[a.error['code'] for a in answers if a.error]}"
    )
    assert code == ENGINE_FAILED_EXIT_CODE
    assert detected_s < DETECTION_BOUND_S
    log = victim.log_path.read_text()
    assert "the engine is dead" in log
    assert "exiting in" in log

    for answer in answers:
        assert answer.status in (200, 429, 503), answer
        if answer.error is not None:  # an explicit error: 503/429, or a stream's last event
            assert answer.error["type"] in ("service_unavailable", "slo_rejected"), answer
    # Once the replica said it is out, every request succeeds on the other one.
    after = [a for a in answers if a.sent_at > (not_serving_at or exited_at) + 1.0]
    assert after, "no request was sent after the detection"
    assert all(a.status == 200 and a.error is None for a in after), after
    wait_for_rotation(gateway, victim.endpoint, False)
    failed = metric_sum(gateway.metrics_url, "sloserve_gateway_failed_requests_total")
    assert failed == sum(1 for a in answers if a.error is not None)


@pytest.mark.engine
def test_a_wedged_engine_ends_its_requests_and_the_replica_exits(victim: Replica) -> None:
    """The engine core stops with a request in it; the wedge check (--wedge-timeout 10)
    ends the request UNAVAILABLE, says NOT_SERVING, and exits non-zero."""
    assert victim.process is not None
    if victim.process.poll() is not None:  # killed by the test above: a fresh one
        victim.start()
        victim.wait_until("SERVING")
    core = engine_core(victim)
    signal_process(core, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        with (
            Client(victim.endpoint, timeout_s=TIMEOUT_S) as client,
            pytest.raises(UnavailableError) as error,
        ):
            client.generate(PROMPT, max_tokens=4)
        ended_s = time.monotonic() - stopped_at
        assert "wedged" in error.value.message
        assert victim.health() in ("NOT_SERVING", "UNREACHABLE")
        code = victim.process.wait(EXIT_BOUND_S)
        exited_s = time.monotonic() - stopped_at
    finally:
        signal_process(core, signal.SIGCONT)
    print(
        f"\nwedged engine: request ended after {ended_s:.1f} s, exit {code} after {exited_s:.1f} s"
    )
    assert WEDGE_TIMEOUT_S <= ended_s < WEDGE_TIMEOUT_S + 10
    assert code == ENGINE_FAILED_EXIT_CODE
    assert "the engine is wedged" in victim.log_path.read_text()
    assert gone(core), "the replica left its engine core behind"


# -- slow probes: a proxy that reports late and answers probes late --------------------------


class SlowProbeProxy(
    inference_pb2_grpc.InferenceServicer, replica_control_pb2_grpc.ReplicaControlServicer
):
    """Forwards to a real replica, but passes on one load report per `report_every_s` (so the
    gateway finds its report stale and probes) and answers each Probe after `probe_delay_s`
    (longer than the gateway waits for one)."""

    def __init__(self, target: str, report_every_s: float, probe_delay_s: float) -> None:
        channel = grpc.aio.insecure_channel(target)
        self._inference = inference_pb2_grpc.InferenceStub(channel)
        self._control = replica_control_pb2_grpc.ReplicaControlStub(channel)
        self.report_every_s = report_every_s
        self.probe_delay_s = probe_delay_s
        self.probes = 0
        self.reported_at = -float("inf")  # time.monotonic() of the latest report passed on

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        try:
            async for response in self._inference.Generate(request):
                yield response
        except grpc.aio.AioRpcError as error:
            await context.abort(error.code(), error.details() or "")

    async def WatchLoad(
        self, request: replica_control_pb2.WatchLoadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[replica_control_pb2.WatchLoadResponse]:
        last = -float("inf")
        async for response in self._control.WatchLoad(request):
            if time.monotonic() - last >= self.report_every_s:
                last = time.monotonic()
                self.reported_at = last
                yield response

    async def Probe(
        self, request: replica_control_pb2.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> replica_control_pb2.ProbeResponse:
        self.probes += 1
        await asyncio.sleep(self.probe_delay_s)
        answer: replica_control_pb2.ProbeResponse = await self._control.Probe(request)
        return answer


@contextlib.contextmanager
def slow_probe_proxies(target: str, count: int) -> Iterator[list[tuple[str, SlowProbeProxy]]]:
    """`count` proxies to `target`, served from an event loop of their own, in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="proxies", daemon=True)
    thread.start()
    servers: list[grpc.aio.Server] = []

    async def start() -> list[tuple[str, SlowProbeProxy]]:
        started = []
        for _ in range(count):
            proxy = SlowProbeProxy(target, report_every_s=1.5, probe_delay_s=1.0)
            server = grpc.aio.server()
            inference_pb2_grpc.add_InferenceServicer_to_server(proxy, server)
            inference_mux_pb2_grpc.add_InferenceMuxServicer_to_server(
                InferenceMuxService(proxy), server
            )
            replica_control_pb2_grpc.add_ReplicaControlServicer_to_server(proxy, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            started.append((f"127.0.0.1:{port}", proxy))
        return started

    async def stop() -> None:
        for server in servers:
            await server.stop(grace=None)

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    finally:
        asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


async def _stream(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 8,
        "ignore_eos": True,
        "stream": True,
        # Loose budgets: this test is about routing, not about admission under a burst.
        "slo": {"ttft_ms": 60_000, "tpot_ms": 5_000},
    }
    async with session.post(url, json=body) as response:
        return response.status, await response.text()


async def _concurrent_streams(url: str, count: int) -> list[tuple[int, str]]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=count)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        return await asyncio.gather(*(_stream(session, url) for _ in range(count)))


def _wait_until_stale(proxy: SlowProbeProxy) -> None:
    """Returns 0.7 s after the proxy passed a report on: the gateway finds it stale (older
    than two 0.25 s intervals) until the next one, 0.8 s later, so requests sent now probe."""
    deadline = time.monotonic() + 10
    passed = proxy.reported_at
    while proxy.reported_at == passed:
        assert time.monotonic() < deadline, "the proxy passed no load report on in 10 s"
        time.sleep(0.01)
    time.sleep(0.7)


@pytest.mark.engine
def test_slow_probes_do_not_take_replicas_out(replica: Replica, tmp_path: Path) -> None:
    with slow_probe_proxies(replica.endpoint, 2) as proxies:
        gateway = Gateway(workdir=tmp_path, replicas=[endpoint for endpoint, _ in proxies])
        gateway.start()
        try:
            gateway.wait_serving()
            _wait_until_stale(proxies[0][1])
            answers = asyncio.run(_concurrent_streams(f"{gateway.base_url}/completions", 100))
        finally:
            assert gateway.stop() == 0
    statuses = [status for status, _ in answers]
    probes = sum(proxy.probes for _, proxy in proxies)
    print(f"\n100 streams with slow probes: statuses {sorted(set(statuses))}, {probes} probes")
    assert statuses.count(503) == 0, [text for status, text in answers if status == 503][:3]
    assert all(status == 200 for status in statuses)
    assert all(text.rstrip().endswith("data: [DONE]") for _, text in answers)
    assert probes >= 1, "the gateway never probed: the test did not test slow probes"
    assert "NO_REPLICA" not in gateway.log_path.read_text()

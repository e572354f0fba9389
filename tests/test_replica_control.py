"""ReplicaControl over real gRPC: probe, configure, load reports, reflection, drain."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Replica
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from sloserve.client import AsyncClient, Client, GenerationResult
from sloserve.errors import UnavailableError
from sloserve.v1 import replica_control_pb2 as pb
from sloserve.v1 import replica_control_pb2_grpc as control_grpc


def _stub(channel: grpc.Channel) -> control_grpc.ReplicaControlStub:
    return control_grpc.ReplicaControlStub(channel)


def test_probe_predicts_ttft_and_slack_for_a_class(replica: Replica) -> None:
    with Client(replica.endpoint, timeout_s=60) as client:
        client.generate("warm the estimator", max_tokens=4)  # one first token to learn from
    with grpc.insecure_channel(replica.endpoint) as channel:
        probe = pb.ProbeRequest(prompt_tokens=200, max_tokens=16)
        probe.slo.class_name = "coding"
        reply = _stub(channel).Probe(probe, timeout=10)
    assert reply.admissible
    predicted = reply.predicted_ttft.ToNanoseconds() / 1e9
    assert predicted > 0
    # coding's TTFT budget is 4 s in tests/classes.yaml
    assert reply.slack.ToNanoseconds() / 1e9 == pytest.approx(4.0 - predicted, abs=1e-6)


def _classes(*specs: tuple[str, int, int]) -> pb.ConfigureRequest:
    request = pb.ConfigureRequest(default_class=specs[0][0])
    for name, ttft_ms, tpot_ms in specs:
        budgets = request.classes.add(name=name).budgets
        budgets.ttft.FromMilliseconds(ttft_ms)
        budgets.tpot.FromMilliseconds(tpot_ms)
    return request


def test_configure_replaces_classes_and_requests_see_them(replica: Replica) -> None:
    with grpc.insecure_channel(replica.endpoint) as channel:
        stub = _stub(channel)
        reply = stub.Configure(
            _classes(("chat", 5000, 500), ("coding", 4000, 250), ("batch", 60000, 2000)), timeout=10
        )
        assert [c.name for c in reply.classes] == ["chat", "coding", "batch"]
        assert reply.default_class == "chat"
        with Client(replica.endpoint, timeout_s=60) as client:
            result = client.generate("configured", slo_class="batch", max_tokens=4)
        assert result.class_name == "batch"
        # Put tests/classes.yaml back for the other tests.
        restore = _classes(("chat", 5000, 500), ("coding", 4000, 250), ("reasoning", 5000, 500))
        restore.classes[2].budgets.thinking_tpot.FromMilliseconds(250)
        stub.Configure(restore, timeout=10)


def test_load_reports_stream_and_count_finished_requests(replica: Replica) -> None:
    with Client(replica.endpoint, timeout_s=60) as client:
        client.generate("counted", slo_class="chat", max_tokens=4)
    with grpc.insecure_channel(replica.endpoint) as channel:
        request = pb.WatchLoadRequest()
        request.interval.FromMilliseconds(100)
        stream = _stub(channel).WatchLoad(request, timeout=10)
        reports = []
        for response in stream:
            reports.append(response.report)
            if len(reports) == 3:
                break
        stream.cancel()
    assert all(r.ready and not r.draining for r in reports)
    times = [r.time.ToNanoseconds() for r in reports]
    assert times == sorted(times) and times[-1] - times[0] >= 150_000_000
    chat = next(c for c in reports[-1].classes if c.class_name == "chat")
    assert chat.finished >= 1 and chat.attained <= chat.finished


def test_server_reflection_lists_the_services(replica: Replica) -> None:
    with grpc.insecure_channel(replica.endpoint) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "sloserve.v1.Inference",
        "sloserve.v1.InferenceMux",
        "sloserve.v1.ReplicaControl",
        "grpc.health.v1.Health",
    } <= services


@pytest.fixture(scope="module")
def drained_replica(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    """A replica of its own: once drained it admits nothing again."""
    server = Replica(workdir=tmp_path_factory.mktemp("drain-rpc"))
    server.start()
    server.wait_until("SERVING")
    yield server
    server.stop()


def test_drain_rpc_finishes_in_flight_and_admits_nothing_new(drained_replica: Replica) -> None:
    async def scenario() -> tuple[list[GenerationResult], int, BaseException | None]:
        async with AsyncClient(drained_replica.endpoint, timeout_s=120) as client:
            tasks = [
                asyncio.create_task(
                    client.generate(f"in flight {i}", max_tokens=600, ignore_eos=True)
                )
                for i in range(3)
            ]
            await asyncio.sleep(0.5)  # let them start
            channel = grpc.aio.insecure_channel(drained_replica.endpoint)
            reply = await _stub(channel).Drain(pb.DrainRequest(), timeout=10)
            await channel.close()
            refused: BaseException | None = None
            try:
                await client.generate("after the drain", max_tokens=4)
            except UnavailableError as error:
                refused = error
            return list(await asyncio.gather(*tasks)), reply.in_flight, refused

    results, in_flight, refused = asyncio.run(scenario())
    assert in_flight == 3
    assert isinstance(refused, UnavailableError)
    assert all(r.completion_tokens == 600 for r in results)
    assert drained_replica.health() == "NOT_SERVING"
    assert drained_replica.process is not None and drained_replica.process.poll() is None

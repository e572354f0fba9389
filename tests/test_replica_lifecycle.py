"""A replica's life: UNAVAILABLE while starting, QUEUE_FULL under a flood, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Replica, metric_sum

from sloserve.client import AsyncClient, GenerationResult, build_request
from sloserve.cpu_cores import allowed_cores
from sloserve.errors import RejectedError, UnavailableError
from sloserve.v1 import inference_pb2_grpc, replica_control_pb2, replica_control_pb2_grpc

MAX_WAITING = 2
BOUND_CORE = allowed_cores()[-1]


@pytest.fixture(scope="module")
def starting_replica(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    """A replica of its own (the drain test stops it), not yet waited for; its engine
    computes on the last core, where vLLM's own choice would be the first."""
    server = Replica(
        workdir=tmp_path_factory.mktemp("lifecycle"),
        args=["--max-waiting", str(MAX_WAITING), "--cpu-cores", str(BOUND_CORE)],
    )
    server.start()
    yield server
    server.stop()


def test_calls_before_engine_ready_get_unavailable(starting_replica: Replica) -> None:
    starting_replica.wait_until("NOT_SERVING")  # gRPC is up, the engine is not
    with grpc.insecure_channel(starting_replica.endpoint) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(build_request("hi"), timeout=10)
        with pytest.raises(grpc.RpcError) as raised:
            list(call)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "starting" in raised.value.details()
        probe = replica_control_pb2_grpc.ReplicaControlStub(channel).Probe
        with pytest.raises(grpc.RpcError) as raised:
            probe(replica_control_pb2.ProbeRequest(prompt_tokens=4, max_tokens=4), timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert starting_replica.health() == "NOT_SERVING"
    starting_replica.wait_until("SERVING")


def test_the_engine_serves_a_warm_up_request_before_the_replica_says_serving(
    starting_replica: Replica,
) -> None:
    """A fresh engine's first request is slow to reach the scheduler (first-use set-up): one
    warm-up request (a prefill step and a decode step) pays for it before any client's does,
    and counts as no client request."""
    starting_replica.wait_until("SERVING")
    url = starting_replica.metrics_url
    deadline = time.monotonic() + 10  # step reports reach the metrics a moment later
    while metric_sum(url, "sloserve_step_seconds_count") < 2:
        assert time.monotonic() < deadline, "no warm-up steps"
        time.sleep(0.1)
    assert metric_sum(url, "sloserve_requests_total") == 0


def test_the_engine_computes_on_the_cores_it_was_given(starting_replica: Replica) -> None:
    starting_replica.wait_until("SERVING")
    assert starting_replica.process is not None
    processes = _descendants(starting_replica.process.pid)
    # vLLM's CPU engine computes in a worker process of the engine core's.
    workers = [pid for pid, name in processes.items() if name.startswith("VLLM::Worker")]
    assert workers, processes
    for worker in workers:
        assert os.sched_getaffinity(worker) == {BOUND_CORE}


def _descendants(root: int) -> dict[int, str]:
    """The processes below `root`, by pid, with their names (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid in [p for p, pp in parents.items() if pp == parent]:
            found[pid] = (Path("/proc") / str(pid) / "comm").read_text().strip()
            frontier.append(pid)
    return found


def test_flood_past_the_queue_bound_is_rejected_with_reason(starting_replica: Replica) -> None:
    starting_replica.wait_until("SERVING")

    async def flood() -> list[GenerationResult | BaseException]:
        async with AsyncClient(starting_replica.endpoint, timeout_s=120) as client:
            return await asyncio.gather(
                *[client.generate([7] * 900, max_tokens=8, ignore_eos=True) for _ in range(24)],
                return_exceptions=True,
            )

    outcomes = asyncio.run(flood())
    rejected = [o for o in outcomes if isinstance(o, RejectedError)]
    served = [o for o in outcomes if isinstance(o, GenerationResult)]
    assert len(rejected) + len(served) == len(outcomes), f"unexpected errors: {outcomes}"
    assert rejected, "24 simultaneous long prompts must overflow a queue of 2"
    assert served, "the queue's own requests are served"
    assert {r.reason for r in rejected} == {"QUEUE_FULL"}
    assert all(r.retry_after_s is not None and r.retry_after_s > 0 for r in rejected)
    assert all(s.completion_tokens == 8 for s in served)


def test_sigterm_drains_without_losing_a_request(starting_replica: Replica) -> None:
    starting_replica.wait_until("SERVING")
    process = starting_replica.process
    assert process is not None
    streams = 6

    async def drain() -> tuple[list[GenerationResult], float, BaseException | None]:
        async with AsyncClient(starting_replica.endpoint, timeout_s=120) as client:
            results = [GenerationResult(sent_at=time.time()) for _ in range(streams)]
            started = [asyncio.Event() for _ in range(streams)]

            async def run(i: int) -> None:
                request = build_request(f"drain {i}", max_tokens=1000, ignore_eos=True)
                async for response in client.stream(request):
                    results[i].feed(response, time.time())
                    if results[i].token_ids:
                        started[i].set()

            tasks = []
            for i in range(streams):  # one by one: the queue holds only MAX_WAITING
                tasks.append(asyncio.create_task(run(i)))
                await asyncio.wait_for(started[i].wait(), 60)
            sigterm_at = time.time()
            os.kill(process.pid, signal.SIGTERM)
            await asyncio.sleep(0.3)
            late: BaseException | None = None
            try:
                await client.generate("too late", max_tokens=4)
            except UnavailableError as error:
                late = error
            await asyncio.gather(*tasks)
            return results, sigterm_at, late

    results, sigterm_at, late = asyncio.run(drain())
    assert isinstance(late, UnavailableError), "a draining replica admits nothing new"
    for result in results:
        assert result.finish_reason == "length"
        assert result.completion_tokens == len(result.token_ids) == 1000
        assert result.token_times[-1] > sigterm_at, "the stream was in flight at SIGTERM"
    assert process.wait(60) == 0

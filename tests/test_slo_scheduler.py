"""The SLO scheduler inside real vLLM: admission verdicts, best effort and expiry, end to end
over gRPC on the tiny model."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import Replica

from sloserve.client import Client, GenerationResult, build_request
from sloserve.errors import RejectedError, SloserveError
from sloserve.protoconv import duration, seconds
from sloserve.v1 import slo_pb2

PROMPT = list(range(10, 210))  # 200 tokens


def trace_events(replica: Replica) -> list[dict[str, object]]:
    lines = replica.trace_path.read_text().splitlines() if replica.trace_path.exists() else []
    return [json.loads(line) for line in lines]


def metrics_text(replica: Replica) -> str:
    with urllib.request.urlopen(replica.metrics_url, timeout=5) as response:
        return str(response.read().decode())


def test_a_feasible_request_is_admitted_and_attains(replica: Replica) -> None:
    with Client(replica.endpoint) as client:
        result = client.generate(PROMPT, ttft_s=2.0, tpot_s=0.5, max_tokens=8, ignore_eos=True)
    assert not result.best_effort
    assert result.completion_tokens == 8 and len(result.token_ids) == 8
    assert result.slo_outcome.attained


def test_an_impossible_ttft_is_rejected_with_its_reason(replica: Replica) -> None:
    # No engine prefills 200 tokens in 0.1 ms, and the policy knows it from the profile.
    with Client(replica.endpoint) as client, pytest.raises(RejectedError) as rejected:
        client.generate(PROMPT, ttft_s=0.0001, tpot_s=0.5, max_tokens=8, request_id="no-way")
    assert rejected.value.reason == "COMPUTE"
    assert rejected.value.retry_after_s is not None and rejected.value.retry_after_s > 0
    verdicts = [e for e in trace_events(replica) if e.get("request_id") == "no-way"]
    assert [e["event"] for e in verdicts if e["event"] != "added"] == ["rejected"]
    assert 'event="rejected",reason="COMPUTE"' in metrics_text(replica)


def test_a_request_that_already_waited_keeps_its_class_and_its_true_deadline(
    replica: Replica,
) -> None:
    """`already_waited` (set by a gateway that retries a request) counts against the TTFT
    budget: chat's 5 s with 2 s spent upstream leaves 3 s, the request stays in its class,
    and its outcome is judged from the arrival upstream."""
    request = build_request(
        PROMPT, slo_class="chat", max_tokens=4, ignore_eos=True, request_id="waited-2s"
    )
    request.already_waited.CopyFrom(duration(2.0))
    with Client(replica.endpoint) as client:
        events = list(client.stream(request))
    admission, completion = events[0].admission, events[-1].completion
    assert admission.class_name == "chat" and admission.budgets.ttft.ToMilliseconds() == 5000
    assert admission.mode == slo_pb2.ADMISSION_MODE_ADMITTED
    # TTFT from the arrival upstream: the 2 s already waited plus this replica's own time;
    # the latency is this replica's own time only.
    ttft_s, latency_s = seconds(completion.slo_outcome.ttft), seconds(completion.latency)
    assert 2.0 <= ttft_s < 2.0 + latency_s
    assert completion.slo_outcome.attained
    (added,) = [
        e for e in trace_events(replica) if e.get("request_id") == "waited-2s" and
        e["event"] == "added"
    ]  # fmt: skip
    assert added["class_name"] == "chat" and added["already_waited_s"] == 2.0


def test_admission_counts_what_a_request_already_waited(replica: Replica) -> None:
    """A 50 ms TTFT budget is plenty for 200 tokens on the tiny model (about 5 ms to prefill);
    with 49.9 ms of it spent upstream, the 2.6 ms left (with the judge's 5%) are not, and the
    SLO policy turns the request away as it would an impossible budget."""
    hopeless = build_request(PROMPT, ttft_s=0.05, tpot_s=0.5, max_tokens=4, request_id="waited")
    hopeless.already_waited.CopyFrom(duration(0.0499))
    with Client(replica.endpoint) as client, pytest.raises(RejectedError) as rejected:
        list(client.stream(hopeless))
    assert rejected.value.reason == "COMPUTE"
    verdicts = [e for e in trace_events(replica) if e.get("request_id") == "waited"]
    assert [e["event"] for e in verdicts if e["event"] != "added"] == ["rejected"]
    assert verdicts[0]["already_waited_s"] == pytest.approx(0.0499)


def test_best_effort_when_the_client_accepts_it(replica: Replica) -> None:
    with Client(replica.endpoint) as client:
        result = client.generate(
            PROMPT, ttft_s=0.0001, tpot_s=0.5, max_tokens=12, ignore_eos=True,
            allow_best_effort=True,
        )  # fmt: skip
    assert result.best_effort and result.best_effort_reason == "COMPUTE"
    # served in full, every token once, but not counted as attaining its SLO
    assert result.completion_tokens == 12 and len(result.token_ids) == 12
    assert not result.slo_outcome.attained


# -- expiry, on an engine that runs slower than its profile (fault injection) ---------------


@pytest.fixture(scope="module")
def slow_replica(
    tiny_model: Path, tiny_profile: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    server = Replica(
        workdir=tmp_path_factory.mktemp("slow-replica"),
        args=["--profile", str(tiny_profile), "--fault-step-delay", "0.05"],
    )
    server.start()
    try:
        server.wait_until("SERVING")
        yield server
    finally:
        server.stop()


# Steps take 50 ms more than the profile predicts: a 20 ms TPOT falls 30 ms further behind at
# every token, so within a few tokens the request can no longer meet its SLO.
LATE = {"ttft_s": 0.3, "tpot_s": 0.02, "max_tokens": 40, "ignore_eos": True}


def test_an_expired_request_is_demoted_and_still_completes(slow_replica: Replica) -> None:
    with Client(slow_replica.endpoint) as client:
        result: GenerationResult = client.generate(PROMPT, request_id="late", **LATE)
    assert result.best_effort and result.best_effort_reason == "EXPIRED"
    assert result.demoted_after_tokens is not None and 0 < result.demoted_after_tokens < 40
    assert result.completion_tokens == 40 and len(result.token_ids) == 40
    assert not result.slo_outcome.attained
    events = [e["event"] for e in trace_events(slow_replica) if e.get("request_id") == "late"]
    assert "demoted" in events


def test_a_strict_request_that_expires_ends_with_deadline_exceeded(
    slow_replica: Replica,
) -> None:
    received = 0
    with Client(slow_replica.endpoint) as client, pytest.raises(SloserveError) as ended:
        for response in client.stream(build_request(PROMPT, strict=True, **LATE)):  # type: ignore[arg-type]
            if response.WhichOneof("event") == "delta":
                received += len(response.delta.token_ids)
    assert ended.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"after {received} tokens" in ended.value.message
    assert 0 < received < 40
    assert 'event="aborted",reason="EXPIRED"' in metrics_text(slow_replica)


def test_seeded_prompts_are_never_split_on_the_cpu_engine(replica: Replica) -> None:
    """vLLM's CPU sampler cannot rewind a seeded request's generator after a partial prefill
    (the engine dies). Eight 400-token seeded prompts at once exceed one step's 2,048 tokens,
    so the planner must run each prompt whole, in some step, and all must complete."""

    def one(i: int) -> GenerationResult:
        with Client(replica.endpoint, timeout_s=120) as client:
            prompt = [10 + (i * 37 + k) % 400 for k in range(400)]
            return client.generate(prompt, max_tokens=4, ignore_eos=True, seed=i, slo_class="chat")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(8)))
    assert [r.completion_tokens for r in results] == [4] * 8
    steps = [e for e in trace_events(replica) if e["event"] == "step"]
    assert steps and all(int(str(e["tokens"])) <= 2048 for e in steps)

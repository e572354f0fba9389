"""A real gateway process in front of two real replicas (vLLM on CPU, the tiny model): gRPC
and the official `openai` client, routing over both replicas, bad input, rejections, the
best-effort queue."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from conftest import Gateway, Replica, metric_sum

from sloserve.client import Client, GenerationResult, build_request
from sloserve.errors import InvalidArgumentError, RejectedError
from sloserve.protoconv import duration
from sloserve.v1 import inference_pb2

pytestmark = pytest.mark.engine

PROMPT = list(range(10, 60))  # 50 token ids
IMPOSSIBLE = {"ttft_s": 0.0001, "tpot_s": 0.5}  # no engine prefills 50 tokens in 0.1 ms
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def gateway(
    replica: Replica, other_replica: Replica, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    # A replica takes spilled work only when idle, and each class queues one request: small
    # enough for a test to fill.
    server = Gateway(
        workdir=tmp_path_factory.mktemp("gateway"),
        replicas=[replica.endpoint, other_replica.endpoint],
        args=["--spill-max-in-flight", "1", "--queue-capacity", "1", "--queue-ttl", "60"],
    )
    server.start()
    try:
        server.wait_serving()
        yield server
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def oai(gateway: Gateway) -> openai.OpenAI:
    # No retries: a 429 must reach the test, not be retried by the client library.
    return openai.OpenAI(
        base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S
    )


def summary(gateway: Gateway) -> dict[str, Any]:
    with urllib.request.urlopen(f"{gateway.base_url}/slo/summary", timeout=5) as response:
        data: dict[str, Any] = json.load(response)
    return data


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- gRPC ---------------------------------------------------------------------------------


def test_a_grpc_stream_passes_through_with_the_gateways_slo_verdict(gateway: Gateway) -> None:
    events: list[str] = []
    result = GenerationResult(sent_at=time.time())
    with Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client:
        request = inference_pb2.GenerateRequest(request_id="through-the-gateway")
        request.prompt.token_ids.ids.extend(PROMPT)
        request.slo.class_name = "chat"
        request.sampling.max_tokens = 8
        request.sampling.ignore_eos = True
        for response in client.stream(request):
            events.append(str(response.WhichOneof("event")))
            result.feed(response, time.time())
    assert events[0] == "admission" and events[-1] == "completion"
    assert set(events[1:-1]) == {"delta"}
    assert result.request_id == "through-the-gateway" and result.class_name == "chat"
    assert not result.best_effort
    assert result.completion_tokens == 8 and len(result.token_ids) == 8
    assert result.finish_reason == "length"
    # Judged by the gateway from its own arrival: the budgets are 5 s and 500 ms.
    assert result.slo_outcome.attained and result.slo_outcome.ttft.ToNanoseconds() > 0
    assert summary(gateway)["classes"]["chat"]["attained"] >= 1


def test_concurrent_requests_are_spread_over_both_replicas(
    gateway: Gateway, replica: Replica, other_replica: Replica
) -> None:
    def served(r: Replica) -> float:
        return metric_sum(r.metrics_url, "sloserve_requests_total")

    before = served(replica), served(other_replica)
    with Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client, ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda _: client.generate(PROMPT, slo_class="chat", max_tokens=32, ignore_eos=True),
                range(4),
            )
        )
    assert all(r.completion_tokens == 32 for r in results)
    # Slack routing counts what it just sent: four at once land two and two.
    assert served(replica) - before[0] >= 1
    assert served(other_replica) - before[1] >= 1


def test_bad_grpc_input_is_invalid_argument_naming_the_field(gateway: Gateway) -> None:
    with Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client:
        # Checked by the gateway itself.
        with pytest.raises(InvalidArgumentError) as unknown_class:
            client.generate(PROMPT, slo_class="no-such-class", max_tokens=4)
        assert unknown_class.value.field == "slo.class_name"
        with pytest.raises(InvalidArgumentError) as no_prompt:
            list(client.stream(inference_pb2.GenerateRequest()))
        assert no_prompt.value.field == "prompt"
        with pytest.raises(InvalidArgumentError) as bad_budget:
            client.generate(PROMPT, ttft_s=1.0, max_tokens=4)  # no tpot
        assert bad_budget.value.field == "slo.budgets.tpot"
        # Already waited upstream longer than the whole TTFT budget (chat: 5 s).
        waited_too_long = build_request(PROMPT, slo_class="chat", max_tokens=4)
        waited_too_long.already_waited.CopyFrom(duration(6.0))
        with pytest.raises(InvalidArgumentError) as too_late:
            list(client.stream(waited_too_long))
        assert too_late.value.field == "already_waited"
        assert "TTFT budget" in too_late.value.message
        # Needs the tokenizer and the model's context: the replica's answer, passed on.
        with pytest.raises(InvalidArgumentError) as too_long:
            client.generate(PROMPT, max_tokens=5000)
        assert too_long.value.field == "sampling.max_tokens"
        assert "context" in too_long.value.message


def test_a_request_no_replica_admits_is_rejected_with_reason_and_retry_after(
    gateway: Gateway,
) -> None:
    with (
        Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client,
        pytest.raises(RejectedError) as rejected,
    ):
        client.generate(PROMPT, max_tokens=4, **IMPOSSIBLE)
    assert rejected.value.reason == "COMPUTE"
    assert rejected.value.retry_after_s is not None and rejected.value.retry_after_s > 0
    # A retry counts the time already spent against the TTFT budget, and the first rejection
    # used up all 0.1 ms of it: the other replica is not asked (retries: test_gateway_retry.py).
    assert "1 tried" in rejected.value.message


def test_a_best_effort_request_no_replica_admits_is_queued_and_completes(
    gateway: Gateway,
) -> None:
    spilled = metric_sum(gateway.metrics_url, "sloserve_gateway_spilled_total", slo_class="")
    with Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client:
        result = client.generate(
            PROMPT, max_tokens=6, ignore_eos=True, allow_best_effort=True, **IMPOSSIBLE
        )
    assert result.best_effort and result.best_effort_reason == "COMPUTE"
    assert result.completion_tokens == 6 and len(result.token_ids) == 6
    assert not result.slo_outcome.attained  # served, but not in its class
    after = metric_sum(gateway.metrics_url, "sloserve_gateway_spilled_total", slo_class="")
    assert after == spilled + 1


def test_a_full_queue_answers_resource_exhausted_and_429_with_retry_after(
    gateway: Gateway, oai: openai.OpenAI
) -> None:
    results: dict[str, GenerationResult] = {}

    def run(name: str, **options: Any) -> None:
        with Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client:
            results[name] = client.generate(PROMPT, **options)

    # One long request on each replica: neither has room for best-effort work now.
    long_runs = [
        threading.Thread(
            target=run, args=(f"long-{i}",), kwargs={"max_tokens": 600, "ignore_eos": True}
        )
        for i in range(2)
    ]
    for thread in long_runs:
        thread.start()
    wait_for(
        lambda: all(r["gateway_in_flight"] == 1 for r in summary(gateway)["replicas"]),
        "one long request on each replica",
    )
    queued = threading.Thread(
        target=run,
        args=("queued",),
        kwargs={"max_tokens": 4, "ignore_eos": True, "allow_best_effort": True, **IMPOSSIBLE},
    )
    queued.start()
    wait_for(lambda: summary(gateway)["queue"]["depth"].get("(budgets)") == 1, "the queued request")

    with (
        Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client,
        pytest.raises(RejectedError) as full,
    ):
        client.generate(PROMPT, max_tokens=4, allow_best_effort=True, **IMPOSSIBLE)
    assert full.value.reason == "QUEUE_FULL"
    assert full.value.retry_after_s is not None and full.value.retry_after_s > 0

    with pytest.raises(openai.RateLimitError) as limited:
        oai.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=4,
            extra_body={"slo": {"ttft_ms": 0.1, "tpot_ms": 500}, "allow_best_effort": True},
        )
    assert limited.value.status_code == 429
    assert limited.value.code == "QUEUE_FULL"
    assert int(limited.value.response.headers["Retry-After"]) >= 1

    for thread in [*long_runs, queued]:
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()
    # The queued request ran once a replica had room, as best effort.
    assert results["queued"].best_effort and results["queued"].completion_tokens == 4
    assert all(results[f"long-{i}"].completion_tokens == 600 for i in range(2))
    assert summary(gateway)["queue"]["depth"].get("(budgets)") == 0


# -- the OpenAI-compatible HTTP API, through the official client ---------------------------


def test_models_lists_the_served_model(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == ["tiny"]


def test_openai_completions_stream_and_not(oai: openai.OpenAI) -> None:
    options: dict[str, Any] = {
        "model": "tiny",
        "prompt": "Once upon a time",
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": {"ignore_eos": True, "slo_class": "chat"},
    }
    whole = oai.completions.create(**options)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens > 0

    chunks = list(oai.completions.create(stream=True, **options))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    # Greedy decoding of the same prompt: the stream adds up to the same text.
    assert streamed == whole.choices[0].text


def test_openai_chat_completions_stream_and_not(oai: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something."},
    ]
    whole = oai.chat.completions.create(
        model="tiny",
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        extra_headers={"x-sloserve-slo-class": "coding"},
        extra_body={"ignore_eos": True},
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 10
    assert (whole.model_extra or {})["sloserve"]["slo_class"] == "coding"

    stream = oai.chat.completions.create(
        model="tiny",
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-sloserve-slo-class": "coding"},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


def test_openai_explicit_budgets_in_the_body(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(
        model="tiny",
        prompt="Budgets",
        max_tokens=4,
        extra_body={"slo": {"ttft_ms": 4000, "tpot_ms": 400}, "ignore_eos": True},
    )
    report = (whole.model_extra or {})["sloserve"]
    assert report["mode"] == "admitted" and report["slo_class"] == ""
    assert whole.usage is not None and whole.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"max_tokens": 5000}, "max_tokens"),  # the replica's check, in the body's terms
        ({"max_tokens": 4, "extra_body": {"slo_class": "nope"}}, "slo_class"),
        ({"max_tokens": 4, "extra_body": {"slo": {"ttft_ms": 100}}}, "slo.tpot_ms"),
        ({"max_tokens": 4, "temperature": -1}, "temperature"),
        ({"max_tokens": 4, "prompt": ""}, "prompt"),
    ],
)
def test_bad_http_input_is_400_naming_the_field(
    oai: openai.OpenAI, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(**{"model": "tiny", "prompt": "Hello", **options})
    assert bad.value.status_code == 400
    assert bad.value.param == param
    assert param in bad.value.message


def test_bad_chat_input_is_400_naming_the_field(oai: openai.OpenAI) -> None:
    messages: Any = [{"role": "wizard", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model="tiny", messages=messages)
    assert bad.value.param == "messages[0].role"


def test_a_rejection_over_http_is_429_with_retry_after(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as limited:
        oai.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=4,
            extra_body={"slo": {"ttft_ms": 0.1, "tpot_ms": 500}},
        )
    assert limited.value.code == "COMPUTE"
    assert int(limited.value.response.headers["Retry-After"]) >= 1


def test_the_slo_summary_and_metrics_report_per_class(gateway: Gateway) -> None:
    with Client(gateway.endpoint, timeout_s=TIMEOUT_S) as client:
        client.generate(PROMPT, slo_class="chat", max_tokens=4)
        with pytest.raises(RejectedError):
            client.generate(PROMPT, max_tokens=4, **IMPOSSIBLE)
    data = summary(gateway)
    chat = data["classes"]["chat"]
    assert chat["arrived"] >= chat["attained"] >= 1
    assert 0 < chat["attainment"] <= 1 and chat["ttft_s"]["p50"] > 0
    assert data["routing"] == "slack" and len(data["replicas"]) == 2
    assert all(r["in_rotation"] for r in data["replicas"])
    url = gateway.metrics_url
    assert metric_sum(url, "sloserve_gateway_ttft_seconds_count", slo_class="chat") >= 1
    assert metric_sum(url, "sloserve_gateway_attainment", slo_class="chat") > 0
    assert metric_sum(url, "sloserve_gateway_rejections_total", reason="COMPUTE") >= 1
    assert metric_sum(url, "sloserve_gateway_replicas_in_rotation") == 2

"""Bad input gets INVALID_ARGUMENT naming the field, over real gRPC to a real replica."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Sequence

import grpc
import pytest
from conftest import Replica
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sloserve.client import Client, build_request
from sloserve.errors import FieldError, InvalidArgumentError
from sloserve.protoconv import duration
from sloserve.replica.validation import (
    ModelLimits,
    ValidRequest,
    validate,
    validate_off_loop,
)
from sloserve.slo import RequestSlo, SloCatalog
from sloserve.v1 import inference_pb2, inference_pb2_grpc, replica_control_pb2
from sloserve.v1 import replica_control_pb2_grpc as control_grpc

MAX_MODEL_LEN = 1024  # the tiny model's context


def waited(request: inference_pb2.GenerateRequest, seconds: float) -> inference_pb2.GenerateRequest:
    """`request` saying it already waited `seconds` upstream."""
    request.already_waited.CopyFrom(duration(seconds))
    return request


CASES = {
    "empty prompt text": (build_request("", max_tokens=4), "prompt.text"),
    "blank prompt text": (build_request("   ", max_tokens=4), "prompt.text"),
    "empty token ids": (
        inference_pb2.GenerateRequest(prompt=inference_pb2.Prompt(token_ids={"ids": []})),
        "prompt.token_ids",
    ),
    "no prompt": (inference_pb2.GenerateRequest(), "prompt"),
    "max_tokens zero": (build_request("hi", max_tokens=0), "sampling.max_tokens"),
    "max_tokens negative": (build_request("hi", max_tokens=-3), "sampling.max_tokens"),
    "max_tokens past context": (
        build_request("hi", max_tokens=MAX_MODEL_LEN + 1),
        "sampling.max_tokens",
    ),
    "unknown class": (build_request("hi", slo_class="platinum"), "slo.class_name"),
    "oversized prompt": (build_request([5] * (MAX_MODEL_LEN + 10)), "prompt"),
    # Past 32 characters a token of context: refused before it is tokenized.
    "prompt text past the character cap": (
        build_request("ab" * (MAX_MODEL_LEN * 16 + 1)),
        "prompt.text",
    ),
    "token id outside vocabulary": (build_request([5, 10**6]), "prompt.token_ids"),
    "budgets without tpot": (build_request("hi", ttft_s=1.0), "slo.budgets.tpot"),
    "negative temperature": (build_request("hi", temperature=-1.0), "sampling.temperature"),
    "top_p zero": (build_request("hi", top_p=0.0), "sampling.top_p"),
    "negative already_waited": (waited(build_request("hi"), -0.5), "already_waited"),
    # tests/classes.yaml: chat has a 5 s TTFT budget, all of it spent upstream
    "already_waited the whole TTFT budget": (
        waited(build_request("hi", slo_class="chat"), 5.0),
        "already_waited",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_invalid_argument_naming_the_field(replica: Replica, case: str) -> None:
    request, field = CASES[case]
    with grpc.insecure_channel(replica.endpoint) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=30)
        with pytest.raises(grpc.RpcError) as raised:
            list(call)
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}: ")
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == field


def test_client_raises_typed_error_with_field(replica: Replica) -> None:
    with Client(replica.endpoint, timeout_s=30) as client, pytest.raises(InvalidArgumentError) as e:
        client.generate("hi", slo_class="platinum")
    assert e.value.field == "slo.class_name"
    assert "platinum" in e.value.message


def test_max_tokens_filling_the_context_exactly_is_accepted(replica: Replica) -> None:
    prompt = [5] * 1000
    with Client(replica.endpoint, timeout_s=60) as client:
        result = client.generate(prompt, max_tokens=MAX_MODEL_LEN - len(prompt), ignore_eos=True)
    assert result.completion_tokens == MAX_MODEL_LEN - len(prompt)


def test_configure_rejects_a_default_class_that_does_not_exist(replica: Replica) -> None:
    with grpc.insecure_channel(replica.endpoint) as channel:
        stub = control_grpc.ReplicaControlStub(channel)
        request = replica_control_pb2.ConfigureRequest(default_class="nope")
        request.classes.add(name="solo").budgets.ttft.FromMilliseconds(100)
        request.classes[0].budgets.tpot.FromMilliseconds(10)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Configure(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("default_class: ")


def _no_text(text: str) -> list[int]:
    raise AssertionError("token-id prompts need no tokenizer")


def test_a_seeded_prompt_too_long_for_one_cpu_step_names_the_seed() -> None:
    """vLLM on a CPU cannot split a seeded prefill, so the CPU replica bounds seeded prompts
    by one step's budget (the engine-level check: validation on its own)."""
    limits = ModelLimits(max_model_len=4096, vocab_size=1000, default_max_tokens=16,
                         max_seeded_prompt_tokens=64)  # fmt: skip
    catalog = SloCatalog.default()
    ok = validate(build_request([5] * 64, seed=1), catalog, limits, tokenize=_no_text)
    assert ok.sampling.seed == 1
    assert (
        validate(build_request([5] * 65), catalog, limits, tokenize=_no_text).sampling.seed is None
    )
    with pytest.raises(FieldError) as error:
        validate(build_request([5] * 65, seed=1), catalog, limits, tokenize=_no_text)
    assert error.value.field == "sampling.seed" and "at most 64 tokens" in error.value.description


def test_already_waited_must_leave_part_of_the_ttft_budget() -> None:
    """What a request already waited upstream moves its SLO clock's start earlier and keeps
    its class; it may not be negative nor use up the whole TTFT budget."""
    limits = ModelLimits(max_model_len=4096, vocab_size=1000, default_max_tokens=16)
    catalog = SloCatalog.default()
    coding = catalog.get("coding")
    assert coding is not None
    budget = coding.budgets.ttft_s

    def check(request: inference_pb2.GenerateRequest) -> ValidRequest:
        return validate(request, catalog, limits, tokenize=_no_text, arrival_time=100.0)

    fresh = check(build_request([5] * 8, slo_class="coding")).slo
    assert fresh.already_waited_s == 0.0 and fresh.origin_time == 100.0
    retried = check(waited(build_request([5] * 8, slo_class="coding"), 0.75)).slo
    assert retried.class_name == "coding" and retried.budgets == coding.budgets
    assert retried.arrival_time == 100.0  # its arrival here, for the replica's own latency
    assert retried.already_waited_s == 0.75 and retried.origin_time == 99.25
    assert check(waited(build_request([5] * 8, slo_class="coding"), budget - 0.001)).slo
    for bad in (-0.001, budget, budget + 1.0):
        with pytest.raises(FieldError) as error:
            check(waited(build_request([5] * 8, slo_class="coding"), bad))
        assert error.value.field == "already_waited"
    with pytest.raises(FieldError) as error:
        check(waited(build_request([5] * 8, slo_class="coding"), budget))
    assert f"TTFT budget ({budget:g} s)" in error.value.description
    # Explicit budgets: the same rule against their TTFT.
    with pytest.raises(FieldError) as error:
        check(waited(build_request([5] * 8, ttft_s=0.5, tpot_s=0.1), 0.5))
    assert error.value.field == "already_waited"


def test_a_class_that_forbids_best_effort_overrides_the_client() -> None:
    """`spill_to_best_effort: false`: the class's requests are never best effort here, so the
    engine rejects rather than serves them best effort, and ends rather than demotes them."""
    limits = ModelLimits(max_model_len=4096, vocab_size=1000, default_max_tokens=16)
    catalog = SloCatalog.from_mapping(
        {
            "classes": [
                {"name": "chat", "ttft_ms": 2000, "tpot_ms": 100},
                {"name": "trading", "ttft_ms": 200, "tpot_ms": 20, "spill_to_best_effort": False},
            ]
        }
    )

    def slo(
        slo_class: str | None = None, ttft_s: float | None = None, tpot_s: float | None = None
    ) -> RequestSlo:
        request = build_request(
            [5] * 8, slo_class=slo_class, ttft_s=ttft_s, tpot_s=tpot_s, allow_best_effort=True
        )
        return validate(request, catalog, limits, tokenize=_no_text).slo

    assert slo(slo_class="chat").allow_best_effort and not slo(slo_class="chat").strict
    trading = slo(slo_class="trading")
    assert not trading.allow_best_effort and trading.strict
    explicit = slo(ttft_s=0.2, tpot_s=0.02)  # no class: the client decides
    assert explicit.allow_best_effort and not explicit.strict
    with pytest.raises(FieldError) as error:
        SloCatalog.from_mapping(
            {"classes": [{"name": "x", "ttft_ms": 1, "tpot_ms": 1, "spill_to_best_effort": "no"}]}
        )
    assert error.value.field == "classes[0].spill_to_best_effort"


def test_a_text_prompt_is_tokenized_off_the_event_loop() -> None:
    """A slow tokenization (a long prompt) runs on the tokenizer thread: the event loop keeps
    its pace meanwhile, and the request comes out as validate() makes it."""
    limits = ModelLimits(max_model_len=4096, vocab_size=1000, default_max_tokens=16)
    catalog = SloCatalog.default()
    threads: list[str] = []

    def slow_tokenize(text: str) -> Sequence[int]:
        threads.append(threading.current_thread().name)
        time.sleep(0.5)  # blocks its thread, as a 4 MB tokenization would
        return [5] * len(text.split())

    async def run() -> tuple[ValidRequest, float]:
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        valid = await validate_off_loop(
            build_request("one two three", max_tokens=4), catalog, limits, slow_tokenize, 7.0
        )
        ticking.cancel()
        return valid, max(b - a for a, b in itertools.pairwise(ticks))

    valid, longest_gap = asyncio.run(run())
    assert valid.prompt_token_ids == [5, 5, 5] and valid.sampling.max_tokens == 4
    assert valid.slo.arrival_time == 7.0
    assert threads and threads[0] != threading.main_thread().name
    assert longest_gap < 0.2, f"the event loop stalled {longest_gap:.2f} s"


def test_a_text_past_the_cap_is_refused_without_tokenizing() -> None:
    limits = ModelLimits(max_model_len=128, vocab_size=1000, default_max_tokens=16)
    assert limits.max_prompt_chars == 128 * 32

    def never(text: str) -> Sequence[int]:
        raise AssertionError("a text past the cap must not be tokenized")

    request = build_request("x" * (limits.max_prompt_chars + 1))
    catalog = SloCatalog.default()
    with pytest.raises(FieldError) as on_loop:
        validate(request, catalog, limits, never)
    with pytest.raises(FieldError) as off_loop:
        asyncio.run(validate_off_loop(request, catalog, limits, never))
    for error in (on_loop, off_loop):
        assert error.value.field == "prompt.text"
        assert f"more than the {limits.max_prompt_chars} accepted" in error.value.description

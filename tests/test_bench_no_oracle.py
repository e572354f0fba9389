"""The benchmark sends what a client would (methodology §5): every request's max_tokens is its
class's cap, never its true output length, and no server learns a thinking-token count. The
client ends each request at its true length by closing the stream.

Recorded where the servers receive it: local servers that capture request bodies and stream
tokens until their client leaves (an OpenAI server as vLLM's, a gateway's, a gRPC replica's),
and a real sloserve replica, directly over gRPC and behind a real gateway over HTTP, through
a proxy that records each request as the replica received it, and the replica's scheduler
trace for what its engine core got and how each request ended there. Also the simulator: a
policy it drives sees the cap and no thinking count.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from conftest import Gateway, Replica
from grpc_capture import CaptureProxy

from sloserve import errors
from sloserve.bench.cli import CPU_LENGTH_SCALE
from sloserve.bench.presets import LengthScale
from sloserve.bench.runner import PromptBook, run
from sloserve.bench.systems import (
    SYSTEMS,
    VLLM_TUNED,
    VLLM_VARIANTS,
    EngineShape,
    SystemKind,
    best_tuned_vllm,
    running,
)
from sloserve.bench.targets import (
    OpenAITarget,
    SloserveTarget,
    Target,
    make_target,
)
from sloserve.bench.types import BenchRequest, RequestRecord, client_cap
from sloserve.bench.vllm_knobs import VllmKnob, vllm_priority
from sloserve.bench.workloads import SCENARIOS, Workload, build_scenario
from sloserve.replica.admission import Verdict
from sloserve.replica.slo_request import SloRequest
from sloserve.simulator import VirtualEngine
from sloserve.simulator_policies import EngineLimits, make_policy
from sloserve.slo import Budgets
from sloserve.stepmodel import StepTimeModel, shipped_profile
from sloserve.v1 import inference_pb2, inference_pb2_grpc, slo_pb2

# Lengths small enough that a fake server streams a workload in a second or two, with caps
# well above the outputs: chat 64, summarization 32, reasoning 512, tool calling 64.
SMALL = LengthScale(prompt_factor=1 / 64, output_factor=1 / 32, max_model_len=2048)
TOKEN_INTERVAL_S = 0.001
HIDDEN_KEYS = {"thinking_tokens", "min_tokens"}


@cache
def _model() -> StepTimeModel:
    return shipped_profile("cpu-bench")


def _mixed(scale: LengthScale = SMALL, count: int = 10, rate: float = 20.0) -> Workload:
    return build_scenario("mixed", model=_model(), rate=rate, count=count, seed=0, scale=scale)


def _keys(value: object) -> set[str]:
    """Every key of a JSON value, at any depth."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def _no_coincidence(workload: Workload) -> None:
    """The test's precondition: no request's cap equals its true length by chance."""
    assert all(r.max_tokens != r.output_tokens for r in workload.requests)


# -- what the workloads set --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
@pytest.mark.parametrize("scale", [CPU_LENGTH_SCALE, LengthScale()], ids=["cpu", "gpu"])
def test_every_request_of_a_class_carries_the_class_cap(name: str, scale: LengthScale) -> None:
    workload = build_scenario(name, model=_model(), rate=1.0, count=300, seed=1, scale=scale)
    caps = workload.max_tokens
    assert set(caps) == set(workload.classes)
    assert workload.describe()["max_tokens"] == caps
    for request in workload.requests:
        cap = caps[request.slo_class]
        assert cap & (cap - 1) == 0  # a power of two
        # the class's cap, or what the context leaves after the prompt (not at these scales)
        assert request.max_tokens == cap
        assert request.output_tokens <= cap
    # The cap comes from what the class can produce, not from the lengths drawn.
    for cls in caps:
        longest = max(r.output_tokens for r in workload.requests if r.slo_class == cls)
        assert caps[cls] >= client_cap(longest)


def test_the_cap_is_clipped_only_to_the_room_the_context_leaves() -> None:
    tight = LengthScale(prompt_factor=1.0, output_factor=1.0, max_model_len=1024)
    workload = build_scenario("chatbot", model=_model(), rate=1.0, count=200, seed=0, scale=tight)
    assert workload.max_tokens == {"chat": 1024}  # the 2,048-token cap fitted to the context
    for r in workload.requests:
        assert r.max_tokens == min(1024, 1024 - r.prompt_tokens) >= r.output_tokens


def test_client_cap_is_the_smallest_power_of_two_at_least_the_longest() -> None:
    assert [client_cap(n) for n in (1, 2, 3, 256, 257, 1280)] == [1, 2, 4, 256, 512, 2048]
    with pytest.raises(ValueError):
        client_cap(0)
    hand_built = BenchRequest(0, "c", Budgets(1.0, 0.1), 10, 100, 0.0)
    assert hand_built.max_tokens == 128  # a class of one


def test_client_budgets_leave_out_the_thinking_count() -> None:
    budgets = Budgets(ttft_s=1.0, tpot_s=0.1, thinking_tpot_s=0.05, thinking_tokens=40)
    request = BenchRequest(0, "reasoning", budgets, 10, 60, 0.0)
    assert request.client_budgets == replace(budgets, thinking_tokens=0)
    assert request.budgets.thinking_tokens == 40  # the judge keeps it


# -- vLLM's variants ---------------------------------------------------------------------------


def test_vllm_priority_runs_the_binding_budget_first() -> None:
    def priority(ttft: float, tpot: float, thinking: float | None = None) -> int:
        return vllm_priority(Budgets(ttft, tpot, thinking))

    assert priority(1.0, 0.1) == 100_000  # microseconds of the tightest budget
    assert priority(1.0, 0.1, 0.05) == 50_000  # a reasoning request: its thinking TPOT
    assert priority(0.02, 0.1) == 20_000  # a TTFT tighter than the TPOT binds
    # lower runs first: the tighter deadline
    assert priority(1.0, 0.05) < priority(1.0, 0.1, 0.07) < priority(1.0, 0.1)


def test_the_variants_cover_vllms_own_slo_knobs() -> None:
    variants = [SYSTEMS[name] for name in VLLM_VARIANTS]
    assert all(s.kind is SystemKind.VLLM for s in variants)
    assert {s.knob for s in variants} == set(VllmKnob)
    assert VLLM_VARIANTS[0] == "vllm-default" and set(VLLM_TUNED) == set(VLLM_VARIANTS[1:])
    budgets = [s.extra_args[1] for s in variants if s.knob is VllmKnob.TOKEN_BUDGET]
    assert budgets == ["256", "512", "2048"]
    assert [s.name for s in variants if s.use_priority] == ["vllm-priority"]
    assert best_tuned_vllm({"vllm-default": 9.0, "vllm-budget-256": 2.0, "sloserve": 5.0}) == (
        "vllm-budget-256"
    )
    assert best_tuned_vllm({"vllm-budget-512": 2.0, "vllm-max-seqs-16": 3.0}) == "vllm-max-seqs-16"
    assert best_tuned_vllm({"vllm-default": 1.0}) is None


def test_every_variants_flags_are_vllms_own() -> None:
    """Each variant's flags parse with vLLM's own server parser and make a valid scheduler
    config on the bench's engine shape (the CPU defaults: budget 2048, 128 sequences)."""
    from vllm.config.scheduler import SchedulerConfig
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
    for name in VLLM_VARIANTS:
        args = parser.parse_args(["--model", "m", *SYSTEMS[name].extra_args])
        SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens or 2048,
            max_num_seqs=args.max_num_seqs or 128,
            max_num_queued_tokens=args.max_num_queued_tokens,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
            long_prefill_token_threshold_adaptive=args.long_prefill_token_threshold_adaptive,
            policy=args.scheduling_policy,
            max_model_len=4096,
            is_encoder_decoder=False,
        )


def test_sloserve_is_reached_through_its_gateway_and_the_replica_alone_is_an_ablation() -> None:
    for name in ("sloserve", "sloserve-vllm-policy"):
        spec = SYSTEMS[name]
        assert spec.kind is SystemKind.GATEWAY and not spec.routed
    assert SYSTEMS["sloserve-vllm-policy"].extra_args == ("--policy", "vllm")
    assert SYSTEMS["sloserve-replica-grpc"].kind is SystemKind.REPLICA
    assert all(SYSTEMS[n].routed for n in ("gateway-slack", "gateway-round-robin"))


# -- capturing servers: what each target sends -------------------------------------------------


@dataclass
class Served:
    """One request a capturing server got, and how it ended."""

    sent: dict[str, Any]  # the body (HTTP) or the GenerateRequest as a dict (gRPC)
    prompt: tuple[int, ...]
    max_tokens: int
    tokens_sent: int = 0
    client_left: bool = False  # the client closed the stream before its end


@dataclass
class Refusal:
    status: int
    error: dict[str, Any]


@dataclass
class FakeOpenAI:
    """An OpenAI completions server (vLLM's wire, or a gateway's with `sloserve` reports) that
    streams one token per chunk, with cumulative usage, to max_tokens or until the client
    leaves; `refuse` answers chosen prompts with an error instead."""

    gateway: bool
    served: list[Served] = field(default_factory=list)
    refuse: dict[tuple[int, ...], Refusal] = field(default_factory=dict)
    best_effort: set[tuple[int, ...]] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = tuple(body["prompt"])
        served = Served(body, prompt, body["max_tokens"])
        self.served.append(served)
        if prompt in self.refuse:
            refusal = self.refuse[prompt]
            return web.json_response({"error": refusal.error}, status=refusal.status)
        sse = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await sse.prepare(request)
        try:
            for n in range(1, served.max_tokens + 1):
                await asyncio.sleep(TOKEN_INTERVAL_S)
                chunk: dict[str, Any] = {
                    "choices": [{"index": 0, "text": "x", "finish_reason": None}],
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": n},
                }
                if self.gateway and n == 1:
                    mode = "best_effort" if prompt in self.best_effort else "admitted"
                    chunk["sloserve"] = {"mode": mode}
                await sse.write(f"data: {json.dumps(chunk)}\n\n".encode())
                served.tokens_sent = n
            await sse.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError):
            served.client_left = True
            raise
        return sse


class FakeInference(inference_pb2_grpc.InferenceServicer):
    """A replica's Inference API that streams one token per delta to max_tokens or until the
    client cancels; `refuse` turns chosen prompts away (RESOURCE_EXHAUSTED)."""

    def __init__(self) -> None:
        self.served: list[Served] = []
        self.messages: list[inference_pb2.GenerateRequest] = []
        self.refuse: set[tuple[int, ...]] = set()

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        from google.protobuf.json_format import MessageToDict

        prompt = tuple(request.prompt.token_ids.ids)
        served = Served(MessageToDict(request), prompt, request.sampling.max_tokens)
        self.served.append(served)
        self.messages.append(request)
        if prompt in self.refuse:
            status = errors.resource_exhausted("COMPUTE", "not admitted", 1.0)
            await context.abort_with_status(errors.to_grpc_status(status))
        yield inference_pb2.GenerateResponse(
            admission=inference_pb2.Admission(mode=slo_pb2.ADMISSION_MODE_ADMITTED)
        )
        try:
            for _ in range(served.max_tokens):
                await asyncio.sleep(TOKEN_INTERVAL_S)
                yield inference_pb2.GenerateResponse(
                    delta=inference_pb2.TokenDelta(token_ids=[5], text="x")
                )
                served.tokens_sent += 1
            yield inference_pb2.GenerateResponse(completion=inference_pb2.Completion())
        except (asyncio.CancelledError, GeneratorExit):
            served.client_left = True
            raise


async def _run_workload(
    make: Callable[[], Target], requests: Sequence[BenchRequest], prompts: PromptBook
) -> list[RequestRecord]:
    target = make()  # in the running loop: its channel or session belongs to it
    try:
        return await run(target, requests, prompts, request_timeout_s=60)
    finally:
        await target.close()


async def _until(condition: Any, timeout_s: float = 5.0) -> None:
    """Waits for the servers to see every client leave (a disconnect lands a moment later)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _by_prompt(served: list[Served]) -> dict[tuple[int, ...], Served]:
    by_prompt = {s.prompt: s for s in served}
    assert len(by_prompt) == len(served), "a request was sent twice"
    return by_prompt


def _check_served_at_true_length(
    requests: Sequence[BenchRequest],
    records: Sequence[RequestRecord],
    served: dict[tuple[int, ...], Served],
    prompts: PromptBook,
    refused: set[int],
) -> None:
    """Every request the server served ended at its true length on the client, which then
    left: the server streamed at least that many tokens, and stopped short of the cap."""
    by_index = {r.request.index: r for r in records}
    for request in requests:
        record = by_index[request.index]
        if request.index in refused:
            continue
        one = served[tuple(prompts.prompt(request))]
        assert record.completed and not record.error, record
        assert len(record.token_times) == request.output_tokens
        assert record.finished_at == record.token_times[-1]
        assert one.client_left, f"request {request.index}: the server never saw its client leave"
        assert request.output_tokens <= one.tokens_sent < one.max_tokens


def _non_session(workload: Workload, cls: str) -> list[BenchRequest]:
    return [r for r in workload.requests if r.slo_class == cls and r.session is None]


@pytest.mark.parametrize("gateway", [False, True], ids=["vllm", "gateway"])
def test_the_http_target_sends_the_class_cap_and_leaves_at_the_true_length(gateway: bool) -> None:
    workload = _mixed()
    _no_coincidence(workload)
    prompts = PromptBook(vocab_size=1000, seed=3)
    fake = FakeOpenAI(gateway=gateway)
    chats, codes = _non_session(workload, "chat"), _non_session(workload, "coding")
    refused = {chats[0].index: "COMPUTE", chats[1].index: "MAX_NUM_QUEUED_TOKENS"}
    fake.refuse[tuple(prompts.prompt(chats[0]))] = Refusal(
        429, {"message": "not admitted", "type": "slo_rejected", "code": "COMPUTE"}
    )
    # vLLM's queue admission (--max-num-queued-tokens): a rejection, not an error
    fake.refuse[tuple(prompts.prompt(chats[1]))] = Refusal(
        503,
        {
            "message": "The engine has reached its prefill token backlog limit. Please try "
            "again later or on a different instance.",
            "type": "Service Unavailable",
            "code": 503,
        },
    )
    # a gateway with no replica: an error, not a rejection
    fake.refuse[tuple(prompts.prompt(codes[0]))] = Refusal(
        503, {"message": "no replica", "type": "service_unavailable", "code": "NO_REPLICA"}
    )
    fake.best_effort.add(tuple(prompts.prompt(codes[1])))

    async def go() -> list[RequestRecord]:
        runner = web.AppRunner(fake.app(), handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            url = f"http://127.0.0.1:{port}"
            target = partial(OpenAITarget, url, use_priority=not gateway, slo_extensions=gateway)
            records = await _run_workload(target, workload.requests, prompts)
            await _until(lambda: all(s.client_left or s.prompt in fake.refuse for s in fake.served))
            return records
        finally:
            await runner.cleanup()

    records = asyncio.run(go())
    served = _by_prompt(fake.served)
    assert len(served) == len(workload.requests)
    for request in workload.requests:
        body = served[tuple(prompts.prompt(request))].sent
        assert not _keys(body) & HIDDEN_KEYS
        assert body["max_tokens"] == workload.max_tokens[request.slo_class]
        assert body["max_tokens"] != request.output_tokens
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
        assert body["user"] == request.slo_class
        b = request.budgets
        if gateway:
            expected = {"ttft_ms": b.ttft_s * 1000, "tpot_ms": b.tpot_s * 1000}
            if b.thinking_tpot_s is not None:
                expected["thinking_tpot_ms"] = b.thinking_tpot_s * 1000
            assert body["slo"] == expected and "priority" not in body
        else:
            assert "slo" not in body and body["priority"] == vllm_priority(request.client_budgets)
    by_index = {r.request.index: r for r in records}
    for index, reason in refused.items():
        assert by_index[index].rejected and by_index[index].reject_reason == reason
    assert by_index[codes[0].index].error.startswith("HTTP 503")
    assert not by_index[codes[0].index].rejected
    assert by_index[codes[1].index].best_effort == gateway  # read from the gateway's report
    _check_served_at_true_length(
        workload.requests, records, served, prompts, {*refused, codes[0].index}
    )


def test_the_grpc_target_sends_the_class_cap_and_cancels_at_the_true_length() -> None:
    workload = _mixed()
    _no_coincidence(workload)
    prompts = PromptBook(vocab_size=1000, seed=4)
    fake = FakeInference()
    refused = _non_session(workload, "chat")[0]
    fake.refuse.add(tuple(prompts.prompt(refused)))

    async def go() -> list[RequestRecord]:
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            target = partial(SloserveTarget, f"127.0.0.1:{port}")
            records = await _run_workload(target, workload.requests, prompts)
            await _until(lambda: all(s.client_left or s.prompt in fake.refuse for s in fake.served))
            return records
        finally:
            await server.stop(grace=None)

    records = asyncio.run(go())
    served = _by_prompt(fake.served)
    messages = {tuple(m.prompt.token_ids.ids): m for m in fake.messages}
    for request in workload.requests:
        prompt = tuple(prompts.prompt(request))
        assert not _keys(served[prompt].sent) & {"thinkingTokens", "minTokens"}
        message = messages[prompt]
        assert message.sampling.max_tokens == workload.max_tokens[request.slo_class]
        assert message.sampling.max_tokens != request.output_tokens
        assert message.sampling.ignore_eos
        assert message.slo.budgets.thinking_tokens == 0
        thinking = request.budgets.thinking_tpot_s is not None
        assert message.slo.budgets.HasField("thinking_tpot") == thinking
        assert message.tenant == request.slo_class
    rejected = next(r for r in records if r.request.index == refused.index)
    assert rejected.rejected and rejected.reject_reason == "COMPUTE"
    _check_served_at_true_length(workload.requests, records, served, prompts, {refused.index})


# -- a real sloserve replica: what it and its engine core received -----------------------------

# Reasoning on the tiny model: cap 512 tokens, outputs of ~20-200 (a few hundred tokens below
# the cap, so an engine that ran on to the cap could not be mistaken for a cancel), prompts
# of ~20-250 in its 1,024-token context.
REAL_SCALE = LengthScale(prompt_factor=1 / 8, output_factor=0.05, max_model_len=1024)
TINY_VOCAB = 439


def _real_workload() -> list[BenchRequest]:
    workload = build_scenario(
        "reasoning", model=_model(), rate=4.0, count=6, seed=0, scale=REAL_SCALE
    )
    _no_coincidence(workload)
    assert workload.max_tokens == {"reasoning": 512}
    # Loose budgets: the replica admits every request on a noisy machine; the thinking count
    # stays, for the judge, as a workload's does.
    return [
        replace(r, budgets=replace(r.budgets, ttft_s=5.0, tpot_s=0.5, thinking_tpot_s=0.25))
        for r in workload.requests
    ]


@dataclass
class RealStack:
    replica: Replica
    proxy: CaptureProxy
    gateway: Gateway


@pytest.fixture(scope="module")
def real_stack(replica: Replica, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealStack]:
    """The shared replica behind a capture proxy, and a gateway in front of the proxy."""
    proxy = CaptureProxy(replica.endpoint)
    proxy.start()
    gateway = Gateway(
        workdir=tmp_path_factory.mktemp("gateway-no-oracle"), replicas=[proxy.endpoint]
    )
    gateway.start()
    try:
        gateway.wait_serving()
        yield RealStack(replica, proxy, gateway)
    finally:
        gateway.stop()
        proxy.stop()


def _trace_by_request(replica: Replica) -> dict[str, list[dict[str, Any]]]:
    events: dict[str, list[dict[str, Any]]] = {}
    for line in replica.trace_path.read_text().splitlines():
        event = json.loads(line)
        if "request_id" in event:
            events.setdefault(event["request_id"], []).append(event)
    return events


def _check_real(stack: RealStack, records: list[RequestRecord], prompts: PromptBook) -> None:
    passed = {tuple(p.request.prompt.token_ids.ids): p for p in stack.proxy.generate}
    assert len(stack.proxy.generate) == len(passed) == len(records), "one replica call each"
    for record in records:
        request = record.request
        assert record.completed and not record.error, record
        assert len(record.token_times) == request.output_tokens
        # What the replica received: the class cap, no thinking count, the budgets themselves.
        sent = passed[tuple(prompts.prompt(request))].request
        assert sent.sampling.max_tokens == request.max_tokens == 512 != request.output_tokens
        assert sent.sampling.ignore_eos
        assert sent.slo.budgets.thinking_tokens == 0
        assert sent.slo.budgets.thinking_tpot.ToNanoseconds() == 250_000_000
        assert sent.tenant == "reasoning"
    # What the engine core got, and how each request ended there: aborted, as the client
    # left, soon after it left; never run on to its cap.
    ids = {p.request.request_id for p in passed.values()}
    deadline = time.monotonic() + 10
    while True:
        trace = _trace_by_request(stack.replica)
        freed = {i: e for i in ids for e in trace.get(i, []) if e["event"] == "freed"}
        if len(freed) == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for record in records:
        p = passed[tuple(prompts.prompt(record.request))]
        events = trace[p.request.request_id]
        added = next(e for e in events if e["event"] == "added")
        assert added["tenant"] == "reasoning" and added["thinking_tpot_s"] == 0.25
        assert freed[p.request.request_id]["status"] == "FINISHED_ABORTED", events
        assert record.finished_at is not None
        assert freed[p.request.request_id]["time"] - record.finished_at < 2.0
        assert p.cancelled_by_caller


def test_a_real_replica_over_grpc_never_learns_the_true_length(real_stack: RealStack) -> None:
    requests = _real_workload()
    real_stack.proxy.generate.clear()
    prompts = PromptBook(TINY_VOCAB, seed=11)
    target = partial(SloserveTarget, real_stack.proxy.endpoint)
    records = asyncio.run(_run_workload(target, requests, prompts))
    _check_real(real_stack, records, prompts)


def test_a_real_replica_behind_its_gateway_never_learns_the_true_length(
    real_stack: RealStack,
) -> None:
    requests = _real_workload()
    real_stack.proxy.generate.clear()
    base = real_stack.gateway.base_url.removesuffix("/v1")
    prompts = PromptBook(TINY_VOCAB, seed=12)
    target = partial(OpenAITarget, base, slo_extensions=True)
    records = asyncio.run(_run_workload(target, requests, prompts))
    _check_real(real_stack, records, prompts)


# -- the simulator -----------------------------------------------------------------------------


class _Spy:
    """The sloserve policy, recording what each arriving request showed it."""

    def __init__(self, limits: EngineLimits) -> None:
        self.inner = make_policy("sloserve", _model(), limits)
        self.seen: dict[str, SloRequest] = {}

    def arrive(self, now: float, request: SloRequest) -> Verdict:
        self.seen[request.request_id] = request
        return self.inner.arrive(now, request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_simulated_policy_sees_the_cap_and_the_request_ends_at_its_true_length() -> None:
    workload = _mixed(scale=CPU_LENGTH_SCALE, count=60, rate=2.0)
    _no_coincidence(workload)
    limits = EngineLimits.from_profile(_model(), kv_capacity_tokens=116_508)
    spy = _Spy(limits)
    result = VirtualEngine(_model(), limits, spy).run(workload.requests)

    assert len(spy.seen) == len(workload.requests)
    for request in workload.requests:
        seen = spy.seen[str(request.index)]  # the engine's id: the workload index
        assert seen.max_tokens == workload.max_tokens[request.slo_class] != request.output_tokens
        assert seen.budgets == request.client_budgets  # the SLO, less the thinking count
        assert seen.budgets.thinking_tokens == 0
    assert any(s.budgets.thinking_tpot_s is not None for s in spy.seen.values())
    completed = [r for r in result.records if r.completed]
    assert completed
    for record in completed:  # ended where the model would have: at its true length
        assert len(record.token_times) == record.request.output_tokens


# -- the system `bench compare` starts as sloserve ---------------------------------------------


def test_the_sloserve_system_is_its_gateway_over_http(
    tiny_model: Path, tiny_profile: Path, tmp_path: Path
) -> None:
    """`sloserve` as the bench starts it: a gateway over a replica of its own, reached over
    HTTP with the same client as vLLM; each request served to its true length."""
    shape = EngineShape(tiny_model, max_model_len=1024, kv_cache_gib=0.25, profile=tiny_profile)
    requests = _real_workload()[:3]
    with running(SYSTEMS["sloserve"], shape, tmp_path / "sloserve.log") as spec:
        assert spec.startswith("sloserve-openai:http://127.0.0.1:")
        make = partial(make_target, spec)
        records = asyncio.run(_run_workload(make, requests, PromptBook(TINY_VOCAB, seed=13)))
    assert (tmp_path / "sloserve-replica-0.log").exists()
    for record in records:
        assert record.completed and not record.error, record
        assert len(record.token_times) == record.request.output_tokens

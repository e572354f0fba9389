"""Clients of the sloserve Inference API, synchronous and asyncio.

    with Client("localhost:50051") as client:
        result = client.generate("Hello", slo_class="chat", max_tokens=32)
        print(result.text, result.ttft_s, result.slo_outcome.attained)

Failed calls raise the typed errors of `sloserve.errors` (InvalidArgumentError names the field,
RejectedError carries the reason and a retry hint).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sloserve.errors import from_rpc_error
from sloserve.protoconv import duration
from sloserve.v1 import inference_pb2, inference_pb2_grpc, slo_pb2

Prompt = str | Sequence[int]


def build_request(
    prompt: Prompt,
    *,
    slo_class: str | None = None,
    ttft_s: float | None = None,
    tpot_s: float | None = None,
    thinking_tpot_s: float | None = None,
    thinking_tokens: int = 0,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    allow_best_effort: bool = False,
    request_id: str = "",
    tenant: str = "",
    labels: Mapping[str, str] | None = None,
    strict: bool = False,
) -> inference_pb2.GenerateRequest:
    """A GenerateRequest: an SLO class name, or explicit budgets (ttft_s and tpot_s)."""
    if slo_class is not None and (ttft_s is not None or tpot_s is not None):
        raise ValueError("give an SLO class or explicit budgets, not both")
    request = inference_pb2.GenerateRequest(
        request_id=request_id,
        allow_best_effort=allow_best_effort,
        tenant=tenant,
        labels=dict(labels or {}),
        strict=strict,
    )
    if isinstance(prompt, str):
        request.prompt.text = prompt
    else:
        request.prompt.token_ids.ids.extend(prompt)
    if slo_class is not None:
        request.slo.class_name = slo_class
    elif ttft_s is not None or tpot_s is not None:
        budgets = request.slo.budgets
        if ttft_s is not None:
            budgets.ttft.CopyFrom(duration(ttft_s))
        if tpot_s is not None:
            budgets.tpot.CopyFrom(duration(tpot_s))
        if thinking_tpot_s is not None:
            budgets.thinking_tpot.CopyFrom(duration(thinking_tpot_s))
        budgets.thinking_tokens = thinking_tokens
    sampling = request.sampling
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    sampling.stop.extend(stop)
    sampling.ignore_eos = ignore_eos
    return request


@dataclass
class GenerationResult:
    """A finished generation, with latencies measured on the client's clock."""

    request_id: str = ""
    best_effort: bool = False  # admitted as best effort, or demoted to it mid-stream
    best_effort_reason: str = ""  # COMPUTE or MEMORY at admission; EXPIRED when demoted
    demoted_after_tokens: int | None = None  # set when the server demoted it mid-stream
    class_name: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    sent_at: float = 0.0
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    slo_outcome: slo_pb2.SloOutcome = field(default_factory=slo_pb2.SloOutcome)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.sent_at if self.token_times else None

    @property
    def mean_tpot_s(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    def feed(self, response: inference_pb2.GenerateResponse, now: float) -> None:
        event = response.WhichOneof("event")
        if event == "admission":
            a = response.admission
            self.request_id = a.request_id
            self.best_effort = a.mode == slo_pb2.ADMISSION_MODE_BEST_EFFORT
            if self.best_effort:
                self.best_effort_reason = slo_pb2.RejectReason.Name(
                    a.best_effort_reason
                ).removeprefix("REJECT_REASON_")
            self.class_name = a.class_name
            self.prompt_tokens = a.prompt_tokens
        elif event == "delta":
            self.token_ids.extend(response.delta.token_ids)
            self.token_times.extend([now] * len(response.delta.token_ids))
            self.text += response.delta.text
        elif event == "demotion":
            self.best_effort = True
            self.best_effort_reason = response.demotion.reason
            self.demoted_after_tokens = response.demotion.tokens_delivered
        elif event == "completion":
            c = response.completion
            self.finish_reason = (
                inference_pb2.FinishReason.Name(c.finish_reason)
                .removeprefix("FINISH_REASON_")
                .lower()
            )
            self.completion_tokens = c.usage.completion_tokens
            self.slo_outcome = c.slo_outcome


class Client:
    """Synchronous client of a replica or gateway."""

    def __init__(self, endpoint: str, timeout_s: float | None = None) -> None:
        self._channel = grpc.insecure_channel(endpoint)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._timeout = timeout_s

    def stream(
        self, request: inference_pb2.GenerateRequest
    ) -> Iterator[inference_pb2.GenerateResponse]:
        """The raw response stream; cancelled when the iterator is closed."""
        call = self._stub.Generate(request, timeout=self._timeout)
        try:
            yield from call
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def generate(self, prompt: Prompt, **options: object) -> GenerationResult:
        """Runs one generation to the end; options are build_request's keywords."""
        result = GenerationResult(sent_at=time.time())
        for response in self.stream(build_request(prompt, **options)):  # type: ignore[arg-type]
            result.feed(response, time.time())
        return result

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """asyncio client of a replica or gateway."""

    def __init__(self, endpoint: str, timeout_s: float | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(endpoint)
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._timeout = timeout_s

    async def stream(
        self, request: inference_pb2.GenerateRequest
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """The raw response stream; cancelled when the iterator is closed."""
        call = self._stub.Generate(request, timeout=self._timeout)
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    async def generate(self, prompt: Prompt, **options: object) -> GenerationResult:
        """Runs one generation to the end; options are build_request's keywords."""
        result = GenerationResult(sent_at=time.time())
        async for response in self.stream(build_request(prompt, **options)):  # type: ignore[arg-type]
            result.feed(response, time.time())
        return result

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def serving(endpoint: str, timeout_s: float = 2.0) -> bool:
    """Whether the replica or gateway at `endpoint` says SERVING on the gRPC health service
    (False while it is unreachable or still starting)."""
    with grpc.insecure_channel(endpoint) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

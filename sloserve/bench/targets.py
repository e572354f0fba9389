"""Systems under test, as the benchmark client sees them.

Every target sends what a client would (methodology §5): the prompt's token ids, `max_tokens`
= the request's class cap (BenchRequest.max_tokens), end-of-sequence ignored, no `min_tokens`,
and no thinking-token count. The true output length stays on the client: once it has received
`output_tokens` tokens, the client takes the request as complete (`record.completed`, the
finish time) and closes the stream, so the server sees the request end as a client disconnect
ends it: vLLM's OpenAI server aborts it, a sloserve gateway cancels its replica call, a replica
aborts it in the engine. The same for every system.

- `openai:URL`: an OpenAI-compatible server (stock `vllm serve`), over HTTP/SSE, streaming with
  cumulative usage on every chunk (`stream_options.continuous_usage_stats`), so every token
  gets a timestamp; `user` = the class. vLLM's priority variant adds `priority`.
- `sloserve-openai:URL`: a sloserve gateway's OpenAI API, the same client code, plus the
  request's SLO as the body's `slo` budgets extension (TTFT, TPOT, thinking TPOT).
- `sloserve:HOST:PORT`: a sloserve replica or gateway over gRPC (an ablation: sloserve's users
  reach it over HTTP), explicit budgets, tenant = the class.

Turned away counts as rejected (a miss, methodology §2): gRPC RESOURCE_EXHAUSTED, HTTP 429 (a
sloserve gateway's SLO rejection), and the HTTP 503 of vLLM's own queue admission
(`--max-num-queued-tokens`, `--max-num-queued-reqs`).
"""

from __future__ import annotations

import contextlib
import enum
import json
import time
from collections.abc import AsyncGenerator
from http import HTTPStatus
from typing import Any, Protocol, cast

import aiohttp

from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.bench.vllm_knobs import vllm_priority
from sloserve.client import AsyncClient, build_request
from sloserve.errors import RejectedError, SloserveError
from sloserve.v1 import inference_pb2, slo_pb2


class Target(Protocol):
    name: str

    async def send(self, request: BenchRequest, prompt: list[int], record: RequestRecord) -> None:
        """Sends one request and fills `record` as tokens arrive; never raises."""

    async def close(self) -> None: ...


class TargetKind(enum.Enum):
    """How a target spec's system is reached: `KIND:ADDRESS`."""

    SLOSERVE_GRPC = "sloserve"  # HOST:PORT, the Inference API
    OPENAI = "openai"  # URL of an OpenAI-compatible server
    SLOSERVE_OPENAI = "sloserve-openai"  # URL of a sloserve gateway's OpenAI API


def target_spec(kind: TargetKind, address: str) -> str:
    return f"{kind.value}:{address}"


def _received(record: RequestRecord, count: int, now: float) -> bool:
    """Records `count` tokens that arrived at `now`, up to the request's true length; True
    once the client has them all: the request is complete, as at the model's end of sequence.
    """
    wanted = record.request.output_tokens - len(record.token_times)
    record.token_times.extend([now] * min(count, wanted))
    if len(record.token_times) < record.request.output_tokens:
        return False
    record.completed = True
    record.finished_at = now
    return True


def _ended_early(record: RequestRecord) -> str:
    return (
        f"the server ended the stream after {len(record.token_times)} of "
        f"{record.request.output_tokens} tokens"
    )


class SloserveTarget:
    """A sloserve replica or gateway over gRPC."""

    def __init__(self, endpoint: str, timeout_s: float = 600) -> None:
        self.name = target_spec(TargetKind.SLOSERVE_GRPC, endpoint)
        self._client = AsyncClient(endpoint, timeout_s=timeout_s)

    @staticmethod
    def message(request: BenchRequest, prompt: list[int]) -> inference_pb2.GenerateRequest:
        """The GenerateRequest sent for `request`."""
        b = request.client_budgets
        return build_request(
            prompt,
            ttft_s=b.ttft_s,
            tpot_s=b.tpot_s,
            thinking_tpot_s=b.thinking_tpot_s,
            max_tokens=request.max_tokens,
            ignore_eos=True,
            temperature=0.0,
            allow_best_effort=request.allow_best_effort,
            request_id=f"bench-{request.index}-{time.monotonic_ns()}",
            # The tenant keys the replica's learned output lengths (with the budgets' shape),
            # as the HTTP targets' `user` does.
            tenant=request.slo_class,
            labels={"class": request.slo_class},
        )

    async def send(self, request: BenchRequest, prompt: list[int], record: RequestRecord) -> None:
        # An async generator (its annotation says AsyncIterator): closing it cancels the call.
        stream = cast(
            AsyncGenerator[inference_pb2.GenerateResponse, None],
            self._client.stream(self.message(request, prompt)),
        )
        try:
            # Closing the stream cancels the call: the client leaving once it has its tokens.
            async with contextlib.aclosing(stream):
                async for response in stream:
                    now = time.time()
                    event = response.WhichOneof("event")
                    if event == "admission":
                        record.best_effort = (
                            response.admission.mode == slo_pb2.ADMISSION_MODE_BEST_EFFORT
                        )
                    elif event == "delta":
                        if _received(record, len(response.delta.token_ids), now):
                            return
                    elif event == "demotion":
                        # it can no longer meet its SLO: a miss
                        record.best_effort = record.demoted = True
                    elif event == "completion":
                        record.error = _ended_early(record)
                        return
        except RejectedError as rejected:
            record.rejected, record.reject_reason = True, rejected.reason
        except SloserveError as error:
            record.error = str(error)
        finally:
            if record.finished_at is None:
                record.finished_at = time.time()

    async def close(self) -> None:
        await self._client.close()


# vLLM's queue admission answers 503 with this error type (GracefulHTTPError: the status's
# phrase); its other 503s (a retryable engine failure: "ServiceUnavailableError") and a
# gateway's ("service_unavailable": no replica) are errors, not rejections.
_VLLM_ADMISSION_TYPE = HTTPStatus.SERVICE_UNAVAILABLE.phrase
# Which of vLLM's queue limits refused a request, by its message (vllm/exceptions.py).
_VLLM_ADMISSION_REASONS = {
    "prefill token backlog": "MAX_NUM_QUEUED_TOKENS",
    "cannot accept new requests": "MAX_NUM_QUEUED_REQS",
}


def _rejection(status: int, error: dict[str, Any]) -> str | None:
    """The reason a refused HTTP request was turned away, or None when it failed otherwise."""
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        return str(error.get("code") or "HTTP_429")
    if status == HTTPStatus.SERVICE_UNAVAILABLE and error.get("type") == _VLLM_ADMISSION_TYPE:
        message = str(error.get("message", ""))
        reasons = (r for text, r in _VLLM_ADMISSION_REASONS.items() if text in message)
        return next(reasons, "HTTP_503")
    return None


def _error_of(text: str) -> dict[str, Any]:
    """The `error` object of an OpenAI-shaped error body ({} when it has none)."""
    try:
        body = json.loads(text)
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


class OpenAITarget:
    """An OpenAI-compatible completions endpoint.

    `use_priority`: send vLLM's `priority` (vllm_priority). `slo_extensions`: the server is a
    sloserve gateway: send the SLO as `slo` budgets (and `allow_best_effort` when the request
    accepts it), and read its `sloserve` stream reports (best-effort service, demotion).
    """

    def __init__(
        self,
        base_url: str,
        use_priority: bool = False,
        slo_extensions: bool = False,
        timeout_s: float = 600,
    ) -> None:
        kind = TargetKind.SLOSERVE_OPENAI if slo_extensions else TargetKind.OPENAI
        self.name = target_spec(kind, base_url)
        self._base = base_url.rstrip("/")
        self._use_priority = use_priority
        self._slo_extensions = slo_extensions
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            connector=aiohttp.TCPConnector(limit=0),  # open loop: no client-side queueing
        )
        self._model: str | None = None

    async def _model_name(self) -> str:
        if self._model is None:
            async with self._session.get(f"{self._base}/v1/models") as response:
                response.raise_for_status()
                self._model = str((await response.json())["data"][0]["id"])
        return self._model

    def body(self, request: BenchRequest, prompt: list[int], model: str) -> dict[str, Any]:
        """The JSON body sent for `request`."""
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "max_tokens": request.max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            # OpenAI's end-user field: the application (class). sloserve's gateway makes it the
            # tenant, which keys the replica's learned output lengths; vLLM ignores it.
            "user": request.slo_class,
        }
        if self._use_priority:
            body["priority"] = vllm_priority(request.client_budgets)
        if self._slo_extensions:
            b = request.client_budgets
            slo = {"ttft_ms": b.ttft_s * 1000, "tpot_ms": b.tpot_s * 1000}
            if b.thinking_tpot_s is not None:
                slo["thinking_tpot_ms"] = b.thinking_tpot_s * 1000
            body["slo"] = slo
            if request.allow_best_effort:
                body["allow_best_effort"] = True
        return body

    async def send(self, request: BenchRequest, prompt: list[int], record: RequestRecord) -> None:
        try:
            body = self.body(request, prompt, await self._model_name())
            async with self._session.post(f"{self._base}/v1/completions", json=body) as response:
                if response.status != HTTPStatus.OK:
                    text = await response.text()
                    reason = _rejection(response.status, _error_of(text))
                    if reason is not None:
                        record.rejected, record.reject_reason = True, reason
                    else:
                        record.error = f"HTTP {response.status}: {text[:200]}"
                    return
                await self._read_stream(response, record)
        except (aiohttp.ClientError, TimeoutError) as error:
            record.error = f"{type(error).__name__}: {error}"
        finally:
            if record.finished_at is None:
                record.finished_at = time.time()

    async def _read_stream(self, response: aiohttp.ClientResponse, record: RequestRecord) -> None:
        seen = 0
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                record.error = _ended_early(record)
                return
            chunk = json.loads(data)
            if "error" in chunk:  # a stream that failed after it started
                record.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                return
            if self._slo_extensions:
                _read_report(chunk.get("sloserve"), record)
            usage = chunk.get("usage") or {}
            # Cumulative usage on every chunk counts tokens exactly, even when a chunk
            # carries several tokens or an empty text.
            total = int(usage.get("completion_tokens", seen))
            if total > seen:
                complete = _received(record, total - seen, time.time())
                seen = total
                if complete:
                    # Drop the connection rather than return it to the pool: the server
                    # must see the client leave, and abort the rest of the request.
                    response.close()
                    return
        record.error = "stream ended without [DONE]"

    async def close(self) -> None:
        await self._session.close()


def _read_report(report: object, record: RequestRecord) -> None:
    """A sloserve gateway's `sloserve` report on a stream chunk: how the request is served."""
    if not isinstance(report, dict):
        return
    if report.get("mode") == "best_effort":
        record.best_effort = True
    if report.get("demoted"):
        record.best_effort = record.demoted = True


def make_target(spec: str, use_priority: bool = False) -> Target:
    """`sloserve:HOST:PORT`, `openai:URL` or `sloserve-openai:URL`."""
    kind_name, _, address = spec.partition(":")
    kinds = {k.value: k for k in TargetKind}
    kind = kinds.get(kind_name)
    if kind is None or not address:
        raise ValueError(
            f"target must be sloserve:HOST:PORT, openai:URL or sloserve-openai:URL, got {spec!r}"
        )
    if kind is TargetKind.SLOSERVE_GRPC:
        return SloserveTarget(address)
    slo = kind is TargetKind.SLOSERVE_OPENAI
    return OpenAITarget(address, use_priority=use_priority, slo_extensions=slo)

"""Systems under test, as the benchmark client sees them.

`sloserve:HOST:PORT` is a sloserve replica or gateway over gRPC, sent explicit SLO budgets.
`openai:URL` is any OpenAI-compatible server (stock `vllm serve` is the baseline), sent the
same prompt token ids with streaming and per-chunk usage, so every token gets a timestamp.
"""

from __future__ import annotations

import json
import time
from typing import Protocol

import aiohttp

from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.client import AsyncClient, build_request
from sloserve.errors import RejectedError, SloserveError
from sloserve.v1 import slo_pb2


class Target(Protocol):
    name: str

    async def send(self, request: BenchRequest, prompt: list[int], record: RequestRecord) -> None:
        """Sends one request and fills `record` as tokens arrive; never raises."""

    async def close(self) -> None: ...


class SloserveTarget:
    def __init__(self, endpoint: str, timeout_s: float = 600) -> None:
        self.name = f"sloserve:{endpoint}"
        self._client = AsyncClient(endpoint, timeout_s=timeout_s)

    async def send(self, request: BenchRequest, prompt: list[int], record: RequestRecord) -> None:
        b = request.budgets
        message = build_request(
            prompt,
            ttft_s=b.ttft_s,
            tpot_s=b.tpot_s,
            thinking_tpot_s=b.thinking_tpot_s,
            thinking_tokens=b.thinking_tokens,
            max_tokens=request.output_tokens,
            ignore_eos=True,
            temperature=0.0,
            allow_best_effort=request.allow_best_effort,
            request_id=f"bench-{request.index}-{time.monotonic_ns()}",
            labels={"class": request.slo_class},
        )
        try:
            async for response in self._client.stream(message):
                now = time.time()
                event = response.WhichOneof("event")
                if event == "admission":
                    record.best_effort = (
                        response.admission.mode == slo_pb2.ADMISSION_MODE_BEST_EFFORT
                    )
                elif event == "delta":
                    record.token_times.extend([now] * len(response.delta.token_ids))
                elif event == "demotion":
                    # it can no longer meet its SLO: a miss
                    record.best_effort = record.demoted = True
                elif event == "completion":
                    record.completed = True
        except RejectedError as rejected:
            record.rejected, record.reject_reason = True, rejected.reason
        except SloserveError as error:
            record.error = str(error)
        finally:
            record.finished_at = time.time()

    async def close(self) -> None:
        await self._client.close()


class OpenAITarget:
    """An OpenAI-compatible completions endpoint; `priority` maps a request to vLLM priority."""

    def __init__(self, base_url: str, use_priority: bool = False, timeout_s: float = 600) -> None:
        self.name = f"openai:{base_url}"
        self._base = base_url.rstrip("/")
        self._use_priority = use_priority
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

    @staticmethod
    def priority(request: BenchRequest) -> int:
        """Tighter TPOT first (vLLM runs lower priority values earlier)."""
        return round(request.budgets.tpot_s * 1000)

    async def send(self, request: BenchRequest, prompt: list[int], record: RequestRecord) -> None:
        body = {
            "model": await self._model_name(),
            "prompt": prompt,
            "max_tokens": request.output_tokens,
            "min_tokens": request.output_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if self._use_priority:
            body["priority"] = self.priority(request)
        try:
            async with self._session.post(f"{self._base}/v1/completions", json=body) as response:
                if response.status == 429:
                    record.rejected, record.reject_reason = True, "HTTP_429"
                    return
                if response.status != 200:
                    record.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                    return
                await self._read_stream(response, record)
        except (aiohttp.ClientError, TimeoutError) as error:
            record.error = f"{type(error).__name__}: {error}"
        finally:
            record.finished_at = time.time()

    @staticmethod
    async def _read_stream(response: aiohttp.ClientResponse, record: RequestRecord) -> None:
        seen = 0
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                record.completed = True
                return
            chunk = json.loads(data)
            usage = chunk.get("usage") or {}
            # Cumulative usage on every chunk counts tokens exactly, even when a chunk
            # carries several tokens or an empty text.
            total = int(usage.get("completion_tokens", seen))
            if total > seen:
                record.token_times.extend([time.time()] * (total - seen))
                seen = total
        record.error = "stream ended without [DONE]"

    async def close(self) -> None:
        await self._session.close()


def make_target(spec: str, use_priority: bool = False) -> Target:
    """`sloserve:HOST:PORT` or `openai:URL`."""
    kind, _, address = spec.partition(":")
    if kind == "sloserve" and address:
        return SloserveTarget(address)
    if kind == "openai" and address:
        return OpenAITarget(address, use_priority=use_priority)
    raise ValueError(f"target must be sloserve:HOST:PORT or openai:URL, got {spec!r}")

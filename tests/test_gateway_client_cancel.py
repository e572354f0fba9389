"""The gateway's OpenAI stream as a benchmark client reads it, over a real replica: usage on
every chunk (exact token counts and times), how the request is served, and a client that
disconnects ending its request in the engine at once."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from conftest import Gateway, Replica, metric_sum

pytestmark = pytest.mark.engine

PROMPT = list(range(10, 60))  # 50 token ids
LOOSE = {"ttft_ms": 5000, "tpot_ms": 500}
CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


@pytest.fixture(scope="module")
def gateway(replica: Replica, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    server = Gateway(workdir=tmp_path_factory.mktemp("gateway-cancel"), replicas=[replica.endpoint])
    server.start()
    try:
        server.wait_serving()
        yield server
    finally:
        assert server.stop() == 0


def _data(raw: bytes) -> dict[str, Any] | None:
    """The JSON of one SSE `data:` line; None for other lines and [DONE]."""
    line = raw.decode().strip()
    if not line.startswith("data:") or line == "data: [DONE]":
        return None
    data: dict[str, Any] = json.loads(line[5:])
    return data


async def _chunks(gateway: Gateway, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.base_url}/completions", json=body) as response,
    ):
        assert response.status == 200, await response.text()
        return [d async for raw in response.content if (d := _data(raw)) is not None]


def test_continuous_usage_counts_every_token_as_it_arrives(gateway: Gateway) -> None:
    body = {
        "model": "tiny", "prompt": PROMPT, "max_tokens": 12, "ignore_eos": True,
        "stream": True, "stream_options": CONTINUOUS, "slo": LOOSE,
    }  # fmt: skip
    chunks = asyncio.run(_chunks(gateway, body))

    assert all("usage" in c for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 12
    # Every chunk before the finishing one brings at least one token: a client times them all.
    deltas = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None]
    delta_counts = [0, *(c["usage"]["completion_tokens"] for c in deltas)]
    assert delta_counts[-1] == 12
    assert all(b > a for a, b in itertools.pairwise(delta_counts))
    assert all(c["usage"]["prompt_tokens"] == len(PROMPT) for c in chunks)
    # How the request is served comes first, not only with the finish a client may not wait for.
    assert chunks[0]["sloserve"]["mode"] == "admitted"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_without_continuous_usage_the_stream_is_as_before(gateway: Gateway) -> None:
    body = {
        "model": "tiny", "prompt": PROMPT, "max_tokens": 6, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}, "slo": LOOSE,
    }  # fmt: skip
    chunks = asyncio.run(_chunks(gateway, body))
    assert [c for c in chunks if "usage" in c] == chunks[-1:]
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def _trace(replica: Replica) -> list[dict[str, Any]]:
    return [json.loads(line) for line in replica.trace_path.read_text().splitlines()]


def _engine_events(replica: Replica, tenant: str, timeout_s: float = 10) -> list[dict[str, Any]]:
    """The scheduler-trace events of the one request `tenant` sent, once it was freed."""
    deadline = time.monotonic() + timeout_s
    while True:
        trace = _trace(replica)
        added = [e for e in trace if e["event"] == "added" and e.get("tenant") == tenant]
        if added:
            ours = [e for e in trace if e.get("request_id") == added[0]["request_id"]]
            if any(e["event"] == "freed" for e in ours):
                return ours
        assert time.monotonic() < deadline, f"the engine never freed {tenant}'s request"
        time.sleep(0.05)


def test_a_client_that_disconnects_ends_its_request_in_the_engine(
    gateway: Gateway, replica: Replica
) -> None:
    tenant = f"leaves-{uuid.uuid4().hex[:8]}"
    body = {
        "model": "tiny", "prompt": PROMPT, "max_tokens": 900, "ignore_eos": True,
        "stream": True, "stream_options": CONTINUOUS, "slo": LOOSE, "user": tenant,
    }  # fmt: skip

    async def read_five_then_leave() -> tuple[int, float]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{gateway.base_url}/completions", json=body) as response,
        ):
            async for raw in response.content:
                data = _data(raw)
                received = int(((data or {}).get("usage") or {}).get("completion_tokens", 0))
                if received >= 5:
                    left_at = time.time()
                    response.close()  # the connection drops, as the bench client's does
                    return received, left_at
        raise AssertionError("the stream ended before five tokens")

    url = gateway.metrics_url
    cancelled_before = metric_sum(url, "sloserve_gateway_requests_total", outcome="cancelled")
    received, left_at = asyncio.run(read_five_then_leave())

    events = _engine_events(replica, tenant)
    freed = next(e for e in events if e["event"] == "freed")
    assert freed["status"] == "FINISHED_ABORTED"  # aborted, not run to max_tokens
    assert freed["time"] - left_at < 2.0, "the cancel took too long to reach the engine"
    # The engine ran this request alone: its decode steps after the client left are the
    # tokens it computed for nobody (output processing and the cancel's two hops).
    extra = [
        e for e in _trace(replica)
        if e["event"] == "step" and left_at <= e["time"] <= freed["time"] and e["tokens"] > 0
    ]  # fmt: skip
    print(
        f"client left after {received} tokens; the engine freed the request "
        f"{1000 * (freed['time'] - left_at):.0f} ms later, after {len(extra)} more steps"
    )
    assert received + len(extra) < 900
    # The gateway counts it as cancelled by its client.
    cancelled = metric_sum(url, "sloserve_gateway_requests_total", outcome="cancelled")
    assert cancelled == cancelled_before + 1

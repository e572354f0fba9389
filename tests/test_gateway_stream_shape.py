"""The gateway's OpenAI stream for the events a real engine emits rarely: text the detokenizer
held back until the end (no token of its own) and a demotion mid-stream. A scripted replica
(an injected sequence; the real replica's streams are in test_gateway_client_cancel.py) sends
them over real gRPC, and a real gateway turns them into SSE. The same script comes over both
transports a gateway meets: InferenceMux, and a call per request from a replica without it (an
older version, mid-rollout), told by its refusal or, where the gateway's first write crossed
that refusal, by the INTERNAL error gRPC reports in its place.

Benchmark clients, vLLM's among them, time every chunk that has a choice as a token's arrival:
so each such chunk before the finishing one must bring a token."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from conftest import Gateway, free_port
from fake_mux import add_fake_inference

from sloserve.v1 import (
    inference_mux_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    replica_control_pb2,
    replica_control_pb2_grpc,
    slo_pb2,
)

CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def _script() -> list[inference_pb2.GenerateResponse]:
    """Admitted; two tokens; demoted; a third token; the held-back tail; complete."""
    delta = inference_pb2.TokenDelta
    admitted = inference_pb2.Admission(
        request_id="scripted",
        mode=slo_pb2.ADMISSION_MODE_ADMITTED,
        class_name="chat",
        prompt_tokens=3,
    )
    return [
        inference_pb2.GenerateResponse(admission=admitted),
        inference_pb2.GenerateResponse(delta=delta(token_ids=[11], text="a")),
        inference_pb2.GenerateResponse(delta=delta(token_ids=[12], text="")),
        inference_pb2.GenerateResponse(
            demotion=inference_pb2.Demotion(reason="EXPIRED", tokens_delivered=2)
        ),
        inference_pb2.GenerateResponse(delta=delta(token_ids=[13], text="b")),
        inference_pb2.GenerateResponse(delta=delta(text="\u00e9")),
        inference_pb2.GenerateResponse(
            completion=inference_pb2.Completion(
                finish_reason=inference_pb2.FINISH_REASON_LENGTH,
                usage=inference_pb2.Usage(prompt_tokens=3, completion_tokens=3),
            )
        ),
    ]


class _ScriptedInference(inference_pb2_grpc.InferenceServicer):
    def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.GenerateResponse]:
        yield from _script()


class _AnswerLost(inference_mux_pb2_grpc.InferenceMuxServicer):
    """A mux call failing before it answers anything, as gRPC reports a refusal that a write
    crossed."""

    def Generate(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.INTERNAL, "Internal error from Core")


class _Ready(replica_control_pb2_grpc.ReplicaControlServicer):
    def WatchLoad(
        self, request: replica_control_pb2.WatchLoadRequest, context: grpc.ServicerContext
    ) -> Iterator[replica_control_pb2.WatchLoadResponse]:
        while context.is_active():
            yield replica_control_pb2.WatchLoadResponse(
                report=replica_control_pb2.LoadReport(ready=True)
            )
            time.sleep(0.1)


@pytest.fixture(scope="module", params=["mux", "per-call", "mux-answer-lost"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    if request.param == "mux":
        add_fake_inference(_ScriptedInference(), server)
    else:
        inference_pb2_grpc.add_InferenceServicer_to_server(_ScriptedInference(), server)
    if request.param == "mux-answer-lost":
        inference_mux_pb2_grpc.add_InferenceMuxServicer_to_server(_AnswerLost(), server)
    replica_control_pb2_grpc.add_ReplicaControlServicer_to_server(_Ready(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    workdir: Path = tmp_path_factory.mktemp("gateway-scripted")
    gateway = Gateway(workdir=workdir, replicas=[f"127.0.0.1:{port}"])
    gateway.start()
    try:
        gateway.wait_serving()
        yield gateway
    finally:
        assert gateway.stop() == 0
        server.stop(grace=None)


async def _chunks(gateway: Gateway, route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.base_url}/{route}", json=body) as response,
    ):
        assert response.status == 200, await response.text()
        lines = [raw.decode().strip() async for raw in response.content]
    events = [line[5:].strip() for line in lines if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def test_every_chunk_with_a_choice_before_the_finish_brings_a_token(gateway: Gateway) -> None:
    body = {
        "model": "tiny", "prompt": [1, 2, 3], "max_tokens": 3, "stream": True,
        "stream_options": CONTINUOUS, "slo": {"ttft_ms": 5000, "tpot_ms": 500},
    }  # fmt: skip
    chunks = asyncio.run(_chunks(gateway, "completions", body))

    timed = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None]
    assert [c["usage"]["completion_tokens"] for c in timed] == [1, 2, 3]
    assert [c["choices"][0]["text"] for c in timed] == ["a", "", "b"]
    assert timed[0]["sloserve"]["mode"] == "admitted"
    # The tail comes with the finish; the demotion as a notice with no choices, at once.
    finish = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert finish["choices"][0]["text"] == "\u00e9"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "ab\u00e9"
    notices = [c for c in chunks if not c["choices"] and "sloserve" in c]
    assert len(notices) == 1 and notices[0]["sloserve"]["demoted"]
    assert chunks.index(notices[0]) == chunks.index(timed[1]) + 1
    assert notices[0]["sloserve"]["mode"] == "best_effort"
    assert notices[0]["usage"]["completion_tokens"] == 2


def test_a_chat_stream_carries_the_tail_in_its_finishing_delta(gateway: Gateway) -> None:
    body = {
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "stream": True, "slo": {"ttft_ms": 5000, "tpot_ms": 500},
    }  # fmt: skip
    chunks = asyncio.run(_chunks(gateway, "chat/completions", body))

    with_choices = [c for c in chunks if c["choices"]]
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in with_choices)
    assert content == "ab\u00e9"
    assert with_choices[-1]["choices"][0]["finish_reason"] == "length"
    assert with_choices[-1]["choices"][0]["delta"] == {"content": "\u00e9"}
    assert any(not c["choices"] and c.get("sloserve", {}).get("demoted") for c in chunks)

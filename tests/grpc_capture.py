"""A gRPC proxy that records what a real server is sent, for tests.

It forwards every call, of any service, to the server behind it as raw bytes, unchanged in
both directions (errors with their rich status details too), and cancels the call behind it
when its own caller cancels. The only thing it adds is a record of each generation request
that passed through (a call of Inference.Generate, or a stream opened on an InferenceMux
call, as the gateway sends them): the request exactly as the server behind it received it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from sloserve.v1 import inference_mux_pb2, inference_pb2

GENERATE = "/sloserve.v1.Inference/Generate"
MUX = "/sloserve.v1.InferenceMux/Generate"


@dataclass
class Passed:
    """One generation that went through the proxy (a Generate call, or a muxed stream)."""

    request: inference_pb2.GenerateRequest
    received_at: float
    ended_at: float | None = None
    cancelled_by_caller: bool = False  # the caller ended the call (a cancel), not the server


@dataclass
class CaptureProxy:
    """Forwards to `upstream` from an ephemeral local port (start(), then `endpoint`)."""

    upstream: str
    generate: list[Passed] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stopped: asyncio.Event | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise TimeoutError("the capture proxy did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(30)

    def _serve(self, started: threading.Event) -> None:
        asyncio.run(self._main(started))

    async def _main(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        channel = grpc.aio.insecure_channel(self.upstream)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([_Forward(channel, self)])
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        started.set()
        await self._stopped.wait()
        await server.stop(grace=None)
        await channel.close()


class _Forward(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Every method as a bytes stream-stream call: the wire is the same for every kind."""

    def __init__(self, channel: grpc.aio.Channel, proxy: CaptureProxy) -> None:
        self._channel = channel
        self._proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        proxy, channel = self._proxy, self._channel

        async def forward(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            passed: list[Passed] = []
            streams: dict[int, Passed] = {}  # a mux call's open streams

            def record(request: inference_pb2.GenerateRequest) -> Passed:
                passed.append(Passed(request, time.time()))
                proxy.generate.append(passed[-1])
                return passed[-1]

            async def requests_upstream() -> AsyncIterator[bytes]:
                async for raw in requests:
                    if method == GENERATE:
                        record(inference_pb2.GenerateRequest.FromString(raw))
                    elif method == MUX:
                        control = inference_mux_pb2.MuxControl.FromString(raw)
                        if control.HasField("start"):
                            streams[control.stream_id] = record(control.start)
                        elif (stream := streams.pop(control.stream_id, None)) is not None:
                            stream.cancelled_by_caller = True
                            stream.ended_at = time.time()
                    yield raw

            def ended_streams(raw: bytes) -> None:
                for frame in inference_mux_pb2.MuxBatch.FromString(raw).frames:
                    if frame.HasField("end") and (s := streams.pop(frame.stream_id, None)):
                        s.ended_at = time.time()

            metadata = [
                (k, v)
                for k, v in context.invocation_metadata() or ()
                if not k.startswith((":", "grpc-"))
            ]
            call = channel.stream_stream(method)(
                requests_upstream(), metadata=metadata, timeout=context.time_remaining()
            )
            try:
                async for response in call:
                    if method == MUX:
                        ended_streams(response)
                    yield response
            except grpc.aio.AioRpcError as error:
                await context.abort(
                    error.code(), error.details() or "", error.trailing_metadata() or ()
                )
            except (asyncio.CancelledError, GeneratorExit):  # the caller cancelled
                for p in passed:
                    if p.ended_at is None:
                        p.cancelled_by_caller = True
                raise
            finally:
                call.cancel()
                for p in passed:
                    if p.ended_at is None:
                        p.ended_at = time.time()

        return grpc.stream_stream_rpc_method_handler(forward)

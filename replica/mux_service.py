"""The InferenceMux service of a replica: many requests' streams over one call, in batches.

Each stream runs InferenceService.Generate unchanged: the same validation, admission, messages
and errors. A stand-in for gRPC's servicer context turns Generate's aborts into `end` frames.
Frames that are ready together (every running request's token from one engine step) leave as
one message: gRPC's cost per message, not per token, is what the batch saves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn, Protocol

import grpc
from google.rpc import code_pb2, status_pb2

from sloserve import errors
from sloserve.v1 import inference_mux_pb2, inference_mux_pb2_grpc, inference_pb2

log = logging.getLogger(__name__)


class StreamAborted(grpc.aio.AbortError):  # type: ignore[misc]
    """Generate ended one stream with an error status (it would have aborted its call)."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


class StreamContext:
    """What Generate uses of grpc.aio.ServicerContext (its aborts), for one muxed stream."""

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: object = ()
    ) -> NoReturn:
        raise StreamAborted(status_pb2.Status(code=code.value[0], message=details))

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise StreamAborted(errors.status_of(status))


class Generator(Protocol):
    """What the mux serves: Inference.Generate on grpc.aio (InferenceService's)."""

    def Generate(
        self, request: inference_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[inference_pb2.GenerateResponse]: ...


class _MuxCall:
    """The streams of one InferenceMux call and the frames waiting to be sent."""

    def __init__(self, inference: Generator) -> None:
        self._inference = inference
        self._streams: dict[int, asyncio.Task[None]] = {}
        self._batch = inference_mux_pb2.MuxBatch()
        self._ready = asyncio.Event()
        self._reading = True

    async def read(self, controls: AsyncIterator[inference_mux_pb2.MuxControl]) -> None:
        """Starts and cancels streams as the caller asks, until it stops sending."""
        try:
            async for control in controls:
                action = control.WhichOneof("action")
                if action == "start":
                    self._start(control.stream_id, control.start)
                elif action == "cancel":
                    task = self._streams.pop(control.stream_id, None)
                    if task is not None:
                        task.cancel()
        except grpc.aio.AioRpcError:
            pass  # the call is over; the server cancels its handler, and so every stream
        finally:
            self._reading = False
            self._ready.set()

    def _start(self, stream_id: int, request: inference_pb2.GenerateRequest) -> None:
        if stream_id in self._streams:
            self._end(
                stream_id,
                status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT,
                    message=f"stream_id {stream_id} is already open on this call",
                ),
            )
            return
        self._streams[stream_id] = asyncio.create_task(self._run(stream_id, request))

    async def _run(self, stream_id: int, request: inference_pb2.GenerateRequest) -> None:
        try:
            async for response in self._inference.Generate(request, StreamContext()):
                frame = self._batch.frames.add(stream_id=stream_id)
                frame.response.CopyFrom(response)
                self._ready.set()
            end = status_pb2.Status(code=code_pb2.OK)
        except StreamAborted as aborted:
            end = aborted.status
        except asyncio.CancelledError:
            return  # the caller cancelled it: it expects nothing more
        except Exception as error:  # Generate answers its own errors: this is a bug
            log.exception("stream %d failed", stream_id)
            end = status_pb2.Status(code=code_pb2.INTERNAL, message=f"generation failed: {error}")
        finally:
            self._streams.pop(stream_id, None)
        self._end(stream_id, end)

    def _end(self, stream_id: int, status: status_pb2.Status) -> None:
        self._batch.frames.add(stream_id=stream_id).end.CopyFrom(status)
        self._ready.set()

    async def batches(self) -> AsyncIterator[inference_mux_pb2.MuxBatch]:
        """What is ready, as one message at a time, until the caller stops sending and every
        stream has ended."""
        while True:
            if not self._batch.frames:
                if not self._reading and not self._streams:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            batch, self._batch = self._batch, inference_mux_pb2.MuxBatch()
            yield batch

    def cancel_all(self) -> None:
        for task in self._streams.values():
            task.cancel()


class InferenceMuxService(inference_mux_pb2_grpc.InferenceMuxServicer):
    def __init__(self, inference: Generator) -> None:
        self._inference = inference

    async def Generate(
        self,
        request_iterator: AsyncIterator[inference_mux_pb2.MuxControl],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inference_mux_pb2.MuxBatch]:
        call = _MuxCall(self._inference)
        reader = asyncio.create_task(call.read(request_iterator))
        try:
            async for batch in call.batches():
                yield batch
        finally:
            # The caller went away (or the server is stopping): nobody reads these streams.
            reader.cancel()
            call.cancel_all()

"""The gateway's end of a replica's InferenceMux call: every request to that replica rides one
call, and each gets a stream that reads like the response stream of Inference.Generate.

A stream yields the replica's GenerateResponse messages and ends as Generate's call would: on
its Completion's `end` frame, or with grpc.aio.AioRpcError carrying the status (and its rich
details) Generate would have ended the call with. When the call itself fails (the replica
went away), every stream open on it fails with that error, and the next request opens a new
call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable

import grpc
from google.rpc import status_pb2

from sloserve.v1 import inference_mux_pb2, inference_mux_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def _error(status: status_pb2.Status) -> grpc.aio.AioRpcError:
    """The error Generate's call would have raised with `status`."""
    return grpc.aio.AioRpcError(
        _CODES.get(status.code, grpc.StatusCode.UNKNOWN),
        grpc.aio.Metadata(),
        grpc.aio.Metadata((_STATUS_DETAILS_KEY, status.SerializeToString())),
        details=status.message,
    )


class MuxStream:
    """One request's responses, read as `async for` (the shape of a Generate call)."""

    def __init__(
        self, call: _MuxCall, stream_id: int, request: inference_pb2.GenerateRequest
    ) -> None:
        self._call = call
        self._stream_id = stream_id
        self.request = request  # for a replica that refuses the mux (fall_back)
        self._responses: deque[inference_pb2.GenerateResponse] = deque()
        self._end: grpc.aio.AioRpcError | None = None
        self._ended = False
        self._completed = False
        self._waiter: asyncio.Future[None] | None = None
        # The request's own Generate call, once the replica refused the mux.
        self._fallback: grpc.aio.UnaryStreamCall | None = None

    def __aiter__(self) -> MuxStream:
        return self

    async def __anext__(self) -> inference_pb2.GenerateResponse:
        while not self._responses:
            if self._fallback is not None:
                response: inference_pb2.GenerateResponse = await self._fallback.read()
                if response is grpc.aio.EOF:
                    raise StopAsyncIteration
                return response
            if self._ended:
                if self._end is not None:
                    raise self._end
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        response = self._responses.popleft()
        if response.HasField("completion"):
            self._completed = True
        return response

    def cancel(self) -> None:
        """The reader is done with the stream: the replica stops it, unless it is over."""
        if self._fallback is not None:
            self._fallback.cancel()
        elif not (self._ended or self._completed):
            self._ended = True
            self._call.cancel(self._stream_id)

    def fall_back(self, call: grpc.aio.UnaryStreamCall) -> None:
        """Reads the request's own Generate `call` from now on."""
        self._fallback = call
        self._wake()

    # -- fed by the call's reader --------------------------------------------------------

    def push(self, response: inference_pb2.GenerateResponse) -> None:
        self._responses.append(response)
        self._wake()

    def finish(self, error: grpc.aio.AioRpcError | None) -> None:
        self._ended = True
        self._end = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _MuxCall:
    """One InferenceMux call: its outgoing controls and its open streams."""

    def __init__(
        self,
        stub: inference_mux_pb2_grpc.InferenceMuxStub,
        resend_per_call: Callable[[list[MuxStream], bool], None],
    ) -> None:
        self._resend_per_call = resend_per_call
        self._controls: asyncio.Queue[inference_mux_pb2.MuxControl | None] = asyncio.Queue()
        self._streams: dict[int, MuxStream] = {}
        self._ids = itertools.count(1)
        self.closed = False
        self._call = stub.Generate(self._send())
        self._reader = asyncio.create_task(self._read())

    def open(self, request: inference_pb2.GenerateRequest) -> MuxStream:
        stream_id = next(self._ids)
        stream = MuxStream(self, stream_id, request)
        self._streams[stream_id] = stream
        self._controls.put_nowait(inference_mux_pb2.MuxControl(stream_id=stream_id, start=request))
        return stream

    def cancel(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None and not self.closed:
            self._controls.put_nowait(
                inference_mux_pb2.MuxControl(stream_id=stream_id, cancel=True)
            )

    def close(self) -> None:
        self._call.cancel()

    async def _send(self) -> AsyncIterator[inference_mux_pb2.MuxControl]:
        while (control := await self._controls.get()) is not None:
            yield control

    async def _read(self) -> None:
        error = _error(
            status_pb2.Status(
                code=grpc.StatusCode.UNAVAILABLE.value[0],
                message="the replica ended the stream call",
            )
        )
        answered = False  # whether the replica has sent anything on this call
        try:
            async for batch in self._call:
                answered = True
                for frame in batch.frames:
                    stream = self._streams.get(frame.stream_id)
                    if stream is None:
                        continue  # cancelled here; its last frames were on their way
                    if frame.HasField("end"):
                        del self._streams[frame.stream_id]
                        stream.finish(_error(frame.end) if frame.end.code else None)
                    else:
                        stream.push(frame.response)
        except grpc.aio.AioRpcError as failed:
            error = failed
            # A replica without the mux refuses the call at once; should the call's first
            # write cross that answer, gRPC reports its own INTERNAL error in its place. With
            # nothing answered, the streams go again as calls of their own either way (a
            # replica serves those with or without the mux); only a refusal seen is final.
            refused = failed.code() == grpc.StatusCode.UNIMPLEMENTED
            if refused or (not answered and failed.code() == grpc.StatusCode.INTERNAL):
                self._resend_per_call(list(self._streams.values()), refused)
                self._streams.clear()
        finally:
            self.closed = True
            for stream in self._streams.values():
                stream.finish(error)
            self._streams.clear()


class ReplicaStreams:
    """A replica's request streams, all on one InferenceMux call (opened when needed)."""

    def __init__(self, endpoint: str, channel: grpc.aio.Channel) -> None:
        self._endpoint = endpoint
        self._stub = inference_mux_pb2_grpc.InferenceMuxStub(channel)
        self._inference = inference_pb2_grpc.InferenceStub(channel)
        self._call: _MuxCall | None = None
        self.per_call = False  # the replica has no InferenceMux: a Generate call per request

    def generate(
        self, request: inference_pb2.GenerateRequest
    ) -> MuxStream | grpc.aio.UnaryStreamCall:
        """The request's response stream: `async for` it, `cancel()` it when done."""
        if self.per_call:
            return self._inference.Generate(request)
        if self._call is None or self._call.closed:
            self._call = _MuxCall(self._stub, self._resend_per_call)
        return self._call.open(request)

    def _resend_per_call(self, streams: list[MuxStream], refused: bool) -> None:
        """The replica refused the mux call (`refused`: it has no InferenceMux; later
        requests go per call too), or may have: `streams` go again, each on a Generate call
        of its own."""
        if refused and not self.per_call:
            log.warning(
                "replica %s has no InferenceMux (an older version?): one call per request",
                self._endpoint,
            )
            self.per_call = True
        for stream in streams:
            stream.fall_back(self._inference.Generate(stream.request))

    def close(self) -> None:
        if self._call is not None:
            self._call.close()

"""Serves a fake replica's synchronous Inference.Generate over InferenceMux, as the gateway
calls replicas, so that a fault a fake injects travels the gateway's real path.

Each stream runs the fake's Generate in a thread of its own; an abort ends the stream with
its status, as the replica's mux service does for its own Generate.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc
from google.rpc import code_pb2, status_pb2

from sloserve.v1 import inference_mux_pb2, inference_mux_pb2_grpc, inference_pb2, inference_pb2_grpc


class _Aborted(Exception):
    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


class _StreamContext:
    """A fake's view of its stream: aborts end the stream, is_active is the call's."""

    def __init__(self, call: grpc.ServicerContext, stream_id: int, cancelled: set[int]) -> None:
        self._call = call
        self._stream_id = stream_id
        self._cancelled = cancelled

    def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise _Aborted(status_pb2.Status(code=code.value[0], message=details))

    def is_active(self) -> bool:
        return self._call.is_active() and self._stream_id not in self._cancelled


class SyncInferenceMux(inference_mux_pb2_grpc.InferenceMuxServicer):
    def __init__(self, inference: inference_pb2_grpc.InferenceServicer) -> None:
        self._inference = inference

    def Generate(
        self, request_iterator: Iterator[inference_mux_pb2.MuxControl], context: Any
    ) -> Iterator[inference_mux_pb2.MuxBatch]:
        frames: queue.Queue[inference_mux_pb2.MuxFrame] = queue.Queue()
        cancelled: set[int] = set()

        def run(stream_id: int, request: inference_pb2.GenerateRequest) -> None:
            stream_context = _StreamContext(context, stream_id, cancelled)
            try:
                for response in self._inference.Generate(request, stream_context):
                    if stream_id in cancelled:
                        return
                    frames.put(inference_mux_pb2.MuxFrame(stream_id=stream_id, response=response))
                end = status_pb2.Status(code=code_pb2.OK)
            except _Aborted as aborted:
                end = aborted.status
            frames.put(inference_mux_pb2.MuxFrame(stream_id=stream_id, end=end))

        def read() -> None:
            try:
                for control in request_iterator:
                    if control.WhichOneof("action") == "start":
                        threading.Thread(
                            target=run, args=(control.stream_id, control.start), daemon=True
                        ).start()
                    else:
                        cancelled.add(control.stream_id)
            except grpc.RpcError:
                pass  # the call ended

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                first = frames.get(timeout=0.05)
            except queue.Empty:
                continue
            batch = inference_mux_pb2.MuxBatch(frames=[first])
            while not frames.empty():
                batch.frames.append(frames.get())
            yield batch


def add_fake_inference(
    inference: inference_pb2_grpc.InferenceServicer, server: grpc.Server
) -> None:
    """Serves `inference` both ways: per call (Inference) and multiplexed (InferenceMux)."""
    inference_pb2_grpc.add_InferenceServicer_to_server(inference, server)
    inference_mux_pb2_grpc.add_InferenceMuxServicer_to_server(SyncInferenceMux(inference), server)

"""InferenceMux on a real replica: many requests' streams over one call, batched, each ending
as Inference.Generate would (its messages, its errors with their details), and a cancelled
stream freed in the engine."""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict

import grpc
from conftest import Replica
from google.rpc import code_pb2, error_details_pb2, status_pb2

from sloserve.client import build_request
from sloserve.v1 import (
    inference_mux_pb2,
    inference_mux_pb2_grpc,
    replica_control_pb2,
    replica_control_pb2_grpc,
)

TIMEOUT_S = 120


class _Call:
    """One InferenceMux call, driven from the test: controls in, batches out."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._controls: queue.Queue[inference_mux_pb2.MuxControl | None] = queue.Queue()
        self._batches = inference_mux_pb2_grpc.InferenceMuxStub(channel).Generate(
            iter(self._controls.get, None), timeout=TIMEOUT_S
        )
        self.frames: dict[int, list[inference_mux_pb2.MuxFrame]] = defaultdict(list)
        self.batch_sizes: list[int] = []

    def start(self, stream_id: int, **request: object) -> None:
        prompt = str(request.pop("prompt", "once upon a time"))
        self._controls.put(
            inference_mux_pb2.MuxControl(
                stream_id=stream_id,
                start=build_request(prompt, request_id=f"mux-{stream_id}", **request),  # type: ignore[arg-type]
            )
        )

    def cancel(self, stream_id: int) -> None:
        self._controls.put(inference_mux_pb2.MuxControl(stream_id=stream_id, cancel=True))

    def read_until(self, ended: set[int]) -> None:
        """Reads batches until each stream in `ended` has its end frame."""
        for batch in self._batches:
            self.batch_sizes.append(len(batch.frames))
            for frame in batch.frames:
                self.frames[frame.stream_id].append(frame)
            if all(self.end(s) is not None for s in ended):
                return
        raise AssertionError("the call ended before every stream did")

    def end(self, stream_id: int) -> status_pb2.Status | None:
        frames = self.frames.get(stream_id, [])
        return frames[-1].end if frames and frames[-1].HasField("end") else None

    def close(self) -> None:
        self._controls.put(None)
        self._batches.cancel()


def _in_flight(replica: Replica) -> int:
    with grpc.insecure_channel(replica.endpoint) as channel:
        stub = replica_control_pb2_grpc.ReplicaControlStub(channel)
        stream = stub.WatchLoad(replica_control_pb2.WatchLoadRequest(), timeout=10)
        report = next(iter(stream)).report
        stream.cancel()
    return sum(c.in_flight for c in report.classes)


def _tokens(frames: list[inference_mux_pb2.MuxFrame]) -> int:
    return sum(len(f.response.delta.token_ids) for f in frames if f.HasField("response"))


def test_streams_share_a_call_in_batches_and_end_as_generate_would(replica: Replica) -> None:
    with grpc.insecure_channel(replica.endpoint) as channel:
        call = _Call(channel)
        try:
            for stream_id in range(1, 7):
                call.start(stream_id, slo_class="chat", max_tokens=24, ignore_eos=True)
            call.start(7, slo_class="no-such-class", max_tokens=4)
            call.read_until(set(range(1, 8)))
        finally:
            call.close()

    for stream_id in range(1, 7):
        frames = call.frames[stream_id]
        kinds = [f.response.WhichOneof("event") for f in frames[:-1]]
        assert kinds[0] == "admission" and kinds[-1] == "completion", kinds
        assert _tokens(frames) == 24
        assert frames[-1].end.code == code_pb2.OK
    bad = call.end(7)
    assert bad is not None and bad.code == code_pb2.INVALID_ARGUMENT
    field = error_details_pb2.BadRequest()
    assert any(d.Unpack(field) for d in bad.details)
    assert field.field_violations[0].field == "slo.class_name"
    # Six streams decoding together: their tokens of one engine step share a message.
    assert max(call.batch_sizes) > 1
    assert len(call.batch_sizes) < sum(call.batch_sizes) / 2


def test_a_cancelled_stream_is_freed_and_a_reused_id_is_refused(replica: Replica) -> None:
    with grpc.insecure_channel(replica.endpoint) as channel:
        call = _Call(channel)
        try:
            call.start(1, slo_class="chat", max_tokens=900, ignore_eos=True)
            call.start(1, slo_class="chat", max_tokens=4)
            reader = threading.Thread(target=call.read_until, args=({2},), daemon=True)
            call.start(2, slo_class="chat", max_tokens=4)  # something to end the read on
            reader.start()
            reader.join(TIMEOUT_S)
            assert _tokens(call.frames[1]) >= 1
            reused = [f for f in call.frames[1] if f.HasField("end")]
            assert reused and reused[0].end.code == code_pb2.INVALID_ARGUMENT
            assert "already open" in reused[0].end.message
            call.cancel(1)
            deadline = time.monotonic() + 10
            while _in_flight(replica) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _in_flight(replica) == 0, "the cancelled stream still runs"
        finally:
            call.close()

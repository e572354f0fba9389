"""A client that cancels frees its request inside the engine."""

from __future__ import annotations

import json
import time

import grpc
from conftest import Replica

from sloserve.client import build_request
from sloserve.v1 import inference_pb2_grpc, replica_control_pb2, replica_control_pb2_grpc


def _load(replica: Replica) -> replica_control_pb2.LoadReport:
    with grpc.insecure_channel(replica.endpoint) as channel:
        stub = replica_control_pb2_grpc.ReplicaControlStub(channel)
        stream = stub.WatchLoad(replica_control_pb2.WatchLoadRequest(), timeout=10)
        report = next(iter(stream)).report
        assert isinstance(report, replica_control_pb2.LoadReport)
        stream.cancel()
    return report


def _trace_events(replica: Replica, request_id: str) -> list[dict[str, object]]:
    events = [json.loads(line) for line in replica.trace_path.read_text().splitlines()]
    return [e for e in events if e.get("request_id") == request_id]


def test_cancel_aborts_request_in_engine_and_frees_kv_cache(replica: Replica) -> None:
    request = build_request("a long story", max_tokens=900, ignore_eos=True, request_id="cancel-me")
    with grpc.insecure_channel(replica.endpoint) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=60)
        received = 0
        for response in call:
            received += len(response.delta.token_ids)
            if received >= 5:
                break
        busy = _load(replica)
        call.cancel()

    assert busy.running == 1 and busy.kv_cache_usage > 0, "the request held KV cache"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        freed = [e for e in _trace_events(replica, "cancel-me") if e["event"] == "freed"]
        idle = _load(replica)
        if freed and idle.running == 0 and idle.kv_cache_usage == 0:
            break
        time.sleep(0.1)
    assert freed, "the engine-core scheduler never freed the request"
    assert freed[0]["status"] == "FINISHED_ABORTED"
    assert idle.running == 0
    assert idle.kv_cache_usage == 0.0
    assert not [c for c in idle.classes if c.in_flight], "the replica still tracks it"

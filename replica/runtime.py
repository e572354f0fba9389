"""The parts of a running replica that its gRPC services share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sloserve.replica.engine import LoadListener
from sloserve.replica.metrics import ReplicaMetrics
from sloserve.replica.state import ReplicaState
from sloserve.replica.validation import ModelLimits
from sloserve.replica.verdicts import Verdicts

# Services the health service reports on, besides the server as a whole ("").
SERVICE_NAMES = ("sloserve.v1.Inference", "sloserve.v1.ReplicaControl")


@dataclass
class ReplicaRuntime:
    state: ReplicaState
    metrics: ReplicaMetrics
    listener: LoadListener
    # Set once the engine is ready (vllm.v1.engine.async_llm.AsyncLLM).
    engine: Any = None
    limits: ModelLimits | None = None
    tokenizer: Any = None
    # grpc_health's HealthServicer; SERVING only while ready and not draining.
    health: Any = None
    # The engine's admission verdicts (bound to the event loop when serving starts).
    verdicts: Verdicts = field(default_factory=Verdicts)

    def publish_health(self) -> None:
        from grpc_health.v1 import health_pb2

        serving = self.state.ready and not self.state.draining
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", *SERVICE_NAMES):
            self.health.set(service, status)
        self.metrics.ready.set(int(self.state.ready))
        self.metrics.draining.set(int(self.state.draining))

    def start_drain(self) -> int:
        """Admits nothing new from now on; returns the number of requests in flight."""
        if not self.state.draining:
            self.state.draining = True
            self.publish_health()
        return len(self.state.in_flight)

    def tokenize(self, text: str) -> Sequence[int]:
        ids: Sequence[int] = self.tokenizer.encode(text, add_special_tokens=True)
        return ids

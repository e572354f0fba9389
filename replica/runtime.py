"""The parts of a running replica that its gRPC services share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sloserve.replica.engine import LoadListener
from sloserve.replica.metrics import ReplicaMetrics
from sloserve.replica.state import EngineFault, ReplicaState
from sloserve.replica.validation import ModelLimits
from sloserve.replica.verdicts import Verdicts

log = logging.getLogger("sloserve.replica")

# Services the health service reports on, besides the server as a whole ("").
SERVICE_NAMES = ("sloserve.v1.Inference", "sloserve.v1.InferenceMux", "sloserve.v1.ReplicaControl")


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
    # Set when the engine fails (fail_engine): requests waiting on it end at once.
    engine_failed: asyncio.Event = field(default_factory=asyncio.Event)

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

    def fail_engine(self, fault: EngineFault) -> None:
        """The engine will not serve again: health NOT_SERVING, load reports not ready, and
        requests in flight end UNAVAILABLE (inference_service.py). The first fault wins."""
        if self.state.fault is not None:
            return
        self.state.fault = fault
        self.state.ready = False
        log.error("%s; in-flight requests: %d", fault, len(self.state.in_flight))
        self.publish_health()
        self.engine_failed.set()
        if self.engine is not None:
            # Ends every request's stream the way vLLM ends them when its engine dies
            # (EngineDeadError from generate()): a stream waiting on a wedged engine wakes too,
            # with no watch of its own on every token.
            from vllm.v1.engine.exceptions import EngineDeadError

            self.engine.output_processor.propagate_error(EngineDeadError(str(fault)))

    def start_drain(self) -> int:
        """Admits nothing new from now on; returns the number of requests in flight."""
        if not self.state.draining:
            self.state.draining = True
            self.publish_health()
        return len(self.state.in_flight)

    def tokenize(self, text: str) -> Sequence[int]:
        ids: Sequence[int] = self.tokenizer.encode(text, add_special_tokens=True)
        return ids

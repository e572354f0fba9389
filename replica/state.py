"""What a replica knows about itself: readiness, drain, engine faults, SLO classes, requests
in flight."""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from dataclasses import dataclass, field

from sloserve.slo import RequestSlo, SloCatalog


@dataclass
class InFlight:
    slo: RequestSlo
    prompt_tokens: int
    # Prompt tokens queued ahead of this request when it arrived (for the TTFT estimator).
    queued_ahead_tokens: int
    first_token_time: float | None = None


class FaultKind(enum.Enum):
    """How the engine stopped serving for good."""

    DEAD = "dead"  # the engine-core process is gone (vLLM's engine client says errored)
    WEDGED = "wedged"  # it has work and has not finished a step for too long


@dataclass(frozen=True)
class EngineFault:
    kind: FaultKind
    detail: str  # for logs and error messages

    def __str__(self) -> str:
        return f"the engine is {self.kind.value}: {self.detail}"


@dataclass
class ClassTally:
    finished: int = 0
    attained: int = 0


class PrefillRateEstimator:
    """Seconds to first token per queued prompt token, as an exponential moving average.

    An interim predictor for Probe until the fitted step-time model replaces it: it learns
    from each first token how long the prompt tokens ahead of it took, queueing included.
    """

    def __init__(self, smoothing: float = 0.2) -> None:
        self._smoothing = smoothing
        self.seconds_per_token: float | None = None

    def observe(self, ttft_s: float, tokens: int) -> None:
        if tokens <= 0:
            return
        sample = ttft_s / tokens
        if self.seconds_per_token is None:
            self.seconds_per_token = sample
        else:
            self.seconds_per_token += self._smoothing * (sample - self.seconds_per_token)

    def predict_ttft(self, tokens: int) -> float:
        return (self.seconds_per_token or 0.0) * tokens


@dataclass
class ReplicaState:
    catalog: SloCatalog
    max_waiting: int
    ready: bool = False
    draining: bool = False
    # Set once the engine failed (engine_health.py): the replica never serves again.
    fault: EngineFault | None = None
    in_flight: dict[str, InFlight] = field(default_factory=dict)
    tallies: dict[str, ClassTally] = field(default_factory=dict)
    prefill_rate: PrefillRateEstimator = field(default_factory=PrefillRateEstimator)
    # Set whenever the last in-flight request ends; drain waits on it.
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def waiting_for_first_token(self) -> int:
        return sum(1 for r in self.in_flight.values() if r.first_token_time is None)

    @property
    def pending_prefill_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.in_flight.values() if r.first_token_time is None)

    def in_flight_by_class(self) -> Counter[str]:
        return Counter(r.slo.class_name for r in self.in_flight.values())

    def start(self, slo: RequestSlo, prompt_tokens: int) -> InFlight:
        entry = InFlight(slo, prompt_tokens, queued_ahead_tokens=self.pending_prefill_tokens)
        self.in_flight[slo.request_id] = entry
        self.idle.clear()
        return entry

    def first_token(self, entry: InFlight, now: float) -> None:
        entry.first_token_time = now
        # This replica's own time to the first token (arrival here, not upstream): it learns
        # how fast this replica prefills what was queued.
        self.prefill_rate.observe(
            now - entry.slo.arrival_time, entry.queued_ahead_tokens + entry.prompt_tokens
        )

    def finish(self, entry: InFlight, attained: bool | None) -> None:
        """Forgets a request; `attained` None for one that ended in an error."""
        self.in_flight.pop(entry.slo.request_id, None)
        if attained is not None:
            tally = self.tallies.setdefault(entry.slo.class_name, ClassTally())
            tally.finished += 1
            tally.attained += int(attained)
        if not self.in_flight:
            self.idle.set()

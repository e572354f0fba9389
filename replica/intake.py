"""The replica's front door: checks that turn a request away before it reaches the engine.

A draining replica takes nothing new, and a replica takes no more requests waiting for their
first token than `max_waiting` (a hard bound on memory and queueing). Whether a request can
meet its SLO is decided inside the engine, by the SLO admission controller (admission.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from sloserve.replica.state import ReplicaState
from sloserve.v1 import slo_pb2


@dataclass(frozen=True)
class Decision:
    admit: bool
    reason: slo_pb2.RejectReason = slo_pb2.REJECT_REASON_UNSPECIFIED
    predicted_ttft_s: float = 0.0
    retry_after_s: float = 0.0

    @property
    def reason_name(self) -> str:
        """The RejectReason name without its prefix, as sent in ErrorInfo.reason."""
        return slo_pb2.RejectReason.Name(self.reason).removeprefix("REJECT_REASON_")


def decide(state: ReplicaState, prompt_tokens: int) -> Decision:
    queued = state.pending_prefill_tokens + prompt_tokens
    predicted = state.prefill_rate.predict_ttft(queued)
    if state.draining:
        return Decision(False, slo_pb2.REJECT_REASON_DRAINING, predicted)
    if state.waiting_for_first_token >= state.max_waiting:
        # The queue drains about as fast as its prompts prefill; retry after that.
        retry = max(0.1, state.prefill_rate.predict_ttft(state.pending_prefill_tokens))
        return Decision(False, slo_pb2.REJECT_REASON_QUEUE_FULL, predicted, retry)
    return Decision(True, predicted_ttft_s=predicted)

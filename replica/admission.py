"""Where a replica decides whether to take a request now.

For now the decision is a bounded queue: a replica takes no more requests waiting for their
first token than `max_waiting`. The SLO planner's soft admission replaces this test.
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

"""Routing policies: the order in which the replicas in rotation are tried for one request.

The dispatcher tries the first replica, and the next when one rejects. Policies:
- `slack` (default): most predicted TTFT slack first. Slack is the request's TTFT budget
  minus the TTFT predicted from the replica's latest load report plus what the gateway sent
  it since (`Outstanding`). Spreads load, so bursts find room.
- `packing`: the feasible replica with the *least* slack first (fill replicas one by one,
  leaving others idle for long prompts or for scaling down), then infeasible ones.
- `round-robin` and `least-outstanding`: load-blind baselines for benchmarks.

The prediction is deliberately simple (the gateway has no tokenizer and no step model): it
only has to rank replicas; each replica's own admission control decides for real.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from sloserve.errors import FieldError
from sloserve.gateway.replica_pool import Outstanding, Probed
from sloserve.v1 import inference_pb2, replica_control_pb2

POLICIES = ("slack", "packing", "round-robin", "least-outstanding")


class Candidate(Protocol):
    """What routing reads of a replica (ReplicaHandle is one)."""

    @property
    def endpoint(self) -> str: ...
    @property
    def report(self) -> replica_control_pb2.LoadReport | None: ...
    @property
    def outstanding(self) -> Outstanding: ...
    @property
    def probed(self) -> Probed | None: ...
    @property
    def lag_s(self) -> float:
        """Seconds added to its predicted TTFT for what is not known of its queue (its
        silence since its latest report when a probe went unanswered; else 0)."""
        ...


@dataclass(frozen=True)
class RequestShape:
    prompt_tokens: int  # an estimate for text prompts
    ttft_budget_s: float


@dataclass(frozen=True)
class CostModel:
    """A rough replica speed, for predicting TTFT from queued work."""

    prefill_tokens_per_s: float = 4000.0
    # Each running request adds a decode slot to every step, slowing prefill down.
    running_request_s: float = 0.005

    def predicted_ttft_s(self, replica: Candidate, prompt_tokens: int) -> float:
        report, ours = replica.report, replica.outstanding
        # What the gateway sent counts at once, before a report shows it; what it sent
        # before the latest report is in the report's figures already.
        running = max(report.running if report is not None else 0, ours.in_flight)
        queued = ours.unreported_prompt_tokens + prompt_tokens
        busy = running * self.running_request_s + replica.lag_s
        if replica.probed is not None:
            # Newer than the report: the replica's own prediction of its queue.
            return replica.probed.queue_s + queued / self.prefill_tokens_per_s + busy
        pending = report.pending_prefill_tokens if report is not None else 0
        return (pending + queued) / self.prefill_tokens_per_s + busy

    def slack_s(self, replica: Candidate, shape: RequestShape) -> float:
        return shape.ttft_budget_s - self.predicted_ttft_s(replica, shape.prompt_tokens)


BYTES_PER_TOKEN = 4  # typical of BPE tokenizers on English text


def estimate_prompt_tokens(prompt: inference_pb2.Prompt) -> int:
    if prompt.WhichOneof("kind") == "token_ids":
        return len(prompt.token_ids.ids)
    return max(1, len(prompt.text.encode()) // BYTES_PER_TOKEN)


C = TypeVar("C", bound=Candidate)


class Router:
    def __init__(self, policy: str = "slack", costs: CostModel | None = None) -> None:
        if policy not in POLICIES:
            raise FieldError("routing", f"unknown policy {policy!r}; known: {list(POLICIES)}")
        self.policy = policy
        self.costs = costs or CostModel()
        self._turn = itertools.count()
        self._last_turn = 0

    def rank(self, replicas: Sequence[C], shape: RequestShape, retry: bool = False) -> list[C]:
        """`replicas` in the order to try them. Ties keep the given (endpoint) order.

        `retry`: ranking again for a request one replica turned away. Round robin then does
        not take a turn: a retry must not move the next request's first choice (else a replica
        that rejects often would be every request's first choice)."""
        if not replicas:
            return []
        if self.policy == "round-robin":
            turn = self._last_turn if retry else next(self._turn)
            self._last_turn = turn
            start = turn % len(replicas)
            return [*replicas[start:], *replicas[:start]]
        if self.policy == "least-outstanding":
            return sorted(replicas, key=_outstanding_load)
        slack = {r.endpoint: self.costs.slack_s(r, shape) for r in replicas}
        most_slack = sorted(replicas, key=lambda r: -slack[r.endpoint])
        if self.policy == "slack":
            return most_slack
        feasible = [r for r in replicas if slack[r.endpoint] >= 0]
        tightest_fit = sorted(feasible, key=lambda r: slack[r.endpoint])
        return [*tightest_fit, *(r for r in most_slack if slack[r.endpoint] < 0)]


def _outstanding_load(replica: Candidate) -> tuple[int, int]:
    report = replica.report
    reported = (report.running + report.waiting) if report is not None else 0
    return replica.outstanding.in_flight, reported

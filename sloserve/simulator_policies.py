"""The policies the virtual engine (sloserve/simulator.py) can drive, and the engine limits
they plan within.

"sloserve" is the replica's own SloPolicy, built as the vLLM scheduler builds it; the
"vllm-fcfs-*" policies stand in for stock vLLM's scheduler, so a simulated comparison pits
the SLO policy against what vLLM would do on the same step-time model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sloserve.replica.admission import ADMIT, Verdict
from sloserve.replica.planner import StepPlan, settings_for
from sloserve.replica.policy import Expiry, PolicyCounters, SloPolicy
from sloserve.replica.slo_request import SloRequest
from sloserve.stepmodel import StepTimeModel


class Policy(Protocol):
    """What the engine drives: SloPolicy's interface, so stand-ins plug in beside it."""

    counters: PolicyCounters
    last_plan_s: float

    def arrive(self, now: float, request: SloRequest) -> Verdict: ...

    def expire(self, now: float) -> list[Expiry]: ...

    def plan(
        self, now: float, decoding: Sequence[SloRequest], prefilling: Sequence[SloRequest]
    ) -> StepPlan: ...

    def finish(self, request_id: str, completed: bool) -> SloRequest | None: ...

    def observe_step(
        self, predicted_s: float, actual_s: float, decode_only: bool = False
    ) -> None: ...


@dataclass(frozen=True)
class EngineLimits:
    max_step_tokens: int  # vLLM's max_num_batched_tokens
    max_running: int  # vLLM's max_num_seqs
    kv_capacity_tokens: int  # tokens the KV cache holds

    @classmethod
    def from_profile(cls, model: StepTimeModel, kv_capacity_tokens: int) -> EngineLimits:
        """The limits the profile was measured under, so the model is not extrapolated."""
        engine = model.metadata.get("engine", {})
        return cls(
            max_step_tokens=int(engine.get("max_num_batched_tokens", 2048)),
            max_running=int(engine.get("max_num_seqs", 256)),
            kv_capacity_tokens=kv_capacity_tokens,
        )


class FcfsPolicy:
    """Stock vLLM's scheduler as far as SLOs are concerned: it never turns a request away or
    ends one early, and plans each step first come, first served.

    Each step takes every decode (one token each), then prefill chunks in arrival order until
    `token_budget` (vLLM's max_num_batched_tokens) is spent: partly prefilled requests first,
    as vLLM serves its running queue before its waiting queue, then new ones while fewer than
    `max_running` requests hold KV.
    """

    def __init__(self, token_budget: int, max_running: int) -> None:
        self.token_budget = token_budget
        self.max_running = max_running
        self.requests: dict[str, SloRequest] = {}
        self.counters = PolicyCounters()
        self.last_plan_s = 0.0

    def arrive(self, now: float, request: SloRequest) -> Verdict:
        self.requests[request.request_id] = request
        name = request.slo.class_name
        self.counters.admitted[name] = self.counters.admitted.get(name, 0) + 1
        return ADMIT

    def expire(self, now: float) -> list[Expiry]:
        return []

    def finish(self, request_id: str, completed: bool) -> SloRequest | None:
        return self.requests.pop(request_id, None)

    def observe_step(self, predicted_s: float, actual_s: float, decode_only: bool = False) -> None:
        """Stock vLLM plans no step against the clock, so it learns nothing from one."""

    def plan(
        self, now: float, decoding: Sequence[SloRequest], prefilling: Sequence[SloRequest]
    ) -> StepPlan:
        started = time.perf_counter()
        plan = StepPlan()
        left = self.token_budget
        served = decoding
        if len(decoding) > left:  # only then does the order of decodes matter
            served = sorted(decoding, key=lambda r: r.arrival)[:left]
        plan.decodes.extend(r.request_id for r in served)
        left -= len(plan.decodes)
        # Requests holding KV: every decoding one and every partly prefilled one.
        seats = self.max_running - len(decoding)
        seats -= sum(1 for r in prefilling if r.computed_tokens)
        for request in sorted(prefilling, key=lambda r: (r.computed_tokens == 0, r.arrival)):
            if left <= 0:
                break
            if request.computed_tokens == 0:
                if seats <= 0:
                    break
                seats -= 1
            tokens = min(request.prefill_left, left)
            plan.prefills.append((request.request_id, tokens))
            left -= tokens
        self.last_plan_s = time.perf_counter() - started
        return plan


FCFS_BUDGETS = {"vllm-fcfs-2048": 2048, "vllm-fcfs-512": 512}
POLICIES = ("sloserve", *FCFS_BUDGETS)


def make_policy(name: str, model: StepTimeModel, limits: EngineLimits) -> Policy:
    """A fresh policy: each run starts from an empty request table and empty counters."""
    if name == "sloserve":
        # As the replica's scheduler builds it (scheduler.py), so the simulation plans alike.
        settings = settings_for(model, limits.max_step_tokens, limits.max_running)
        return SloPolicy(model, settings, limits.kv_capacity_tokens)
    if name in FCFS_BUDGETS:
        return FcfsPolicy(FCFS_BUDGETS[name], limits.max_running)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")

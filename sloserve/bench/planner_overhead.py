"""`sloserve bench planner`: how long the SLO policy takes per engine step, and per arrival.

The policy runs inside vLLM's engine loop, so every millisecond it takes is a millisecond no
token is computed. This benchmark drives the policy object the scheduler uses (SloPolicy) on a
GPU-scale load: N running requests of mixed SLO classes at various points of their streams,
and a queue of prompts waiting to prefill. After each planned step it advances the requests
as the engine would, so the plans vary as they do in service. It times `plan()` per step and
`arrive()` (admission) per new request, on this machine's CPU, and reports quantiles.

What it leaves out: vLLM's own schedule() (KV allocation and batch building) and the adapter's
walk over vLLM's request lists, which are not the policy's cost.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sloserve.replica.planner import settings_for
from sloserve.replica.policy import SloPolicy
from sloserve.replica.slo_request import SloRequest
from sloserve.slo import Budgets, RequestSlo
from sloserve.stepmodel import StepTimeModel

# SLO tiers of the methodology's scenarios, as (class, budgets) on a GPU: chat, coding,
# summarization, reasoning (thinking stage), tool calling.
TIERS: tuple[tuple[str, Budgets], ...] = (
    ("chat", Budgets(ttft_s=1.0, tpot_s=0.1)),
    ("coding", Budgets(ttft_s=0.5, tpot_s=0.03)),
    ("summarization", Budgets(ttft_s=2.0, tpot_s=0.08)),
    ("reasoning", Budgets(ttft_s=1.0, tpot_s=0.08, thinking_tpot_s=0.02, thinking_tokens=200)),
    ("tool_calling", Budgets(ttft_s=0.3, tpot_s=0.05)),
)
# Waiting prompts per running request: a queue builds as under a burst.
WAITING_FRACTION = 0.125
# Time the virtual clock advances per step: a loaded 8B engine's step.
STEP_S = 0.03


@dataclass(frozen=True)
class OverheadResult:
    running: int
    steps: int
    arrivals: int
    plan_ms: dict[str, float]  # p50, p99, max
    admission_ms: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _quantiles_ms(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples) * 1000
    return {
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "max": float(values.max()),
    }


class _Load:
    """Requests in flight at a fixed count, replaced as they finish."""

    def __init__(self, policy: SloPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.clock = 1000.0
        self._next_id = 0

    def new_request(self) -> SloRequest:
        name, budgets = self.rng.choice(TIERS)
        request_id = f"r{self._next_id}"
        self._next_id += 1
        slo = RequestSlo(request_id, name, budgets, True, self.clock)
        prompt = self.rng.randint(64, 4096)
        return SloRequest(request_id, slo, prompt_tokens=prompt, max_tokens=1024)

    def seed_running(self, count: int) -> None:
        """`count` requests part-way through decoding, on schedule."""
        for _ in range(count):
            request = self.new_request()
            request.slo = RequestSlo(
                request.request_id,
                request.slo.class_name,
                request.budgets,
                True,
                self.clock - self.rng.uniform(0.5, 20.0),
            )
            done = self.rng.randint(1, 500)
            request.computed_tokens = request.prompt_tokens + done - 1
            request.on_tokens(1, request.arrival + 0.5 * request.budgets.ttft_s)
            for _ in range(done - 1):
                request.on_tokens(1, request.arrival)  # token times only shape the deadline
            self.policy.requests[request.request_id] = request

    def seed_waiting(self, count: int) -> None:
        for _ in range(count):
            request = self.new_request()
            self.policy.requests[request.request_id] = request

    def step(self) -> float:
        """Plans and applies one step; returns the planning time in seconds."""
        decoding = [r for r in self.policy.requests.values() if r.decoding]
        prefilling = [r for r in self.policy.requests.values() if not r.decoding]
        started = time.perf_counter()
        plan = self.policy.plan(self.clock, decoding, prefilling)
        elapsed = time.perf_counter() - started
        self.clock += STEP_S
        requests = self.policy.requests
        for request_id in plan.decodes:
            request = requests[request_id]
            request.computed_tokens += 1
            request.on_tokens(1, self.clock)
        for request_id, tokens in plan.prefills:
            request = requests[request_id]
            request.computed_tokens += tokens
            if request.prefill_left == 0:
                request.on_tokens(1, self.clock)
        for request in [r for r in requests.values() if r.output_tokens >= r.max_tokens]:
            self.policy.finish(request.request_id, completed=True)
        return elapsed


def measure(
    model: StepTimeModel,
    running: int,
    steps: int,
    max_step_tokens: int = 8192,
    seed: int = 0,
) -> OverheadResult:
    """Times `steps` plans at `running` requests in flight, and one admission per step."""
    rng = random.Random(seed)
    settings = settings_for(model, max_step_tokens, max_running=max(running * 2, 256))
    policy = SloPolicy(model, settings, kv_capacity_tokens=10**9)
    load = _Load(policy, rng)
    load.seed_running(running)
    waiting = max(1, int(running * WAITING_FRACTION))
    load.seed_waiting(waiting)
    plan_s: list[float] = []
    admission_s: list[float] = []
    for _ in range(steps):
        plan_s.append(load.step())
        # Keep the load steady: arrivals replace what finished, each through admission.
        while len(policy.requests) < running + waiting:
            candidate = load.new_request()
            started = time.perf_counter()
            policy.arrive(load.clock, candidate)
            admission_s.append(time.perf_counter() - started)
            if candidate.request_id not in policy.requests:
                break  # turned away: the engine is full, as it would be
    if not admission_s:  # every request outlived the run: time arrivals at this load anyway
        for _ in range(steps):
            candidate = load.new_request()
            started = time.perf_counter()
            policy.arrive(load.clock, candidate)
            admission_s.append(time.perf_counter() - started)
            policy.requests.pop(candidate.request_id, None)
    return OverheadResult(
        running=running,
        steps=steps,
        arrivals=len(admission_s),
        plan_ms=_quantiles_ms(plan_s),
        admission_ms=_quantiles_ms(admission_s),
    )

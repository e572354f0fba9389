"""The SLO policy decides the same however its work is organised.

Admission decides the requests that arrive together against one view of the requests held,
built once (SloPolicy.arrivals), where it used to gather that view per arrival; deadlines are
derived when a request's progress changes rather than on every read. Both are optimisations:
the verdicts, the plans and the token times must not move. These tests pin that down: the
batch path against one-by-one arrivals on a few hundred requests, and a simulated run whose
per-request outcomes were recorded on the code before the optimisations (a change that means to
alter the policy's decisions updates the digest, and says why).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import replace

from sloserve.bench.types import BenchRequest, client_cap
from sloserve.replica.admission import Verdict
from sloserve.replica.planner import PlannerSettings
from sloserve.replica.policy import SloPolicy
from sloserve.replica.slo_request import SloRequest
from sloserve.simulator import SimResult, simulate
from sloserve.simulator_policies import EngineLimits
from sloserve.slo import Budgets, RequestSlo
from sloserve.stepmodel import StepTimeModel

# A roofline-shaped model of a small GPU engine, written out here so that the pinned outcomes
# depend on the policy alone (not on a shipped profile that may be refitted): a step's time is
# the larger of a compute piece and a memory piece (fixed, per token, per request, per token of
# context).
MODEL = StepTimeModel(
    pieces=[(0.006, 0.00005, 0.00002, 0.0000002), (0.010, 0.00002, 0.0, 0.0000004)]
)
LIMITS = EngineLimits(max_step_tokens=2048, max_running=128, kv_capacity_tokens=90_000)

# (class, budgets, prompt tokens, output tokens, best effort allowed): a reasoning class with a
# thinking stage, a long-prompt class that strains the KV cache, and sessions of tool calls.
CLASSES = (
    ("chat", Budgets(ttft_s=0.5, tpot_s=0.05), (50, 1500), (20, 400), True),
    ("coding", Budgets(ttft_s=0.3, tpot_s=0.03), (200, 3000), (10, 300), False),
    (
        "reasoning",
        Budgets(ttft_s=0.8, tpot_s=0.06, thinking_tpot_s=0.03, thinking_tokens=100),
        (50, 600),
        (150, 600),
        False,
    ),
    ("summarization", Budgets(ttft_s=2.0, tpot_s=0.08), (2000, 6000), (50, 200), True),
    ("tool-calling", Budgets(ttft_s=0.25, tpot_s=0.04), (300, 1200), (5, 60), False),
)
SESSION_ROUNDS = 3


def workload(count: int, rate: float, seed: int) -> list[BenchRequest]:
    """Poisson arrivals of the classes above; a tool-calling request opens a session whose
    later rounds follow it (each sent when the one before completes)."""
    rng = random.Random(seed)
    requests: list[BenchRequest] = []
    t = 0.0
    while len(requests) < count:
        t += rng.expovariate(rate)
        name, budgets, prompt, output, best_effort = rng.choice(CLASSES)
        rounds = SESSION_ROUNDS if name == "tool-calling" else 1
        session = len(requests) if rounds > 1 else None
        for round_ in range(rounds):
            index = len(requests)
            requests.append(
                BenchRequest(
                    index=index, slo_class=name, budgets=budgets,
                    prompt_tokens=rng.randint(*prompt), output_tokens=rng.randint(*output),
                    arrival_s=t, session=session, round=round_,
                    after=index - 1 if round_ else None, delay_s=0.2 if round_ else 0.0,
                    allow_best_effort=best_effort, max_tokens=client_cap(output[1]),
                )
            )  # fmt: skip
    return requests


def outcome_digest(result: SimResult) -> str:
    """Every request's outcome, token times to the last bit, and the policy's counters."""
    digest = hashlib.sha256()
    for record in result.records:
        row = [
            record.request.index, record.rejected, record.reject_reason, record.best_effort,
            record.completed, record.error, [t.hex() for t in record.token_times],
        ]  # fmt: skip
        digest.update(json.dumps(row).encode())
    digest.update(json.dumps(result.stats.counters, sort_keys=True).encode())
    return digest.hexdigest()[:16]


# (seed, requests a second, KV tokens): the outcomes of 400 requests, recorded before admission
# decided arrivals in batches and requests kept their deadlines. The first run admits most
# requests; the second, in a small KV cache, turns away or demotes half, preempts best effort
# and expires an admitted request. The second was recorded again when admission stopped
# counting a class with no known lengths at its max_tokens (its memory verdicts changed), on
# the code before the optimisations with that change alone. Both were recorded again when the
# planner began holding decodes to the client's mean-TPOT line from the first token as well as
# the judge's (SloRequest.planning_deadline): plans and admission verdicts changed (the first
# run now admits 362 requests where it admitted 326).
PINNED = {
    (0, 5.0, 90_000): "bf8a8fcf9522b612",
    (2, 9.0, 30_000): "44259eb1bf9e65d8",
}


def test_simulated_outcomes_are_those_recorded_before_the_optimisations() -> None:
    for (seed, rate, kv_tokens), pinned in PINNED.items():
        limits = replace(LIMITS, kv_capacity_tokens=kv_tokens)
        result = simulate(workload(400, rate, seed), MODEL, limits, "sloserve")
        assert outcome_digest(result) == pinned, (seed, rate, kv_tokens, result.stats.counters)


# -- admission: the batch path against one arrival at a time --------------------------------


def _held_state(rng: random.Random, policy: SloPolicy, now: float, count: int) -> None:
    """`count` requests the policy already holds at `now`: some waiting for their first token,
    some decoding at various points of their output, a few demoted to best effort."""
    for i in range(count):
        name, budgets, prompt, output, best_effort = rng.choice(CLASSES)
        arrival = now - rng.uniform(0.0, 0.3)
        slo = RequestSlo(f"h{i}", name, budgets, best_effort, arrival)
        request = SloRequest(f"h{i}", slo, rng.randint(*prompt), client_cap(output[1]))
        if rng.random() < 0.7:  # decoding, most of them ahead of their deadline line
            done = rng.randint(1, output[1])
            request.computed_tokens = request.prompt_tokens + done - 1
            first = now - done * budgets.tpot_s * rng.uniform(0.3, 1.1)
            request.slo = RequestSlo(f"h{i}", name, budgets, best_effort, first - 0.2)
            request.on_tokens(1, first)
            request.on_tokens(done - 1, now - rng.uniform(0.0, 0.05))
            if budgets.thinking_tpot_s is not None and rng.random() < 0.5:
                request.end_thinking()
        elif rng.random() < 0.5:  # part-way through its prefill
            request.computed_tokens = rng.randint(0, request.prompt_tokens - 1)
        policy.requests[request.request_id] = request
    # Output lengths learned for some groups, and a measured forecast error for one: the
    # memory bound and the allowances then differ from their defaults.
    for _ in range(40):
        policy.lengths.observe("chat", rng.randint(20, 200))
        policy.lengths.observe("reasoning", rng.randint(150, 400))
    for _ in range(30):
        policy.admission.errors.observe("coding", now - 1.0, rng.uniform(-0.1, 0.3))


def _arrivals(rng: random.Random, now: float, count: int) -> list[SloRequest]:
    requests = []
    for i in range(count):
        name, budgets, prompt, output, best_effort = rng.choice(CLASSES)
        slo = RequestSlo(f"a{i}", name, budgets, best_effort, now - rng.uniform(0.0, 0.1))
        request = SloRequest(f"a{i}", slo, rng.randint(*prompt), client_cap(output[1]))
        if rng.random() < 0.05:  # resumed, with tokens out already
            request.on_tokens(rng.randint(1, 20), now - 0.1)
        requests.append(request)
    return requests


def _verdict_row(verdict: Verdict) -> tuple[str, str, str]:
    mode = verdict.mode.value if verdict.mode is not None else "rejected"
    return mode, verdict.reason.value, verdict.check


# (seed, requests held, requests arriving together, KV tokens): a small KV cache, a decode
# batch near the most it can keep on time, a light load that the arrivals fill.
CASES = ((1, 30, 150, 50_000), (1, 60, 150, 400_000), (0, 10, 200, 400_000))


def test_a_batch_of_arrivals_gets_the_verdicts_of_one_arrival_at_a_time() -> None:
    settings = PlannerSettings(max_step_tokens=2048, max_running=512, delivery_s=0.003)
    checks: set[str] = set()
    for seed, held, arriving, kv_tokens in CASES:
        rng = random.Random(seed)
        now = 100.0
        batched = SloPolicy(MODEL, settings, kv_tokens)
        _held_state(rng, batched, now, held)
        one_by_one = copy.deepcopy(batched)
        arrivals = _arrivals(rng, now, arriving)
        twins = copy.deepcopy(arrivals)

        batch = batched.arrivals(now)
        together = [_verdict_row(batch.arrive(r)) for r in arrivals]
        alone = [_verdict_row(one_by_one.arrive(now, r)) for r in twins]

        assert together == alone
        assert list(batched.requests) == list(one_by_one.requests)
        assert batched.counters == one_by_one.counters
        assert batched.limits.max_step_s == one_by_one.limits.max_step_s
        assert batched.admission._forecasts == one_by_one.admission._forecasts
        checks |= {check for _, _, check in together}
    # The arrivals met every kind of check, so each path was compared.
    assert checks >= {"", "memory", "tpot", "queue", "late", "others"}, checks

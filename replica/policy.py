"""The SLO policy of one engine: the request table, admission, expiry and step planning.

Both the vLLM scheduler (scheduler.py) and the simulator (sloserve/simulator.py) drive this one
object, so what the simulator predicts is what the engine does. It knows nothing of vLLM: the
caller reports arrivals, progress and departures, and applies the plans.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from sloserve.replica.admission import (
    AdmissionController,
    AdmittedLoad,
    OutputLengths,
    Verdict,
)
from sloserve.replica.planner import LiveLimits, PlannerSettings, StepPlan, StepPlanner
from sloserve.replica.slo_request import Mode, Reason, SloRequest
from sloserve.slo import TOLERANCE
from sloserve.stepmodel import StepTimeModel

# Steps last at most BEARABLE_STRETCH x the wait the tightest of the last RECENT_ARRIVALS
# admitted requests could have absorbed on arrival (see SloPolicy._bearable_wait_s).
RECENT_ARRIVALS = 200
# A request arrives at a random point of a step, so it waits on average half the step: with
# steps up to 1.5 x the wait it can bear, one arriving during the longest step is late only if
# it lands in that step's first third. A cap of exactly the bearable wait protects every
# arrival and costs the long prompts more capacity than the few late arrivals do; twice it
# loses the tight classes (simulated on the A100 profile, mixed scenario: docs/scheduler.md).
BEARABLE_STRETCH = 1.5
# The loop overhead is a moving average over about the last 50 busy steps; one sample counts
# for at most 50 ms (a stray pause should not stall planning).
OVERHEAD_SMOOTHING = 0.02
OVERHEAD_SAMPLE_CAP_S = 0.05
# Once LIVE_RESIDUAL_WINDOW busy steps have been seen, the safety factor is the
# LIVE_RESIDUAL_QUANTILE of their actual / predicted time (at least MIN_SAFETY_FACTOR).
LIVE_RESIDUAL_WINDOW = 500
LIVE_RESIDUAL_QUANTILE = 0.98
MIN_SAFETY_FACTOR = 1.05


@dataclass
class PolicyCounters:
    """What the policy decided, for metrics: keyed by (class, reason)."""

    admitted: dict[str, int] = field(default_factory=dict)
    best_effort: dict[tuple[str, str], int] = field(default_factory=dict)
    rejected: dict[tuple[str, str], int] = field(default_factory=dict)
    expired: dict[tuple[str, str], int] = field(default_factory=dict)  # (class, action)

    def count(self, table: dict[tuple[str, str], int], key: tuple[str, str]) -> None:
        table[key] = table.get(key, 0) + 1


@dataclass(frozen=True)
class Expiry:
    request: SloRequest
    abort: bool  # True: the client asked for strict SLOs, so the request ends; else demoted


class SloPolicy:
    def __init__(
        self, model: StepTimeModel, settings: PlannerSettings, kv_capacity_tokens: int
    ) -> None:
        self.model = model
        self.settings = settings
        self.limits = LiveLimits(safety_factor=settings.safety_factor)
        self._ratios: deque[float] = deque(maxlen=LIVE_RESIDUAL_WINDOW)
        self.planner = StepPlanner(model, settings, self.limits)
        self.lengths = OutputLengths()
        self.admission = AdmissionController(
            model, settings, kv_capacity_tokens, self.lengths, self.limits
        )
        self.requests: dict[str, SloRequest] = {}
        self.counters = PolicyCounters()
        self.last_plan_s = 0.0  # how long the last plan took to make
        self._recent_waits_s: deque[float] = deque(maxlen=RECENT_ARRIVALS)
        self._steps_seen = 0

    # -- arrivals and departures -----------------------------------------------------------

    def arrivals(self, now: float) -> Arrivals:
        """A batch for the requests arriving at `now`, decided together (see Arrivals)."""
        return Arrivals(self, now)

    def arrive(self, now: float, request: SloRequest) -> Verdict:
        """Decides the request's admission; a request that is not rejected is tracked."""
        return self.arrivals(now).arrive(request)

    def _decide(self, load: AdmittedLoad, request: SloRequest) -> Verdict:
        # Admission judges the candidate as the engine would serve it once admitted: with
        # the step cap its TTFT brings. Only admitted requests keep the cap they brought.
        # The full budget, not what a retried request has left (already_waited): the cap is
        # for the requests still to come, and those arrive with the full budget of the class.
        uncapped = self.limits.max_step_s
        bearable = self._bearable_wait_s(request)
        self.limits.max_step_s = min(uncapped, bearable)
        verdict = self.admission.decide_in(load, request)
        name = request.slo.class_name
        if verdict.rejected or verdict.mode is Mode.BEST_EFFORT:
            self.limits.max_step_s = uncapped
        else:
            self._remember_wait(bearable)
        if verdict.rejected:
            self.counters.count(self.counters.rejected, (name, verdict.reason.value))
            return verdict
        if verdict.mode is Mode.BEST_EFFORT:
            request.demote(verdict.reason)
            self.counters.count(self.counters.best_effort, (name, verdict.reason.value))
        else:
            self.counters.admitted[name] = self.counters.admitted.get(name, 0) + 1
        self.requests[request.request_id] = request
        return verdict

    def _bearable_wait_s(self, request: SloRequest) -> float:
        """How long the request could wait for a step to end on arrival and still have its
        first token in time: its TTFT budget less its prompt's zero-load prefill.

        Steps last at most the least of these among recently admitted requests (the step
        cap; the planner stretches it for a prompt that needs longer steps itself): a
        request that arrives while a step runs waits for that step to end before any of its
        prompt is computed, and long steps would spend the TTFT budgets of requests that have
        not arrived yet. Requests the policy does not commit to (best effort, rejected) do not
        shorten the steps of those it does.
        """
        prefill = self.model.prefill_s(request.prompt_tokens, self.settings.max_step_tokens)
        return max(0.0, request.budgets.ttft_s - prefill) * BEARABLE_STRETCH

    def _remember_wait(self, bearable_s: float) -> None:
        if not math.isfinite(bearable_s):
            return
        self._recent_waits_s.append(bearable_s)
        self.limits.max_step_s = min(self._recent_waits_s)

    def observe_step(self, predicted_s: float, actual_s: float, decode_only: bool = False) -> None:
        """Learns the engine loop's time per step beyond the model's prediction, from steps
        that ran back to back (`actual_s`: from one step's start to the next one's).

        Steps of decodes alone also teach `decode_line`: the model is fitted mostly on
        prefill-heavy steps, and how fast a decode batch really runs decides how many
        decodes can keep a TPOT.
        """
        limits = self.limits
        if decode_only and predicted_s > 0:
            limits.decode_line.observe(predicted_s, min(actual_s, 3.0 * predicted_s))
        if predicted_s > 0:
            # How far off the full prediction (with the overhead learned so far) was: the
            # safety factor covers LIVE_RESIDUAL_QUANTILE of these, once there are enough.
            self._ratios.append(actual_s / (predicted_s + limits.overhead_s))
            if len(self._ratios) == LIVE_RESIDUAL_WINDOW and self._steps_seen % 50 == 0:
                ordered = sorted(self._ratios)
                quantile = ordered[int(LIVE_RESIDUAL_QUANTILE * (len(ordered) - 1))]
                limits.safety_factor = max(MIN_SAFETY_FACTOR, quantile)
        self._steps_seen += 1
        sample = min(max(actual_s - predicted_s, -0.5 * predicted_s), OVERHEAD_SAMPLE_CAP_S)
        limits.overhead_s += OVERHEAD_SMOOTHING * (sample - limits.overhead_s)

    def finish(self, request_id: str, completed: bool) -> SloRequest | None:
        """Forgets a request; a completed one (its model or its client ended its output)
        teaches its length group's output length."""
        request = self.requests.pop(request_id, None)
        if request is not None and request.first_token_at is not None:
            self.admission.observe_first_token(request_id, request.first_token_at)
        self.admission.forget(request_id)
        if request is not None and completed:
            self.lengths.observe(request.slo.length_group, request.output_tokens)
        return request

    def _learn_forecast_errors(self) -> None:
        """Teaches admission how far off its forecasts were: each admitted request's first
        token against the time forecast for it."""
        for request_id in self.admission.waiting_for_first_token():
            request = self.requests.get(request_id)
            if request is None or not request.admitted:
                self.admission.forget(request_id)
            elif request.first_token_at is not None:
                self.admission.observe_first_token(request_id, request.first_token_at)

    # -- expiry ----------------------------------------------------------------------------

    def expire(self, now: float) -> list[Expiry]:
        """Admitted requests that can no longer meet their SLO, even served next on an idle
        engine: demoted to best effort (or to be aborted, for strict clients)."""
        self._learn_forecast_errors()
        expired: list[Expiry] = []
        idle_step = self.model.idle_decode_s() + self.limits.overhead_s
        decoded_by = now + idle_step  # a decode's token, served next on an idle engine
        max_step_tokens, delivery_s = self.settings.max_step_tokens, self.settings.delivery_s
        for request in self.requests.values():
            if not request.admitted:
                continue
            earliest = decoded_by
            prefill_left = request.prefill_left
            if prefill_left:  # waiting, or recomputing after a preemption
                prefill = self.model.prefill_s(prefill_left, max_step_tokens)
                earliest = now + max(idle_step, prefill)
            if earliest <= request.next_deadline(TOLERANCE, delivery_s):
                continue
            if request.output_tokens == 0:
                # Its first token misses: it would come at `earliest` at the soonest.
                self.admission.observe_first_token(request.request_id, earliest)
            strict = request.slo.strict
            expired.append(Expiry(request, abort=strict))
            action = "aborted" if strict else "demoted"
            self.counters.count(self.counters.expired, (request.slo.class_name, action))
            request.demote(Reason.EXPIRED)
        return expired

    # -- planning --------------------------------------------------------------------------

    def plan(
        self, now: float, decoding: Sequence[SloRequest], prefilling: Sequence[SloRequest]
    ) -> StepPlan:
        started = time.perf_counter()
        plan = self.planner.plan(now, decoding, prefilling)
        self.last_plan_s = time.perf_counter() - started
        return plan

    @staticmethod
    def queue_key(request: SloRequest) -> tuple[int, float]:
        """Order of the waiting queue: admitted requests by their next deadline (EDF), then
        best effort by arrival."""
        if request.admitted:
            return (0, request.next_deadline())
        return (1, request.arrival)


class Arrivals:
    """Requests that arrive at one moment (`now`), decided one by one in arrival order.

    Admission weighs each against the admitted requests held (AdmittedLoad: their decode
    batch, their queue, their KV). The load is gathered at the first arrival and each request
    admitted joins it, so k requests arriving together cost one pass over the n held, where
    deciding each on its own cost k. The verdicts are those of deciding each on its own, with
    the ones before it in the table: so nothing else may change the policy's requests while a
    batch is in use (a step planned, an expiry, a departure, progress). The engine adapter
    keeps one for the requests that arrive between two steps; the simulator one per instant.
    """

    def __init__(self, policy: SloPolicy, now: float) -> None:
        self.now = now
        self._policy = policy
        self._load: AdmittedLoad | None = None

    def arrive(self, request: SloRequest) -> Verdict:
        """Decides the request's admission; a request that is not rejected is tracked."""
        policy = self._policy
        if self._load is None:
            held = [r for r in policy.requests.values() if r.admitted and r is not request]
            self._load = policy.admission.load(self.now, held)
        return policy._decide(self._load, request)

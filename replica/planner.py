"""Where each engine step's tokens are planned: how many, and for which requests.

One step serves every request whose next decode token is due, and fills the rest of the step
with prefill chunks in order of TTFT deadline, then best-effort work. How many tokens the step
takes comes from the step-time model: the step must end before the earliest due decode token
(its deadline minus a safety margin), so a step is long when decodes are ahead of schedule and
short when they are not. With no admitted decode waiting on it, a step runs at full size
(work-conserving).

Pure policy over SloRequest views: KV-cache bookkeeping stays with vLLM, and the simulator
runs this same code against a virtual engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from sloserve.replica.live_fit import LiveLine
from sloserve.replica.slo_request import SloRequest
from sloserve.stepmodel import StepShape, StepTimeModel


@dataclass(frozen=True)
class PlannerSettings:
    max_step_tokens: int  # the engine's max_num_batched_tokens
    max_running: int  # the engine's max_num_seqs
    # A step's predicted time is multiplied by this before it is held against a deadline, at
    # first: the step-time model's residual quantile (SAFETY_QUANTILE of the profile's).
    safety_factor: float = 1.1
    # From a step's end to the token reaching the client: output processing, detokenizing and
    # the RPC. Subtracted from every deadline.
    delivery_s: float = 0.003
    # A decode ahead of schedule by more than this many of its own TPOTs (beyond the step
    # being planned) sits the step out when prefill work is waiting, leaving room for it.
    skip_ahead_tpots: float = 2.0


# The smallest prefill chunk of a step that must make progress (one KV block).
MIN_PROGRESS_TOKENS = 16

# Which of the profile's residual quantiles the safety factor covers: a step may overrun its
# prediction by this much and still land before the deadline it was planned against.
SAFETY_QUANTILE = "p95"


def settings_for(model: StepTimeModel, max_step_tokens: int, max_running: int) -> PlannerSettings:
    """The planner settings of an engine with these limits, planning with `model`."""
    return PlannerSettings(
        max_step_tokens=max_step_tokens,
        max_running=max_running,
        safety_factor=model.safety_factor(SAFETY_QUANTILE),
    )


@dataclass
class LiveLimits:
    """What the policy learns while it serves, shared by the planner and admission."""

    # Longest a step may last: a request arriving while a step runs waits for it to end, so
    # steps stay well inside the TTFT budgets the policy sees (SloPolicy learns it).
    max_step_s: float = math.inf
    # Time each engine step takes beyond the model's prediction: the engine loop's own work
    # (scheduling, output processing, IPC) plus any bias of the model, measured live.
    overhead_s: float = 0.0
    # Actual time of steps of decodes alone against their predicted time, loop overhead
    # included (live; see live_fit.py).
    decode_line: LiveLine = field(default_factory=LiveLine)
    # What a step's predicted time is multiplied by: the settings' value until the live
    # residuals of enough steps are known (SloPolicy.observe_step).
    safety_factor: float = 1.1


@dataclass
class StepPlan:
    """What one step computes. Lists are in the order the engine should serve them."""

    decodes: list[str] = field(default_factory=list)  # one token each
    prefills: list[tuple[str, int]] = field(default_factory=list)  # (request, tokens)
    skipped: list[str] = field(default_factory=list)  # decodes that sit this step out
    time_limit_s: float = math.inf  # when the step must end, from now; inf: no deadline due
    predicted_s: float = 0.0

    @property
    def tokens(self) -> int:
        return len(self.decodes) + sum(tokens for _, tokens in self.prefills)

    @property
    def scheduled(self) -> list[str]:
        return self.decodes + [request_id for request_id, _ in self.prefills]


def stretched_cap_s(cap_s: float, tokens: int, time_left_s: float, c0: float, c1: float) -> float:
    """The step cap stretched as far as a prefill of `tokens` needs to end by `time_left_s`.

    The cap (LiveLimits.max_step_s) keeps steps short for requests that may arrive while a
    step runs. Chunked in steps of at most the cap, a long prompt can take longer than its
    own TTFT allows: every step pays the fixed cost `c0` (the step without the chunk, loop
    overhead included) and a prompt token costs `c1`, so k steps take k * c0 + tokens * c1.
    Then the prompt's steps may run longer, but no longer than it needs: the fewest steps of
    equal size that still end in time. A cap that dooms a request in hand to spare requests
    that may not come costs more than it saves. A prompt that cannot end in time even in one
    step is late whatever happens, and keeps the cap.
    """
    if math.isinf(cap_s) or tokens <= 0 or c1 <= 0:
        return cap_s
    per_step = (cap_s - c0) / c1
    if per_step >= 1 and math.ceil(tokens / per_step) * c0 + tokens * c1 <= time_left_s:
        return cap_s  # the cap leaves it in time
    most_steps = math.floor((time_left_s - tokens * c1) / c0 + 1e-9) if c0 > 0 else 1
    if most_steps < 1:
        return cap_s
    return max(cap_s, c0 + math.ceil(tokens / most_steps) * c1)


class StepPlanner:
    def __init__(
        self, model: StepTimeModel, settings: PlannerSettings, limits: LiveLimits | None = None
    ) -> None:
        self.model = model
        self.settings = settings
        self.limits = limits or LiveLimits(safety_factor=settings.safety_factor)
        # The step cap of the step being planned (_step_cap_s).
        self._cap_s = self.limits.max_step_s

    def slack_s(self, request: SloRequest, now: float) -> float:
        """Time left until the request's next token is due at the client (as planned for)."""
        return request.planning_deadline(self.settings.delivery_s) - now

    def plan(
        self, now: float, decoding: Sequence[SloRequest], prefilling: Sequence[SloRequest]
    ) -> StepPlan:
        """Plans one step starting at `now`.

        `decoding`: requests whose next step is a decode token; `prefilling`: requests with
        prompt tokens left (waiting or part-way through a chunked prefill).
        """
        s = self.settings
        plan = StepPlan()
        admitted = [r for r in decoding if r.admitted]
        slack = {r.request_id: self.slack_s(r, now) for r in admitted}
        limit = min(slack.values(), default=math.inf)
        plan.time_limit_s = limit

        prefill_admitted = sorted(
            (r for r in prefilling if r.admitted), key=lambda r: r.ttft_deadline
        )
        prefill_best_effort = sorted(
            (r for r in prefilling if not r.admitted), key=lambda r: r.arrival
        )
        # Decodes far ahead of schedule leave room for prefill, when there is prefill to do.
        for request in sorted(admitted, key=lambda r: slack[r.request_id]):
            room = slack[request.request_id] - max(limit, 0.0) * self.limits.safety_factor
            if prefill_admitted and room > s.skip_ahead_tpots * request.next_tpot_s:
                plan.skipped.append(request.request_id)
            else:
                plan.decodes.append(request.request_id)
        best_effort_decodes = [r for r in decoding if not r.admitted]

        seats = s.max_running - len(plan.decodes)
        decode_ids = set(plan.decodes)
        context = sum(r.context_tokens for r in admitted if r.request_id in decode_ids)
        first_prefill = prefill_admitted[0] if prefill_admitted else None
        requests = len(plan.decodes) + (1 if first_prefill else 0)
        context += first_prefill.context_tokens if first_prefill else 0
        self._cap_s = self._step_cap_s(now, first_prefill, len(plan.decodes), context)
        budget = self._token_budget(limit, requests, context)
        used = len(plan.decodes)
        rode_along = False
        for request in prefill_admitted:
            if seats <= 0:
                break
            left = budget - used
            need = request.prefill_left
            if need > left and not request.split_prefill:
                # A prompt that must run whole waits for a step with room for it, unless it
                # is no longer than the smallest step of progress: then one such prompt per
                # step rides along over the budget, so decodes never starve it.
                if rode_along or need > max(left, 0) + MIN_PROGRESS_TOKENS:
                    continue
                rode_along, left = True, need
            if left <= 0:
                break
            if need <= left:
                # The chunk completes the prefill, so the step also carries the request's
                # first token: the step must end before that token is due. (When even that
                # cannot be done, the request is late whatever happens; finishing it now is
                # still its earliest.)
                tighter = min(limit, self.slack_s(request, now))
                tighter_budget = self._token_budget(tighter, requests, context)
                if used + need <= tighter_budget:
                    limit, budget = tighter, tighter_budget
            tokens = min(need, left)
            plan.prefills.append((request.request_id, tokens))
            used += tokens
            seats -= 1
        plan.time_limit_s = limit
        left = budget - used
        # Best effort runs in what the SLO work leaves of the step: in its tokens, and in its
        # time, at each request's full cost. A decode costs its context (attention over its
        # KV cache) far more than its one token: on the CPU bench model a decode over 1,000
        # tokens of context costs as much as 10 prompt tokens, so best-effort decodes counted
        # as tokens alone could overrun the step's limit by several times.
        has_best_effort = bool(best_effort_decodes or prefill_best_effort)
        spare = _StepRoom(
            self.model,
            self._compute_s(limit) if has_best_effort else math.inf,  # (skips the shape's cost)
            self._shape(plan, decoding, prefilling) if has_best_effort else StepShape(0, 0, 0),
        )
        for request in best_effort_decodes:
            if left <= 0 or seats <= 0 or not spare.take(1, request.context_tokens + 1):
                plan.skipped.append(request.request_id)
                continue
            plan.decodes.append(request.request_id)
            left -= 1
            seats -= 1
        for request in prefill_best_effort:
            if left <= 0 or seats <= 0:
                break
            fits = spare.prompt_tokens(request.context_tokens, min(request.prefill_left, left))
            if request.prefill_left > fits and not request.split_prefill:
                continue
            if fits <= 0:
                break
            spare.take(fits, request.context_tokens + fits)
            plan.prefills.append((request.request_id, fits))
            left -= fits
            seats -= 1
        if plan.tokens == 0:
            self._ensure_progress(
                plan, [*prefill_admitted, *prefill_best_effort], best_effort_decodes
            )
        plan.predicted_s = self.predict(plan, decoding, prefilling)
        return plan

    def _ensure_progress(
        self, plan: StepPlan, prefilling: Sequence[SloRequest], decoding: Sequence[SloRequest]
    ) -> None:
        """Never plans an empty step while work waits: the engine would spin in place.

        A budget can round to zero tokens (a step cap or slack shorter than the smallest
        step); the work then still moves, by the smallest step there is.
        """
        if prefilling:
            first = prefilling[0]
            smallest = MIN_PROGRESS_TOKENS if first.split_prefill else first.prefill_left
            tokens = min(first.prefill_left, smallest, self.settings.max_step_tokens)
            plan.prefills.append((first.request_id, tokens))
        elif decoding:
            request_id = decoding[0].request_id
            plan.decodes.append(request_id)
            if request_id in plan.skipped:
                plan.skipped.remove(request_id)

    def _step_cap_s(self, now: float, head: SloRequest | None, decodes: int, context: int) -> float:
        """The step cap for this step: LiveLimits.max_step_s, stretched for the prefill with
        the earliest deadline if it needs longer steps to make its first token in time
        (stretched_cap_s)."""
        cap = self.limits.max_step_s
        if head is None or math.isinf(cap) or not head.split_prefill:
            return cap
        sf = self.limits.safety_factor
        empty = self.model.predict(StepShape(decodes, decodes + 1, context))
        chunk = min(head.prefill_left, self.settings.max_step_tokens)
        full = self.model.predict(StepShape(decodes + chunk, decodes + 1, context + chunk))
        c0 = empty * sf + self.limits.overhead_s
        c1 = max(0.0, full - empty) / chunk * sf
        return stretched_cap_s(cap, head.prefill_left, self.slack_s(head, now), c0, c1)

    def _compute_s(self, limit_s: float) -> float:
        """Model time a step may take and still end within `limit_s`, with the margin and the
        loop overhead, and within the step cap (inf: no limit)."""
        limit_s = min(limit_s, self._cap_s)
        if math.isinf(limit_s):
            return math.inf
        return (limit_s - self.limits.overhead_s) / self.limits.safety_factor

    def _token_budget(self, limit_s: float, requests: int, context: int) -> int:
        """Most tokens a step may take and still end within `limit_s` (with the margin and
        the loop overhead), and within the step cap."""
        cap = self.settings.max_step_tokens
        compute_s = self._compute_s(limit_s)
        if math.isinf(compute_s):
            return cap
        return self.model.tokens_within(compute_s, requests, context, cap=cap)

    @staticmethod
    def _shape(
        plan: StepPlan, decoding: Sequence[SloRequest], prefilling: Sequence[SloRequest]
    ) -> StepShape:
        by_id = {r.request_id: r for r in (*decoding, *prefilling)}
        context = sum(by_id[i].context_tokens + 1 for i in plan.decodes)
        context += sum(by_id[i].context_tokens + n for i, n in plan.prefills)
        return StepShape(tokens=plan.tokens, requests=len(plan.scheduled), context_tokens=context)

    def predict(
        self, plan: StepPlan, decoding: Sequence[SloRequest], prefilling: Sequence[SloRequest]
    ) -> float:
        shape = self._shape(plan, decoding, prefilling)
        return self.model.predict(shape) + self.limits.overhead_s if plan.tokens else 0.0


class _StepRoom:
    """Model time a step has left for more work, piece by piece of the step-time model (a
    step's time is the largest of its linear pieces, so work fits when it fits every piece)."""

    def __init__(self, model: StepTimeModel, compute_s: float, planned: StepShape) -> None:
        self._pieces = model.pieces
        x = planned.features()
        self._room: list[float] | None = (
            None
            if math.isinf(compute_s)
            else [compute_s - sum(c * v for c, v in zip(p, x, strict=True)) for p in self._pieces]
        )

    def take(self, tokens: int, context: int) -> bool:
        """Adds one more request computing `tokens` tokens over `context` tokens of context,
        if it fits; whether it did."""
        if self._room is None:
            return True
        costs = [b * tokens + c + d * context for _, b, c, d in self._pieces]
        if any(cost > room for cost, room in zip(costs, self._room, strict=True)):
            return False
        self._room = [room - cost for cost, room in zip(costs, self._room, strict=True)]
        return True

    def prompt_tokens(self, computed: int, most: int) -> int:
        """Most prompt tokens (up to `most`) one more request, `computed` tokens in, fits."""
        if self._room is None:
            return most
        fits = most
        for (_, b, c, d), room in zip(self._pieces, self._room, strict=True):
            per_token = b + d
            spare = room - c - d * computed
            if spare < 0:
                return 0
            if per_token > 0:
                fits = min(fits, math.floor(spare / per_token))
        return max(0, fits)

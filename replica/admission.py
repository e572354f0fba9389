"""Where admission is decided: admit a request with its SLO, serve it as best effort, or reject.

Decided once, when the request reaches the engine's scheduler (the requests that arrive
together in arrival order, against one view of the load held: AdmittedLoad), by simulating
forward:
- Compute. The admitted requests still prefilling and the candidate are prefilled in order of
  TTFT deadline, as the planner does. While they do, every decoding request rides in each step
  and steps last the tightest TPOT among them (the planner's steady state once decodes have
  spent their slack; it can only do better). Each request's first token must land before its
  TTFT deadline, and the final decode batch must fit in a step of the tightest TPOT. The
  candidate is turned away if it would miss, or if an admitted request that would have met its
  deadline without it would miss with it. "Miss" is held to the forecast's own error, measured
  on the first tokens of the requests it admitted (ForecastErrors, allowance_s()).
- Memory. The KV cache must hold every admitted request's prompt and its expected output
  (max_tokens, or its class's learned length when that is smaller). Best-effort requests do
  not count: they are preempted first to make room.

Output lengths are not known at arrival; memory uses the per-class length estimate, and a
decoding request is taken to run until it has produced that many tokens. Admission works with
expected step times and the judge's deadlines (1.05 x the budgets): it turns away only what
cannot be served in time. A rejection is a miss too, so a cautious admission loses requests the
engine would have served; the planner's safety factor and reserve protect what is admitted.
"""

from __future__ import annotations

import bisect
import heapq
import math
import operator
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sloserve.replica.planner import LiveLimits, PlannerSettings, stretched_cap_s
from sloserve.replica.slo_request import CLIENT_RESERVE_TPOTS, Mode, Reason, SloRequest
from sloserve.slo import TOLERANCE
from sloserve.stepmodel import StepShape, StepTimeModel

# Forecast lateness tolerated, as a fraction of the request's TTFT budget, while the
# forecast's error is unknown (see AdmissionController.allowance_s).
QUEUE_LATE_ALLOWANCE = 0.25
# The forecast's error, measured: how much later than forecast an admitted request's first
# token came, in its TTFT budgets. Admission holds a forecast to the FORECAST_ERROR_QUANTILE of
# the last FORECAST_ERROR_WINDOW errors, none older than FORECAST_ERROR_MAX_AGE_S, once
# FORECAST_ERROR_MIN_SAMPLES are known. The median: a candidate is admitted while its first
# token is more likely on time than not. A rejection is a sure miss, so a higher quantile
# turns away requests that would mostly have made it (on the A100 profile's mixed scenario,
# the 90th percentile cost a fifth of the capacity and kept no admitted request on time that
# the median lost: docs/scheduler.md).
FORECAST_ERROR_QUANTILE = 0.5
FORECAST_ERROR_WINDOW = 200
FORECAST_ERROR_MIN_SAMPLES = 20
FORECAST_ERROR_MAX_AGE_S = 30.0


@dataclass(frozen=True)
class Verdict:
    mode: Mode | None  # None: rejected
    reason: Reason = Reason.NONE
    # Which check decided against the request, for traces: "memory", "hopeless" (late even
    # served first), "tpot" (the decode batch cannot keep it), "queue" (the queue ahead makes
    # it too late), "late" (too late beside the decode batch alone, the forecast's measured
    # error counted), "others" (it would make an admitted request late).
    check: str = ""

    @property
    def rejected(self) -> bool:
        return self.mode is None


ADMIT = Verdict(Mode.ADMITTED)


# OutputLengths' key for the lengths of every group together (no class or budget shape has
# this name: length groups are class names or budget shapes).
ANY_GROUP = "\x00any"


class OutputLengths:
    """Output lengths of finished requests per length group (`RequestSlo.length_group`: a
    class, or one shape of explicit budgets), for the KV-memory bound and the decode horizon.

    Keeps the last `window` lengths per group and answers a high quantile, so a request is
    expected to need as much KV, and as many decode steps, as most of its group did. The
    quantile is kept between changes to the window: admission asks for it for every request
    it holds.
    """

    def __init__(self, window: int = 200, quantile: float = 0.9, min_samples: int = 20) -> None:
        self._window = window
        self._quantile = quantile
        self._min_samples = min_samples
        self._by_group: dict[str, deque[int]] = {}
        # Per group, and the last `window` of every group together under ANY_GROUP.
        self._sorted: dict[str, list[int]] = {}
        self._learned: dict[str, int] = {}  # the quantile, once min_samples are known

    def observe(self, group: str, tokens: int) -> None:
        self._observe(group, tokens)
        self._observe(ANY_GROUP, tokens)

    def _observe(self, group: str, tokens: int) -> None:
        recent = self._by_group.setdefault(group, deque(maxlen=self._window))
        ordered = self._sorted.setdefault(group, [])
        if len(recent) == self._window:
            ordered.pop(bisect.bisect_left(ordered, recent[0]))
        recent.append(tokens)
        bisect.insort(ordered, tokens)
        if len(ordered) >= self._min_samples:
            index = min(len(ordered) - 1, math.ceil(self._quantile * len(ordered)) - 1)
            self._learned[group] = ordered[index]

    def known(self, group: str) -> bool:
        """Whether enough of the group's lengths are known to answer for it."""
        return group in self._learned

    def expected(self, group: str, max_tokens: int) -> int:
        """The group's high quantile, at most `max_tokens`; `max_tokens` while the group's
        lengths are not known."""
        learned = self._learned.get(group)
        return max_tokens if learned is None else min(max_tokens, learned)

    def expected_of_any(self, max_tokens: int) -> int:
        """The high quantile of every group's recent lengths together, at most `max_tokens`."""
        return self.expected(ANY_GROUP, max_tokens)


class ForecastErrors:
    """How far off the admission forecast was, measured on the requests it admitted.

    Each sample is a first token's actual time less the time forecast for it, in the
    request's TTFT budgets: 0 on time to the forecast, 0.5 half a budget later. Under load the
    forecast is optimistic (the planner's safety factor and reserve shorten the steps it
    counts whole, and requests with earlier deadlines that arrive later are served first); a
    quantile of the recent errors says how much later than forecast a first token is likely
    to come. Errors age out, so a margin learned in a burst does not outlive it.
    """

    def __init__(
        self,
        window: int = FORECAST_ERROR_WINDOW,
        quantile: float = FORECAST_ERROR_QUANTILE,
        min_samples: int = FORECAST_ERROR_MIN_SAMPLES,
        max_age_s: float = FORECAST_ERROR_MAX_AGE_S,
    ) -> None:
        self._quantile = quantile
        self._min_samples = min_samples
        self._max_age_s = max_age_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)  # (when, error)
        # The quantile as of the last change, and when the oldest sample ages out.
        self._cached: tuple[float | None, float] | None = None

    def observe(self, now: float, error: float) -> None:
        self._samples.append((now, error))
        self._cached = None

    def __len__(self) -> int:
        return len(self._samples)

    def quantile(self, now: float) -> float | None:
        """The error (in TTFT budgets) most first tokens stayed within; None until enough
        recent ones are known."""
        if self._cached is not None and now < self._cached[1]:
            return self._cached[0]
        samples = self._samples
        while samples and samples[0][0] < now - self._max_age_s:
            samples.popleft()
        value: float | None = None
        if len(samples) >= self._min_samples:
            errors = sorted(error for _, error in samples)
            value = errors[min(len(errors) - 1, math.ceil(self._quantile * len(errors)) - 1)]
        expires = samples[0][0] + self._max_age_s if samples else math.inf
        self._cached = (value, expires)
        return value


class GroupedForecastErrors:
    """ForecastErrors kept per length group (`RequestSlo.length_group`), with all groups
    pooled as the fallback for a group with too few errors of its own.

    The error is in TTFT budgets, and one step of forecast error is a large part of a short
    budget and a small part of a long one: pooled, the errors of short-TTFT classes set the
    margin of long-prompt classes whose own forecasts hold. Groups are bounded (the least
    recently observed is forgotten), since a tenant's explicit budgets make groups of their own.
    """

    def __init__(self, max_groups: int = 64) -> None:
        self._max_groups = max_groups
        self.pooled = ForecastErrors()
        self._groups: dict[str, ForecastErrors] = {}

    def observe(self, group: str, now: float, error: float) -> None:
        self.pooled.observe(now, error)
        errors = self._groups.pop(group, None) or ForecastErrors()
        errors.observe(now, error)
        self._groups[group] = errors  # most recently observed last
        if len(self._groups) > self._max_groups:
            del self._groups[next(iter(self._groups))]

    def quantile(self, group: str, now: float) -> float | None:
        own = self._groups.get(group)
        value = own.quantile(now) if own is not None else None
        return value if value is not None else self.pooled.quantile(now)


class AdmittedLoad:
    """The admitted requests as admission weighs a newcomer against them, at one moment
    (`now`): what they need of the KV cache, the decode batch they form, and the queue of
    prompts waiting for their first token, in the order they were admitted.

    Built once for every request that arrives at that moment (SloPolicy.arrivals), each one
    admitted joining it (AdmissionController.decide_in): deciding k arrivals costs one pass
    over the n requests held, where rebuilding it per arrival cost k (with a thousand in
    flight and a handful of arrivals a step, most of the scheduler's time). It is a snapshot:
    nothing may change the requests it was built from while it is in use.
    """

    def __init__(
        self, now: float, kv_tokens: int, batch: _DecodeBatch, queue: list[SloRequest]
    ) -> None:
        self.now = now
        self.kv_tokens = kv_tokens
        self.batch = batch  # never advanced: each forecast consumes a copy
        self.queue = queue


class AdmissionController:
    def __init__(
        self,
        model: StepTimeModel,
        settings: PlannerSettings,
        kv_capacity_tokens: int,
        lengths: OutputLengths | None = None,
        limits: LiveLimits | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.kv_capacity_tokens = kv_capacity_tokens
        self.lengths = lengths or OutputLengths()
        self.limits = limits or LiveLimits(safety_factor=settings.safety_factor)
        self.errors = GroupedForecastErrors()
        # Admitted requests waiting for their first token: (when it was forecast to come, the
        # request's TTFT budget, its length group).
        self._forecasts: dict[str, tuple[float, float, str]] = {}

    def decide(self, now: float, candidate: SloRequest, admitted: Sequence[SloRequest]) -> Verdict:
        """The verdict for `candidate`, given the requests already in the engine."""
        held = [r for r in admitted if r.admitted and r is not candidate]
        return self.decide_in(self.load(now, held), candidate)

    def load(self, now: float, held: Sequence[SloRequest]) -> AdmittedLoad:
        """The admitted requests `held` (in the order they were admitted), as admission
        weighs newcomers against them at `now`."""
        return AdmittedLoad(
            now,
            sum(self.kv_tokens(r) for r in held),
            _DecodeBatch(self._decoders(now, held)),
            [r for r in held if r.output_tokens == 0],
        )

    def decide_in(self, load: AdmittedLoad, candidate: SloRequest) -> Verdict:
        """The verdict for `candidate`, weighed against `load` at its moment; admitted, it
        joins the load, as the next request arriving then must see it."""
        now = load.now
        kv_tokens = self.kv_tokens(candidate)
        reason, check = self._memory(kv_tokens, load), "memory"
        forecast: dict[str, float] = {}
        if reason is Reason.NONE:
            check = self._compute(now, candidate, load, forecast)
            reason = Reason.COMPUTE if check else Reason.NONE
        if reason is Reason.NONE:
            if candidate.request_id in forecast:
                self._forecasts[candidate.request_id] = (
                    forecast[candidate.request_id], candidate.budgets.ttft_s,
                    candidate.length_group,
                )  # fmt: skip
            load.kv_tokens += kv_tokens
            if candidate.output_tokens == 0:
                load.queue.append(candidate)
            for decoder in self._decoders(now, [candidate]):
                load.batch.add(decoder)
            return ADMIT
        if candidate.slo.allow_best_effort:
            return Verdict(Mode.BEST_EFFORT, reason, check)
        return Verdict(None, reason, check)

    # -- the forecast's error ---------------------------------------------------------------

    def waiting_for_first_token(self) -> list[str]:
        """Admitted requests whose forecast first token has not come yet."""
        return list(self._forecasts)

    def observe_first_token(self, request_id: str, at: float) -> None:
        """The first token of an admitted request came at `at` (when its step ended)."""
        forecast = self._forecasts.pop(request_id, None)
        if forecast is not None:
            when, budget_s, group = forecast
            self.errors.observe(group, at, (at - when) / budget_s)

    def forget(self, request_id: str) -> None:
        """The request left before its first token (aborted), or is no longer admitted: its
        forecast teaches nothing more (an expiry reports a miss first, observe_first_token)."""
        self._forecasts.pop(request_id, None)

    def allowance_s(self, now: float, request: SloRequest) -> float:
        """Forecast lateness tolerated (s; negative: a margin required) of the request's
        first token.

        While the forecast's error is unknown, QUEUE_LATE_ALLOWANCE of the budget: the
        forecast is taken to be pessimistic (steps of the tightest TPOT). Once measured, a
        first token forecast `x` budgets late lands, most likely, `x + error` budgets late:
        the allowance is what the error leaves, never more than QUEUE_LATE_ALLOWANCE. Where
        the forecast proves optimistic (under load), the allowance becomes a margin that
        grows with the error, so admission stops promising what it cannot keep. The error
        is the request's length group's (GroupedForecastErrors).
        """
        budget_s = request.budgets.ttft_s
        error = self.errors.quantile(request.length_group, now)
        if error is None:
            return QUEUE_LATE_ALLOWANCE * budget_s
        return min(QUEUE_LATE_ALLOWANCE, -error) * budget_s

    def _forecast_pessimistic(self, now: float, request: SloRequest) -> bool:
        """Whether the forecast may be taken for pessimistic for the request: its error not
        measured yet, or measured to be on time or early for most first tokens."""
        error = self.errors.quantile(request.length_group, now)
        return error is None or error <= 0.0

    # -- memory --------------------------------------------------------------------------

    def kv_tokens(self, request: SloRequest) -> int:
        """The KV tokens the request is expected to hold at its longest.

        Its group's high-quantile length once known. Before that (a new application, or a
        burst of a class not seen for a while), the client's `max_tokens` would count every
        request as writing its whole cap: a reasoning burst with a 16k cap was turned away for
        memory it would not use. Until then a request counts twice what it
        has written (what a stream has written is the best guess of what it has left), and at
        least the high quantile of every group's lengths (its cap while none are known). Should
        the requests outgrow the cache all the same, the engine preempts as vLLM does, and
        expiry demotes whoever falls behind.
        """
        group = request.length_group
        if self.lengths.known(group):
            expected = self.lengths.expected(group, request.max_tokens)
        else:
            floor = self.lengths.expected_of_any(request.max_tokens)
            expected = min(request.max_tokens, max(2 * request.output_tokens, floor))
        return request.prompt_tokens + max(expected, request.output_tokens)

    def _memory(self, kv_tokens: int, load: AdmittedLoad) -> Reason:
        """Whether a candidate needing `kv_tokens` fits the KV cache beside `load`."""
        need = kv_tokens + load.kv_tokens
        return Reason.MEMORY if need > self.kv_capacity_tokens else Reason.NONE

    # -- compute -------------------------------------------------------------------------

    def _compute(
        self,
        now: float,
        candidate: SloRequest,
        load: AdmittedLoad,
        forecast: dict[str, float] | None = None,
    ) -> str:
        """The check that turns the candidate away for lack of compute ("" when none does):
        it is turned away when it cannot be served in time even first, when it would make
        an admitted request late that would otherwise be on time, or when the decode batch
        could no longer keep its TPOT. `forecast` receives the forecast time of the first
        token of each request waiting for it, the candidate's included.

        Lateness is held to the allowance (`allowance_s()`): QUEUE_LATE_ALLOWANCE of the TTFT
        budget until the forecast's error is measured, then what that error leaves of it. A
        candidate late with the decode batch alone, nothing queued, is still admitted while
        the forecast may be pessimistic (steps of the tightest TPOT): a rejection is a miss
        as sure as a late token, and should it fall behind for real, expiry demotes it to
        best effort, out of everyone's way. What the queue ahead adds to its lateness is
        real; so is all of it once the forecast has proved optimistic.
        """
        if self._hopeless(now, candidate):
            return "hopeless"
        # Each forecast consumes its copy of the load's decode batch: the load serves the
        # next candidate too.
        batch = load.batch.copy()
        queue = load.queue
        without = self._forecast(now, load.batch.copy(), queue)
        alone: dict[str, float] | None = {}
        if candidate.output_tokens == 0:
            alone = self._forecast(now, load.batch.copy(), [candidate])
            queue = [*queue, candidate]
        else:  # resumed with tokens out already: it decodes (or recomputes) from the start
            for decoder in self._decoders(now, [candidate]):
                batch.add(decoder)
        first_tokens = forecast if forecast is not None else {}
        with_candidate = self._forecast(now, batch, queue, first_tokens)
        if with_candidate is None or alone is None:
            return "tpot"
        me = candidate.request_id
        lateness = with_candidate.pop(me, -math.inf)
        allowance = self.allowance_s(now, candidate)
        alone_lateness = alone.get(me, -math.inf)
        pessimistic = self._forecast_pessimistic(now, candidate)
        exempt = max(0.0, alone_lateness) if pessimistic else 0.0
        if lateness - exempt > allowance:
            late_alone = not pessimistic and alone_lateness > allowance
            return "late" if late_alone else "queue"
        if without is not None:
            # The admitted requests the forecast gives a first token: those queued.
            allowances = {
                r.request_id: self.allowance_s(now, r)
                for r in load.queue
                if r.request_id in with_candidate
            }
            if self._made_late(with_candidate, without, allowances):
                return "others"
        return ""

    @staticmethod
    def _made_late(
        with_candidate: dict[str, float], without: dict[str, float], allowances: dict[str, float]
    ) -> bool:
        """Whether the candidate makes an admitted request late that would be on time
        without it: pushes its forecast lateness past its allowance (s).

        With the allowance positive (the forecast taken for pessimistic), lateness within it
        is the forecast's bias, not a miss: in a burst of short prompts a check counting any
        lateness turned away requests that, admitted, left every admitted request on time.
        The allowance is a request's in all, not per newcomer: one
        predicted a little late stays protected, or each admission could push it a little
        further. With the allowance negative (a margin: the forecast measured optimistic), a
        request forecast on time but within the margin is at risk already; a newcomer may
        not delay it at all.
        """

        def made_late(request_id: str, lateness: float) -> bool:
            limit = allowances.get(request_id)
            if limit is None:
                return False
            before = without.get(request_id, -math.inf)
            return before <= max(limit, 0.0) and lateness > max(limit, before + _EPSILON_S)

        return any(made_late(r, lateness) for r, lateness in with_candidate.items())

    def _hopeless(self, now: float, candidate: SloRequest) -> bool:
        alone = self.model.prefill_s(candidate.prefill_left, self.settings.max_step_tokens)
        step_ends = now + alone + self.limits.overhead_s
        return step_ends > candidate.next_deadline(TOLERANCE, self.settings.delivery_s)

    def _decoders(self, now: float, requests: Iterable[SloRequest]) -> list[_Decoder]:
        """The requests that have produced tokens, as decoders of the forward simulation.

        A decoding request rides in every step until it has produced its expected output;
        steps of at most its TPOT give it a token each, so it is gone by then at the latest.
        """
        decoders = []
        for r in requests:
            if r.output_tokens > 0:
                tpot = _tightest_tpot(r)
                leaves = now + self._decode_left(r) * tpot
                deadline = r.planning_deadline(self.settings.delivery_s)
                decoders.append((leaves, tpot, deadline, r.context_tokens))
        return decoders

    def _forecast(
        self,
        now: float,
        batch: _DecodeBatch,
        queue: Sequence[SloRequest],
        first_tokens: dict[str, float] | None = None,
    ) -> dict[str, float] | None:
        """The lateness (s; negative: early) of the first token of each request of `queue`
        (waiting for it), with `batch` decoding alongside (it is consumed); None if the
        decode batch that results cannot keep the tightest TPOT. `first_tokens` receives the
        time each first token is forecast."""
        s = self.settings
        late: dict[str, float] = {}
        t = now
        for request in sorted(queue, key=lambda r: r.ttft_deadline):
            batch.advance(t)
            # How far ahead of schedule the most pressed decode is: time the planner may
            # spend on long prefill steps before it must fall back to steps of one TPOT.
            slack = max(0.0, batch.earliest_deadline() - t)
            time_left = request.planning_deadline(s.delivery_s) - t
            segment = self._prefill_segment(
                request.prefill_left, batch.count, batch.context, batch.tightest_tpot(), slack,
                time_left,
            )  # fmt: skip
            if segment is None:
                return None
            t += segment[0]
            late[request.request_id] = t - request.next_deadline(TOLERANCE, s.delivery_s)
            if first_tokens is not None:
                first_tokens[request.request_id] = t
            # It decodes from here on, held to the client's line from its first token
            # (SloRequest.planning_deadline).
            own_tpot = _tightest_tpot(request)
            first_due = t + (1.0 - CLIENT_RESERVE_TPOTS) * own_tpot
            leaves = t + self._decode_left(request) * own_tpot
            batch.add((leaves, own_tpot, first_due, request.prompt_tokens))
        # The largest decode batch the horizon sees must keep every stream on time.
        batch.advance(t)
        if batch.count > s.max_running or not self._keeps_pace(batch, t):
            return None
        return late

    def _keeps_pace(self, batch: _DecodeBatch, t: float) -> bool:
        """Whether steps of the whole batch keep each decode on its deadline line to its end.

        A step slower than a stream's TPOT is no miss yet: the judge's line is cumulative, so
        a stream ahead of it (an early first token) can spend that lead on slow steps until it
        has produced its expected output.
        """
        if not batch.count:
            return True
        shape = StepShape(batch.count, batch.count, batch.context + batch.count)
        step = self.limits.decode_line(self.model.predict(shape))
        for leaves, tpot, deadline, _ in batch.outpaced_by(step):
            excess = step - tpot  # positive: only the decoders the step outpaces
            if (leaves - t) / tpot * excess > max(0.0, deadline - t):
                return False
        return True

    def _decode_left(self, request: SloRequest) -> int:
        expected = self.lengths.expected(request.length_group, request.max_tokens)
        return max(1, expected - request.output_tokens)

    def _prefill_segment(
        self, tokens: int, batch: int, context: int, tpot: float, slack: float, time_left: float
    ) -> tuple[float, float] | None:
        """How long the planner takes to prefill `tokens` alongside `batch` decodes, and the
        decodes' slack left after it; None when the decodes cannot keep their deadlines.

        With k steps the segment lasts H = k * c0 + tokens * c1 (c0: a step's cost with the
        decodes alone, c1: the cost of one more prompt token). Steps are at most
        `max_step_tokens` long, and no longer than the step cap, stretched as the planner
        stretches it for a prompt that needs `time_left` (stretched_cap_s), so
        k >= tokens / max tokens per step; and each step gives every decode a token, so the
        decodes stay on time while k * tpot + slack >= H. The segment is the shortest H that
        satisfies both.
        """
        s = self.settings
        chunk = min(tokens, s.max_step_tokens)
        # The expected step time, without the planner's safety factor: admission turns away
        # only what cannot be served.
        empty = self.model.predict(StepShape(batch, batch + 1, context))
        full = self.model.predict(StepShape(batch + chunk, batch + 1, context + chunk))
        c0 = empty + self.limits.overhead_s
        c1 = max(0.0, full - empty) / chunk
        per_step = s.max_step_tokens
        cap = stretched_cap_s(self.limits.max_step_s, tokens, time_left, c0, c1)
        if c1 > 0 and not math.isinf(cap):
            per_step = max(1, min(per_step, int((cap - c0) / c1)))
        steps = math.ceil(tokens / per_step)
        duration = steps * c0 + tokens * c1
        if batch == 0 or math.isinf(tpot):
            return duration, slack
        if c0 >= tpot:  # the decodes fall behind at every step: their lead pays for it
            lead = slack + steps * tpot - duration
            return None if lead < 0 else (duration, lead)
        bound = (tokens * c1 - slack * c0 / tpot) / (1 - c0 / tpot)
        if bound > duration:
            steps_taken = (bound - tokens * c1) / c0
            return bound, max(0.0, slack + steps_taken * tpot - bound)
        return duration, max(0.0, slack + steps * tpot - duration)


# Forecast delays below this are rounding, not a newcomer's doing.
_EPSILON_S = 1e-9


def _tightest_tpot(request: SloRequest) -> float:
    """Time per token the tightest stage still ahead of the request allows, as the judge
    counts it (1.05 x the budget, §2): a decode step a little over the budget still keeps the
    stream on time. Once it has ended its thinking, only its answer's TPOT is ahead."""
    return request.tightest_tpot_s * TOLERANCE


# A decoder of the forward simulation: (leaves at, tightest TPOT, planning deadline of its next
# token, context tokens).
_Decoder = tuple[float, float, float, int]
_tpot_of = operator.itemgetter(1)


class _DecodeBatch:
    """The decoders alive at the simulation's time: those that have not left yet.

    Time only moves forward, so a decoder that has left never returns: heaps with lazy removal
    give the count, context and minima in O(log n) per change, where a scan per queued request
    would cost O(n) each (a thousand decodes, a hundred waiting prompts). The decoders are
    also kept in order of TPOT, so that those a slow step falls behind, the few with the
    tightest TPOTs, are found without a scan of all of them (outpaced_by).
    """

    def __init__(self, decoders: Sequence[_Decoder]) -> None:
        self.t = -math.inf
        self._by_tpot: list[_Decoder] = sorted(decoders, key=_tpot_of)
        self.count = len(self._by_tpot)
        self.context = sum(context for *_, context in self._by_tpot)
        self._leaving = [(leaves, context) for leaves, _, _, context in self._by_tpot]
        self._tpots = [(tpot, leaves) for leaves, tpot, _, _ in self._by_tpot]
        self._deadlines = [(deadline, leaves) for leaves, _, deadline, _ in self._by_tpot]
        heapq.heapify(self._leaving)
        heapq.heapify(self._tpots)
        heapq.heapify(self._deadlines)

    def copy(self) -> _DecodeBatch:
        twin = _DecodeBatch(())
        twin.t, twin.count, twin.context = self.t, self.count, self.context
        twin._by_tpot = self._by_tpot.copy()
        twin._leaving = self._leaving.copy()
        twin._tpots = self._tpots.copy()
        twin._deadlines = self._deadlines.copy()
        return twin

    def outpaced_by(self, step: float) -> list[_Decoder]:
        """The decoders alive at the current time whose TPOT is shorter than `step`: those
        that steps of `step` seconds fall behind."""
        end = bisect.bisect_left(self._by_tpot, step, key=_tpot_of)
        return [d for d in self._by_tpot[:end] if d[0] > self.t]

    def add(self, decoder: _Decoder) -> None:
        leaves, tpot, deadline, context = decoder
        if leaves <= self.t:
            return
        bisect.insort(self._by_tpot, decoder, key=_tpot_of)
        heapq.heappush(self._leaving, (leaves, context))
        heapq.heappush(self._tpots, (tpot, leaves))
        heapq.heappush(self._deadlines, (deadline, leaves))
        self.count += 1
        self.context += context

    def advance(self, t: float) -> None:
        self.t = t
        while self._leaving and self._leaving[0][0] <= t:
            _, context = heapq.heappop(self._leaving)
            self.count -= 1
            self.context -= context

    def tightest_tpot(self) -> float:
        return _alive_min(self._tpots, self.t)

    def earliest_deadline(self) -> float:
        return _alive_min(self._deadlines, self.t)


def _alive_min(heap: list[tuple[float, float]], t: float) -> float:
    """Smallest key among entries (key, leaves) still alive at `t`; inf when none is."""
    while heap and heap[0][1] <= t:
        heapq.heappop(heap)
    return heap[0][0] if heap else math.inf

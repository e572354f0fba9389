"""Where admission is decided: admit a request with its SLO, serve it as best effort, or reject.

Decided once, when the request reaches the engine's scheduler, by simulating forward:
- Compute. The admitted requests still prefilling and the candidate are prefilled in order of
  TTFT deadline, as the planner does. While they do, every decoding request rides in each step
  and steps last the tightest TPOT among them (the planner's steady state once decodes have
  spent their slack; it can only do better). Each request's first token must land before its
  TTFT deadline, and the final decode batch must fit in a step of the tightest TPOT. The
  candidate is turned away if it would miss, or if an admitted request that would have met its
  deadline without it would miss with it.
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
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sloserve.replica.planner import LiveLimits, PlannerSettings
from sloserve.replica.slo_request import Mode, Reason, SloRequest
from sloserve.slo import TOLERANCE
from sloserve.stepmodel import StepShape, StepTimeModel

# A candidate predicted late is admitted while the queue ahead of it adds at most this
# fraction of its TTFT budget to its lateness (see AdmissionController._compute).
QUEUE_LATE_ALLOWANCE = 0.25


@dataclass(frozen=True)
class Verdict:
    mode: Mode | None  # None: rejected
    reason: Reason = Reason.NONE
    # Which check decided against the request, for traces: "memory", "hopeless" (late even
    # served first), "tpot" (the decode batch cannot keep it), "queue" (the queue ahead makes
    # it too late), "others" (it would make an admitted request late).
    check: str = ""

    @property
    def rejected(self) -> bool:
        return self.mode is None


ADMIT = Verdict(Mode.ADMITTED)


class OutputLengths:
    """Per-class output lengths of finished requests, for the KV-memory bound.

    Keeps the last `window` lengths per class and answers a high quantile, so a request is
    expected to need as much KV as most of its class did.
    """

    def __init__(self, window: int = 200, quantile: float = 0.9, min_samples: int = 20) -> None:
        self._window = window
        self._quantile = quantile
        self._min_samples = min_samples
        self._by_class: dict[str, deque[int]] = {}
        self._sorted: dict[str, list[int]] = {}

    def observe(self, class_name: str, tokens: int) -> None:
        recent = self._by_class.setdefault(class_name, deque(maxlen=self._window))
        ordered = self._sorted.setdefault(class_name, [])
        if len(recent) == self._window:
            ordered.pop(bisect.bisect_left(ordered, recent[0]))
        recent.append(tokens)
        bisect.insort(ordered, tokens)

    def expected(self, class_name: str, max_tokens: int) -> int:
        ordered = self._sorted.get(class_name, [])
        if len(ordered) < self._min_samples:
            return max_tokens
        index = min(len(ordered) - 1, math.ceil(self._quantile * len(ordered)) - 1)
        return min(max_tokens, ordered[index])


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

    def decide(self, now: float, candidate: SloRequest, admitted: Sequence[SloRequest]) -> Verdict:
        """The verdict for `candidate`, given the requests already in the engine."""
        held = [r for r in admitted if r.admitted and r is not candidate]
        reason, check = self._memory(candidate, held), "memory"
        if reason is Reason.NONE:
            check = self._compute(now, candidate, held)
            reason = Reason.COMPUTE if check else Reason.NONE
        if reason is Reason.NONE:
            return ADMIT
        if candidate.slo.allow_best_effort:
            return Verdict(Mode.BEST_EFFORT, reason, check)
        return Verdict(None, reason, check)

    # -- memory --------------------------------------------------------------------------

    def kv_tokens(self, request: SloRequest) -> int:
        expected = self.lengths.expected(request.slo.class_name, request.max_tokens)
        return request.prompt_tokens + max(expected, request.output_tokens)

    def _memory(self, candidate: SloRequest, held: Iterable[SloRequest]) -> Reason:
        need = self.kv_tokens(candidate) + sum(self.kv_tokens(r) for r in held)
        return Reason.MEMORY if need > self.kv_capacity_tokens else Reason.NONE

    # -- compute -------------------------------------------------------------------------

    def _compute(self, now: float, candidate: SloRequest, held: Sequence[SloRequest]) -> str:
        """The check that turns the candidate away for lack of compute ("" when none does):
        it is turned away when it cannot be served in time even first, when it would make
        an admitted request late that would otherwise be on time, or when the decode batch
        could no longer keep its TPOT.

        A candidate predicted late is still admitted unless the queue ahead of it adds more
        than QUEUE_LATE_ALLOWANCE of its TTFT budget to its lateness. Lateness with the decode
        batch alone comes from the simulation's pessimism (steps of the tightest TPOT), and
        a rejection is a miss as sure as a late token; should the candidate fall behind for
        real, expiry demotes it to best effort, out of everyone's way. A queue that makes it
        that much later, as under a burst, is real: admitting it would only break the promise
        admission makes.
        """
        if self._hopeless(now, candidate):
            return "hopeless"
        batch = _DecodeBatch(self._decoders(now, held))
        queue = [r for r in held if r.output_tokens == 0]
        without = self._late_requests(now, batch.copy(), queue)
        alone: dict[str, float] | None = {}
        if candidate.output_tokens == 0:
            alone = self._late_requests(now, batch.copy(), [candidate])
            queue.append(candidate)
        else:  # resumed with tokens out already: it decodes (or recomputes) from the start
            for decoder in self._decoders(now, [candidate]):
                batch.add(decoder)
        with_candidate = self._late_requests(now, batch, queue)
        if with_candidate is None or alone is None:
            return "tpot"
        lateness = with_candidate.pop(candidate.request_id, 0.0)
        queue_lateness = lateness - alone.get(candidate.request_id, 0.0)
        if queue_lateness > QUEUE_LATE_ALLOWANCE * candidate.budgets.ttft_s:
            return "queue"
        if without is not None and self._made_late(with_candidate, without, held):
            return "others"
        return ""

    @staticmethod
    def _made_late(
        with_candidate: dict[str, float], without: dict[str, float], held: Sequence[SloRequest]
    ) -> bool:
        """Whether the candidate makes an admitted request late that would be on time
        (within the allowance) without it. The forecast is pessimistic (steps of the
        tightest TPOT while any decode rides along), so, as for the candidate itself,
        lateness within QUEUE_LATE_ALLOWANCE of the request's TTFT budget is the forecast's
        bias, not a miss: in a burst of short prompts this check, counting any lateness,
        turned away requests that, admitted, left every admitted request on time
        (docs/benchmarks.md)."""
        allowances = {r.request_id: QUEUE_LATE_ALLOWANCE * r.budgets.ttft_s for r in held}

        def made_late(request_id: str, lateness: float) -> bool:
            allowance = allowances.get(request_id, 0.0)
            # The allowance is a request's in all, not per newcomer: one predicted a little
            # late stays protected, or each admission could push it a little further.
            return without.get(request_id, 0.0) <= allowance < lateness

        return any(made_late(r, lateness) for r, lateness in with_candidate.items())

    def _hopeless(self, now: float, candidate: SloRequest) -> bool:
        alone = self.model.prefill_s(candidate.prefill_left, self.settings.max_step_tokens)
        first_token = now + alone + self.limits.overhead_s + self.settings.delivery_s
        return first_token > candidate.next_deadline(TOLERANCE)

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
                decoders.append((leaves, tpot, r.planning_deadline(), r.context_tokens))
        return decoders

    def _late_requests(
        self, now: float, batch: _DecodeBatch, queue: Sequence[SloRequest]
    ) -> dict[str, float] | None:
        """Requests of `queue` (waiting for their first token) whose first token would miss
        its deadline, with by how much (s), with `batch` decoding alongside (it is consumed);
        None if the decode batch that results cannot keep the tightest TPOT."""
        s = self.settings
        late: dict[str, float] = {}
        t = now
        for request in sorted(queue, key=lambda r: r.ttft_deadline):
            batch.advance(t)
            # How far ahead of schedule the most pressed decode is: time the planner may
            # spend on long prefill steps before it must fall back to steps of one TPOT.
            slack = max(0.0, batch.earliest_deadline() - t)
            segment = self._prefill_segment(
                request.prefill_left, batch.count, batch.context, batch.tightest_tpot(), slack
            )
            if segment is None:
                return None
            t += segment[0]
            lateness = t + s.delivery_s - request.next_deadline(TOLERANCE)
            if lateness > 0:
                late[request.request_id] = lateness
            # It decodes from here on, ahead of schedule by what its early first token left.
            own_tpot = _tightest_tpot(request)
            first_due = max(request.ttft_deadline, t) + own_tpot
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
        for leaves, tpot, deadline, _ in batch.alive():
            excess = step - tpot
            if excess > 0 and (leaves - t) / tpot * excess > max(0.0, deadline - t):
                return False
        return True

    def _decode_left(self, request: SloRequest) -> int:
        expected = self.lengths.expected(request.slo.class_name, request.max_tokens)
        return max(1, expected - request.output_tokens)

    def _prefill_segment(
        self, tokens: int, batch: int, context: int, tpot: float, slack: float
    ) -> tuple[float, float] | None:
        """How long the planner takes to prefill `tokens` alongside `batch` decodes, and the
        decodes' slack left after it; None when the decodes cannot keep their deadlines.

        With k steps the segment lasts H = k * c0 + tokens * c1 (c0: a step's cost with the
        decodes alone, c1: the cost of one more prompt token). Steps are at most
        `max_step_tokens` (and `max_step_s`) long, so k >= tokens / max tokens per step; and
        each step gives every decode a token, so the decodes stay on time while
        k * tpot + slack >= H. The segment is the shortest H that satisfies both.
        """
        s = self.settings
        sf = 1.0  # the expected step time: admission turns away only what cannot be served
        chunk = min(tokens, s.max_step_tokens)
        empty = self.model.predict(StepShape(batch, batch + 1, context))
        full = self.model.predict(StepShape(batch + chunk, batch + 1, context + chunk))
        c0 = empty * sf + self.limits.overhead_s
        c1 = max(0.0, full - empty) / chunk * sf
        per_step = s.max_step_tokens
        if c1 > 0 and not math.isinf(self.limits.max_step_s):
            per_step = max(1, min(per_step, int((self.limits.max_step_s - c0) / c1)))
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


def _tightest_tpot(request: SloRequest) -> float:
    """Time per token the request's tightest stage allows, as the judge counts it (1.05 x the
    budget, §2): a decode step a little over the budget still keeps the stream on time."""
    budgets = request.budgets
    return min(budgets.tpot_s, budgets.thinking_tpot_s or math.inf) * TOLERANCE


# A decoder of the forward simulation: (leaves at, tightest TPOT, planning deadline of its next
# token, context tokens).
_Decoder = tuple[float, float, float, int]


class _DecodeBatch:
    """The decoders alive at the simulation's time: those that have not left yet.

    Time only moves forward, so a decoder that has left never returns: heaps with lazy removal
    give the count, context and minima in O(log n) per change, where a scan per queued request
    would cost O(n) each (a thousand decodes, a hundred waiting prompts).
    """

    def __init__(self, decoders: Sequence[_Decoder]) -> None:
        self.t = -math.inf
        self.count = 0
        self.context = 0
        self._all: list[_Decoder] = []
        self._leaving: list[tuple[float, int]] = []
        self._tpots: list[tuple[float, float]] = []
        self._deadlines: list[tuple[float, float]] = []
        for decoder in decoders:
            self._push(decoder)
        heapq.heapify(self._leaving)
        heapq.heapify(self._tpots)
        heapq.heapify(self._deadlines)

    def copy(self) -> _DecodeBatch:
        twin = _DecodeBatch(())
        twin.t, twin.count, twin.context = self.t, self.count, self.context
        twin._all = self._all.copy()
        twin._leaving = self._leaving.copy()
        twin._tpots = self._tpots.copy()
        twin._deadlines = self._deadlines.copy()
        return twin

    def alive(self) -> list[_Decoder]:
        """The decoders that have not left by the current time."""
        return [d for d in self._all if d[0] > self.t]

    def _push(self, decoder: _Decoder) -> None:
        self._all.append(decoder)
        leaves, tpot, deadline, context = decoder
        self._leaving.append((leaves, context))
        self._tpots.append((tpot, leaves))
        self._deadlines.append((deadline, leaves))
        self.count += 1
        self.context += context

    def add(self, decoder: _Decoder) -> None:
        leaves, tpot, deadline, context = decoder
        if leaves <= self.t:
            return
        self._all.append(decoder)
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

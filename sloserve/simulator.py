"""A virtual engine: the scheduling policy run step by step against the step-time model.

A capacity search on the real engine takes an hour per system; here the same SloPolicy object
the vLLM scheduler drives plans every step, and the step-time model says how long the step
takes, on a virtual clock. A policy change can then be judged on 1,000-request load points in
seconds, against a stand-in for stock vLLM's scheduler under the same model (simulator_policies.py).

What the virtual engine models: chunked prefill, one token per decode, the first token out of
the step that completes a prefill, the KV cache as a token count (preemption by recomputation
when it overflows), engine limits. What it leaves out: output processing and the RPC (an
optional fixed per-step overhead stands in), prefix caching, block granularity. Its records are
the benchmark's RequestRecord on the virtual clock, so sloserve.bench.analysis judges them as
it judges a real run.
"""

from __future__ import annotations

import bisect
import heapq
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.replica.admission import Verdict
from sloserve.replica.planner import StepPlan
from sloserve.replica.policy import PolicyCounters, SloPolicy
from sloserve.replica.slo_request import Mode, SloRequest
from sloserve.simulator_policies import EngineLimits, Policy, PreemptingPolicy, make_policy
from sloserve.slo import RequestSlo
from sloserve.stepmodel import StepShape, StepTimeModel


class SimulationError(RuntimeError):
    """The policy asked for something the engine cannot do, or stalled with work left."""


# -- step-time noise ---------------------------------------------------------------------------


class StepNoise:
    """Factors that make step times scatter as the profile's held-out steps did.

    Draws a relative residual by inverting the quantiles the profile kept (p50, p90, ...),
    linear between them. The profile keeps no lower tail, so below the median it mirrors the
    p50-p90 spread; above the top quantile it extends the last segment. Without quantiles
    (derived profiles), every factor is 1.
    """

    FLOOR = 0.05  # no step is faster than this fraction of its prediction

    def __init__(self, residual_quantiles: Mapping[str, float], seed: int) -> None:
        self._rng = random.Random(seed)
        points = sorted((float(k[1:]) / 100, v) for k, v in residual_quantiles.items())
        self._u: list[float] = []
        self._r: list[float] = []
        median = dict(points).get(0.5)
        upper = [(u, r) for u, r in points if u > 0.5]
        if median is None or not upper:
            return
        u_hi, r_hi = upper[0]
        slope = (r_hi - median) / (u_hi - 0.5)
        knots = [(0.0, median - 0.5 * slope), (0.5, median), *upper]
        (u1, r1), (u2, r2) = knots[-2], knots[-1]
        knots.append((1.0, r2 + (r2 - r1) / (u2 - u1) * (1.0 - u2)))
        self._u = [u for u, _ in knots]
        self._r = [r for _, r in knots]

    def factor(self) -> float:
        if not self._u:
            return 1.0
        u = self._rng.random()
        i = min(max(1, bisect.bisect_right(self._u, u)), len(self._u) - 1)
        u0, u1, r0, r1 = self._u[i - 1], self._u[i], self._r[i - 1], self._r[i]
        return max(self.FLOOR, 1.0 + r0 + (r1 - r0) * (u - u0) / (u1 - u0))


# -- results -----------------------------------------------------------------------------------


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    array = np.asarray(values)
    p50, p99 = (float(v) for v in np.percentile(array, [50, 99]))
    return {"mean": float(array.mean()), "p50": p50, "p99": p99}


def _counter_json(counters: PolicyCounters) -> dict[str, dict[str, int]]:
    """Tuple keys flattened to "class/reason": JSON keys are strings."""
    flat = {"admitted": dict(sorted(counters.admitted.items()))}
    for name in ("best_effort", "rejected", "expired"):
        table: dict[tuple[str, str], int] = getattr(counters, name)
        flat[name] = {f"{k[0]}/{k[1]}": v for k, v in sorted(table.items())}
    return flat


@dataclass
class SimStats:
    """How the simulated engine ran: what the records alone do not show."""

    policy: str
    requests: int
    steps: int = 0
    virtual_s: float = 0.0  # the virtual clock at the end
    busy_s: float = 0.0  # sum of step times
    wall_s: float = 0.0  # real seconds the simulation took
    step_s: list[float] = field(default_factory=list, repr=False)
    plan_s: list[float] = field(default_factory=list, repr=False)
    preemptions: dict[str, int] = field(default_factory=lambda: {"best_effort": 0, "admitted": 0})
    recomputed_tokens: int = 0  # KV tokens thrown away by preemptions
    counters: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "requests": self.requests,
            "steps": self.steps,
            "virtual_s": self.virtual_s,
            "busy_s": self.busy_s,
            "wall_s": self.wall_s,
            "requests_per_wall_s": self.requests / self.wall_s if self.wall_s > 0 else None,
            "step_s": _quantiles(self.step_s),
            "plan_wall_s": _quantiles(self.plan_s),
            "preemptions": dict(self.preemptions),
            "recomputed_tokens": self.recomputed_tokens,
            "policy_counters": self.counters,
        }


@dataclass(frozen=True)
class SimResult:
    records: list[RequestRecord]  # in workload order, as the benchmark runner returns them
    stats: SimStats


# -- the engine --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Live:
    bench: BenchRequest
    record: RequestRecord
    view: SloRequest


class _ArrivalBatch(Protocol):
    """The policy's verdicts on the requests arriving at one instant, in arrival order."""

    def arrive(self, request: SloRequest) -> Verdict: ...


@dataclass(frozen=True)
class _EachAlone:
    """A policy's verdicts on arrivals it decides one by one."""

    policy: Policy
    now: float

    def arrive(self, request: SloRequest) -> Verdict:
        return self.policy.arrive(self.now, request)


class EngineHooks(Protocol):
    """How an engine behind a router (simulator_cluster.py) tells the router what happened.
    Alone, an engine needs none: it takes its own session rounds and rejects for good."""

    def release(self, request: BenchRequest, at: float) -> None:
        """A session's next round arrives at `at` (its previous round completed)."""

    def rejected(self, request: BenchRequest, sent_at: float, reason: str, now: float) -> bool:
        """The engine turned `request` away at `now`; True when the router takes it on (it
        tries another engine), False to end it as rejected."""

    def first_token(self, request: BenchRequest) -> None: ...

    def ended(self, request: BenchRequest) -> None:
        """The request left the engine (completed, failed or rejected)."""


class VirtualEngine:
    """One run of a workload through a policy; build one per run (the policy keeps state)."""

    def __init__(
        self,
        model: StepTimeModel,
        limits: EngineLimits,
        policy: Policy,
        name: str = "",
        noise: StepNoise | None = None,
        step_overhead_s: float = 0.0,
        hooks: EngineHooks | None = None,
        reasoning_end_visible: bool = True,
    ) -> None:
        self.model = model
        # Whether the policy learns when a reasoning request ends its thinking, as a replica
        # serving a reasoning model with vLLM's reasoning parser does (it sees the model's
        # end-of-thinking token); without a parser (the random-weight CPU bench model) it
        # never does, and holds every token to the thinking TPOT.
        self.reasoning_end_visible = reasoning_end_visible
        self.limits = limits
        self.policy = policy
        self.noise = noise
        self.step_overhead_s = step_overhead_s
        self.now = 0.0
        self.stats = SimStats(policy=name or type(policy).__name__, requests=0)
        self.hooks = hooks
        self._records: dict[int, RequestRecord] = {}
        self._followers: dict[int, list[BenchRequest]] = {}
        # Rounds turned away whose best-effort retry is under way: the round's record.
        self._retried: dict[int, RequestRecord] = {}
        # (when it reaches the engine, index, request, when it arrived: its deadlines' start)
        self._arrivals: list[tuple[float, int, BenchRequest, float]] = []
        # In-engine requests, by the kind of work they need next (each is in exactly one).
        self._decoding: dict[str, _Live] = {}
        self._prefilling: dict[str, _Live] = {}
        self._held = 0  # KV tokens held: the sum of computed_tokens in the engine

    @property
    def held_tokens(self) -> int:
        """KV tokens the engine's requests hold between steps."""
        return self._held

    def run(self, requests: Sequence[BenchRequest]) -> SimResult:
        started = time.perf_counter()
        self.stats.requests = len(requests)
        for request in requests:
            if request.after is None:
                self.submit(request, request.arrival_s)
            else:
                self.follow(request)
        while self.next_time() is not None:
            self.advance()
        self.finish_stats()
        self.stats.wall_s = time.perf_counter() - started
        missing = [r.index for r in requests if r.index not in self._records]
        if missing:
            raise SimulationError(f"requests {missing[:5]} never arrived: `after` out of order")
        return SimResult([self._records[r.index] for r in requests], self.stats)

    # -- driven one turn at a time (by run, or by a router over several engines) -------------

    def submit(self, request: BenchRequest, at: float, sent_at: float | None = None) -> None:
        """`request` reaches the engine at `at`; its deadlines count from `sent_at` (its
        arrival at the system; `at` unless a router tried another engine first)."""
        arrived = at if sent_at is None else sent_at
        heapq.heappush(self._arrivals, (at, request.index, request, arrived))

    def follow(self, request: BenchRequest) -> None:
        """A later session round, released when the round it follows (`after`) ends."""
        assert request.after is not None
        self._followers.setdefault(request.after, []).append(request)

    def next_time(self) -> float | None:
        """When the engine next does something: its next step, or the next arrival when it
        is idle; None with nothing to do."""
        if self._decoding or self._prefilling:
            return self.now
        if self._arrivals:
            return max(self.now, self._arrivals[0][0])
        return None

    def advance(self) -> None:
        """One turn: the arrivals due, then one step if there is work."""
        at = self.next_time()
        if at is None:
            return
        self.now = at
        batch: _ArrivalBatch | None = None
        while self._arrivals and self._arrivals[0][0] <= self.now:
            _, _, request, arrived = heapq.heappop(self._arrivals)
            if batch is None:  # the arrivals due now are decided together
                batch = self._arrival_batch()
            self._arrive(request, arrived, batch)
        if self._decoding or self._prefilling:
            self._expire()
            if self._decoding or self._prefilling:
                self._step()

    @property
    def records(self) -> dict[int, RequestRecord]:
        """Every request that ended here or is still here, by workload index."""
        return self._records

    @property
    def running(self) -> int:
        """Requests holding KV or decoding (vLLM's running queue)."""
        started = sum(1 for live in self._prefilling.values() if live.view.computed_tokens)
        return len(self._decoding) + started

    @property
    def waiting(self) -> int:
        return len(self._prefilling) - (self.running - len(self._decoding))

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens of requests with no first token yet (the replica's load report)."""
        return sum(live.bench.prompt_tokens for live in self._prefilling.values())

    def finish_stats(self) -> None:
        self.stats.virtual_s = self.now
        self.stats.counters = _counter_json(self.policy.counters)

    # -- arrivals and departures ---------------------------------------------------------------

    def _arrival_batch(self) -> _ArrivalBatch:
        """Where the policy decides the requests arriving now: SloPolicy decides those that
        arrive together against one view of what it holds (SloPolicy.arrivals), as the
        replica's scheduler does; the stand-ins decide each on its own."""
        if isinstance(self.policy, SloPolicy):
            return self.policy.arrivals(self.now)
        return _EachAlone(self.policy, self.now)

    def _arrive(self, request: BenchRequest, at: float, batch: _ArrivalBatch) -> None:
        record = RequestRecord(request=request, sent_at=at)
        if request.index not in self._retried:  # a retry keeps the round's own record
            self._records[request.index] = record
        need = request.prompt_tokens + request.output_tokens
        if need > self.limits.kv_capacity_tokens:
            # vLLM refuses a request longer than its cache can ever hold; so does this engine.
            cap = self.limits.kv_capacity_tokens
            self._end(request, record, error=f"needs {need} KV tokens; the cache holds {cap}")
            return
        rid = str(request.index)
        # The policy sees what a server is sent (methodology §5): the class's max_tokens cap
        # and no thinking-token count. The virtual request still ends at its true length
        # (_advance), as if the model emitted end-of-sequence there.
        slo = RequestSlo(
            request_id=rid,
            class_name=request.slo_class,
            budgets=request.client_budgets,
            allow_best_effort=request.allow_best_effort,
            arrival_time=at,
        )
        view = SloRequest(rid, slo, request.prompt_tokens, max_tokens=request.max_tokens)
        verdict = batch.arrive(view)
        if verdict.rejected:
            if self.hooks is not None and self.hooks.rejected(
                request, at, verdict.reason.name, self.now
            ):
                del self._records[request.index]  # the router sends it elsewhere
                return
            record.rejected = True
            record.reject_reason = verdict.reason.name
            self._end(request, record)
            return
        record.best_effort = verdict.mode is Mode.BEST_EFFORT
        self._prefilling[rid] = _Live(request, record, view)

    def _end(self, request: BenchRequest, record: RequestRecord, error: str = "") -> None:
        """Closes a record and releases (or fails) the session rounds waiting on it."""
        record.finished_at = self.now
        record.error = error
        record.completed = not error and not record.rejected
        if self.hooks is not None:
            self.hooks.ended(request)
        retried = self._retried.pop(request.index, None)
        if retried is not None:
            retried.retry_completed = record.completed
        elif record.rejected and request.session is not None:
            # The agent sends the round again, accepting best effort, as the bench's agents
            # do (bench/runner.py); its session goes on once that retry has run.
            self._retried[request.index] = record
            self.submit(replace(request, allow_best_effort=True), self.now)
            return
        for follower in self._followers.pop(request.index, []):
            if record.completed:
                at = self.now + follower.delay_s
                if self.hooks is not None:
                    self.hooks.release(follower, at)
                else:
                    self.submit(follower, at)
            else:
                failed = RequestRecord(follower, sent_at=self.now)
                self._records[follower.index] = failed
                self._end(follower, failed, f"session stopped: round {request.round} failed")

    def _remove(self, live: _Live, completed: bool) -> None:
        rid = live.view.request_id
        self._decoding.pop(rid, None)
        self._prefilling.pop(rid, None)
        self._held -= live.view.computed_tokens
        self.policy.finish(rid, completed=completed)

    def _expire(self) -> None:
        for expiry in self.policy.expire(self.now):
            rid = expiry.request.request_id
            live = self._decoding.get(rid) or self._prefilling.get(rid)
            if live is None:
                raise SimulationError(f"policy expired {rid}, which is not in the engine")
            if expiry.abort:
                self._remove(live, completed=False)
                self._end(live.bench, live.record, "expired: can no longer meet its SLO")
            else:
                live.record.best_effort = True

    # -- steps -----------------------------------------------------------------------------

    def _step(self) -> None:
        decoding = [live.view for live in self._decoding.values()]
        prefilling = [live.view for live in self._prefilling.values()]
        plan = self.policy.plan(self.now, decoding, prefilling)
        self.stats.plan_s.append(self.policy.last_plan_s)
        preempted = False
        if isinstance(self.policy, PreemptingPolicy):
            # The policy preempted as it planned (vLLM's scheduler does, its own victims):
            # their KV goes before the step, which the plan fitted into what is left.
            for rid in self.policy.take_preempted():
                live = self._decoding.get(rid) or self._prefilling.get(rid)
                if live is None:
                    raise SimulationError(f"policy preempted {rid}, which is not in the engine")
                self._preempt(live)
                preempted = True
        if plan.tokens <= 0 and preempted:
            return  # a step that only preempted: it runs nothing, in no time; plan again
        if plan.tokens <= 0:
            raise SimulationError(
                f"{self.stats.policy}: the plan at t={self.now:.6f} s schedules nothing, with "
                f"{len(decoding)} decoding and {len(prefilling)} prefilling requests waiting; "
                "the run would never end"
            )
        work = self._fit_kv(self._work_of(plan))
        context = sum(live.view.computed_tokens + n for live, n in work)
        shape = StepShape(
            tokens=sum(n for _, n in work), requests=len(work), context_tokens=context
        )
        predicted = self.model.predict(shape)
        seconds = predicted * self.noise.factor() if self.noise is not None else predicted
        seconds = max(0.0, seconds) + self.step_overhead_s
        # As on the engine, the policy learns the loop overhead and the live model error.
        decode_only = all(live.view.decoding for live, _ in work)
        self.policy.observe_step(predicted, seconds, decode_only)
        self.now += seconds
        self.stats.steps += 1
        self.stats.busy_s += seconds
        self.stats.step_s.append(seconds)
        for live, tokens in work:
            self._advance(live, tokens)

    def _work_of(self, plan: StepPlan) -> list[tuple[_Live, int]]:
        """The plan as (request, tokens), checked: a bad plan fails loudly, not silently."""
        work: list[tuple[_Live, int]] = []
        for rid in plan.decodes:
            live = self._decoding.get(rid)
            if live is None:
                raise SimulationError(f"plan decodes {rid}, which is not decoding")
            work.append((live, 1))
        for rid, tokens in plan.prefills:
            live = self._prefilling.get(rid)
            if live is None or not 0 < tokens <= live.view.prefill_left:
                raise SimulationError(
                    f"plan prefills {tokens} tokens of {rid}, which cannot take them"
                )
            work.append((live, tokens))
        if len({id(live) for live, _ in work}) != len(work):
            raise SimulationError(f"plan schedules a request twice: {plan.scheduled}")
        return work

    def _fit_kv(self, work: list[tuple[_Live, int]]) -> list[tuple[_Live, int]]:
        """Keeps the step within the KV cache, as vLLM does when it runs out of blocks.

        Best effort gives way before admitted work, and the latest arrival first; a request
        that holds no KV yet is only held back, one that does is preempted (its KV freed, to
        be recomputed). The last scheduled request stays, its chunk cut to what fits.
        """
        capacity = self.limits.kv_capacity_tokens
        need = self._held + sum(n for _, n in work)
        if need <= capacity:
            return work
        scheduled = {id(live): n for live, n in work}
        holders = [
            live
            for live in (*self._decoding.values(), *self._prefilling.values())
            if live.view.computed_tokens or id(live) in scheduled
        ]
        holders.sort(key=lambda x: (x.view.admitted, x.view.computed_tokens > 0, -x.view.arrival))
        for live in holders:
            if need <= capacity:
                break
            if id(live) in scheduled:
                if len(scheduled) == 1:
                    continue
                need -= scheduled.pop(id(live))
            if live.view.computed_tokens:
                need -= live.view.computed_tokens
                self._preempt(live)
        work = [(live, n) for live, n in work if id(live) in scheduled]
        if need > capacity:
            ((live, n),) = work
            if live.view.decoding or n - (need - capacity) <= 0:
                raise SimulationError(f"request {live.view.request_id} cannot fit the KV cache")
            work = [(live, n - (need - capacity))]
        return work

    def _preempt(self, live: _Live) -> None:
        view = live.view
        self.stats.preemptions["admitted" if view.admitted else "best_effort"] += 1
        self.stats.recomputed_tokens += view.computed_tokens
        self._held -= view.computed_tokens
        view.computed_tokens = 0
        if self._decoding.pop(view.request_id, None) is not None:
            self._prefilling[view.request_id] = live

    def _advance(self, live: _Live, tokens: int) -> None:
        """Applies one request's share of the step that just ended at `self.now`.

        A preempted request that finishes recomputing puts out no token in that step: its
        last output is the next decode's input (SloRequest.prefill_left), one step later
        than vLLM, which samples in the recompute step itself.
        """
        view = live.view
        was_decoding = view.decoding
        view.computed_tokens += tokens
        self._held += tokens
        if was_decoding or (view.output_tokens == 0 and view.prefill_left == 0):
            view.on_tokens(1, self.now)
            live.record.token_times.append(self.now)
            thinking = live.bench.budgets.thinking_tokens
            if self.reasoning_end_visible and view.output_tokens == thinking:
                view.end_thinking()
            if self.hooks is not None and len(live.record.token_times) == 1:
                self.hooks.first_token(live.bench)
        if not was_decoding and view.decoding:
            del self._prefilling[view.request_id]
            self._decoding[view.request_id] = live
        if view.output_tokens >= live.bench.output_tokens:
            self._remove(live, completed=True)
            self._end(live.bench, live.record)


def simulate(
    requests: Sequence[BenchRequest],
    model: StepTimeModel,
    limits: EngineLimits,
    policy: str = "sloserve",
    *,
    noise_seed: int | None = None,
    step_overhead_s: float = 0.0,
    reasoning_end_visible: bool = True,
) -> SimResult:
    """Runs `requests` through a fresh `policy` on a virtual engine.

    `noise_seed`: scatter step times as the profile's residuals (None: exact predictions).
    `reasoning_end_visible`: see VirtualEngine.
    """
    noise = None if noise_seed is None else StepNoise(model.residual_quantiles, noise_seed)
    engine = VirtualEngine(
        model,
        limits,
        make_policy(policy, model, limits),
        policy,
        noise,
        step_overhead_s,
        reasoning_end_visible=reasoning_end_visible,
    )
    return engine.run(requests)

"""Several virtual engines behind a simulated gateway: routing policies at scale.

The same principle as the simulator itself: the gateway's own routing code
(`gateway/routing.py`, `Router`) ranks the replicas, on what the gateway would know of them:
a load report per replica, refreshed once per report interval (so it is as stale as the real
one), plus what the gateway sent since (`Outstanding`, kept the way the gateway's tickets keep
it). A request goes to the best-ranked engine; one that rejects it passes it to the next
(the gateway's transparent retry), its deadlines still counted from its first arrival; when
every engine rejected it, it is rejected. Session rounds go back through the router.

Left out: the spillover queue (benchmark workloads do not accept best effort), probes,
session affinity, and the gateway's own latency. An engine's report may be up to one step
ahead of the routing time: a step's effects are applied when it starts (steps last
milliseconds, reports are 250 ms apart).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.gateway.replica_pool import Outstanding, Probed
from sloserve.gateway.routing import CostModel, RequestShape, Router
from sloserve.simulator import SimResult, SimStats, SimulationError, StepNoise, VirtualEngine
from sloserve.simulator_policies import EngineLimits, make_policy
from sloserve.stepmodel import StepShape, StepTimeModel
from sloserve.v1 import replica_control_pb2

REPORT_INTERVAL_S = 0.25  # the gateway's default --report-interval


def profile_costs(model: StepTimeModel, chunk_tokens: int) -> CostModel:
    """The router's cost model fitted to a step profile: prefill speed of a full chunk, and
    what one more running request (one more decode token) adds to a step."""
    chunk = StepShape(tokens=chunk_tokens, requests=1, context_tokens=chunk_tokens)
    with_decode = StepShape(tokens=chunk_tokens + 1, requests=2, context_tokens=chunk_tokens + 1)
    step_s = model.predict(chunk)
    return CostModel(
        prefill_tokens_per_s=chunk_tokens / step_s,
        running_request_s=max(0.0, model.predict(with_decode) - step_s),
    )


@dataclass(eq=False)
class SimReplica:
    """One engine as the router sees it (routing.Candidate)."""

    endpoint: str
    engine: VirtualEngine
    report: replica_control_pb2.LoadReport | None = None
    report_at: float = float("-inf")
    outstanding: Outstanding = field(default_factory=Outstanding)
    probed: Probed | None = None  # the simulated gateway does not probe
    lag_s: float = 0.0
    epoch: int = 0  # reports so far: tickets of older epochs are in the report

    def refresh(self, now: float, interval_s: float) -> None:
        """A new load report when one is due, as WatchLoad would send it."""
        if now - self.report_at < interval_s:
            return
        engine = self.engine
        self.report = replica_control_pb2.LoadReport(
            ready=True,
            running=engine.running,
            waiting=engine.waiting,
            pending_prefill_tokens=engine.pending_prefill_tokens,
        )
        self.report_at = now
        self.epoch += 1
        self.outstanding.unreported_prompt_tokens = 0


@dataclass
class _Ticket:
    """A request on a replica, counted in its Outstanding as the gateway's Ticket does."""

    replica: SimReplica
    prompt_tokens: int
    epoch: int
    awaiting: bool = True

    def open(self) -> None:
        o = self.replica.outstanding
        o.in_flight += 1
        o.awaiting_first_token += 1
        o.awaiting_prompt_tokens += self.prompt_tokens
        o.unreported_prompt_tokens += self.prompt_tokens

    def first_token(self) -> None:
        if not self.awaiting:
            return
        self.awaiting = False
        o = self.replica.outstanding
        o.awaiting_first_token -= 1
        o.awaiting_prompt_tokens -= self.prompt_tokens
        if self.epoch == self.replica.epoch:
            o.unreported_prompt_tokens -= self.prompt_tokens

    def close(self) -> None:
        self.first_token()
        self.replica.outstanding.in_flight -= 1


class VirtualCluster:
    """`replicas` virtual engines, each with its own scheduling policy, behind one router.
    Build one per run."""

    def __init__(
        self,
        model: StepTimeModel,
        limits: EngineLimits,
        replicas: int,
        routing: str = "slack",
        policy: str = "sloserve",
        *,
        costs: CostModel | None = None,
        noise_seed: int | None = None,
        step_overhead_s: float = 0.0,
        report_interval_s: float = REPORT_INTERVAL_S,
    ) -> None:
        if replicas < 1:
            raise ValueError("a cluster needs at least one replica")
        self.router = Router(routing, costs or profile_costs(model, limits.max_step_tokens))
        self.report_interval_s = report_interval_s
        self.replicas: list[SimReplica] = []
        for i in range(replicas):
            noise = (
                None
                if noise_seed is None
                else StepNoise(model.residual_quantiles, noise_seed * 1_000 + i)
            )
            engine = VirtualEngine(
                model,
                limits,
                make_policy(policy, model, limits),
                policy,
                noise,
                step_overhead_s,
                hooks=self,
            )
            # Zero-padded: the router breaks ties in the given (endpoint) order.
            self.replicas.append(SimReplica(f"replica-{i:03d}", engine))
        self.stats = SimStats(policy=f"{policy}/{routing}x{replicas}", requests=0)
        self._arrivals: list[tuple[float, int, BenchRequest, float]] = []
        self._tickets: dict[int, _Ticket] = {}
        self._tried: dict[int, set[str]] = {}
        self._now = 0.0

    # -- the run -------------------------------------------------------------------------

    def run(self, requests: Sequence[BenchRequest]) -> SimResult:
        started = time.perf_counter()
        self.stats.requests = len(requests)
        for request in requests:
            if request.after is None:
                self.release(request, request.arrival_s)
            else:
                # Every engine knows every later round: whichever serves the round before
                # releases it (through the router), or fails it if that round failed.
                for replica in self.replicas:
                    replica.engine.follow(request)
        while True:
            engine_at, engine = self._next_engine()
            arrival_at = self._arrivals[0][0] if self._arrivals else None
            if arrival_at is None and engine is None:
                break
            if arrival_at is not None and (engine_at is None or arrival_at <= engine_at):
                self._now, _, request, sent_at = heapq.heappop(self._arrivals)
                self._route(request, sent_at)
            elif engine is not None and engine_at is not None:
                self._now = engine_at
                engine.advance()
        return self._result(requests, started)

    def _next_engine(self) -> tuple[float | None, VirtualEngine | None]:
        best: tuple[float | None, VirtualEngine | None] = (None, None)
        for replica in self.replicas:
            at = replica.engine.next_time()
            if at is not None and (best[0] is None or at < best[0]):
                best = (at, replica.engine)
        return best

    def _result(self, requests: Sequence[BenchRequest], started: float) -> SimResult:
        records: dict[int, RequestRecord] = {}
        for replica in self.replicas:
            replica.engine.finish_stats()
            records.update(replica.engine.records)
            self._add_stats(replica.engine.stats)
        self.stats.wall_s = time.perf_counter() - started
        missing = [r.index for r in requests if r.index not in records]
        if missing:
            raise SimulationError(f"requests {missing[:5]} never arrived: `after` out of order")
        return SimResult([records[r.index] for r in requests], self.stats)

    def _add_stats(self, engine: SimStats) -> None:
        s = self.stats
        s.steps += engine.steps
        s.virtual_s = max(s.virtual_s, engine.virtual_s)
        s.busy_s += engine.busy_s
        s.step_s.extend(engine.step_s)
        s.plan_s.extend(engine.plan_s)
        for kind, n in engine.preemptions.items():
            s.preemptions[kind] += n
        s.recomputed_tokens += engine.recomputed_tokens
        for kind, table in engine.counters.items():
            merged = s.counters.setdefault(kind, {})
            for key, n in table.items():
                merged[key] = merged.get(key, 0) + n

    # -- routing -------------------------------------------------------------------------

    def _route(self, request: BenchRequest, sent_at: float) -> None:
        """Sends `request` to the best-ranked replica it has not tried yet (there is one:
        `rejected` stops when every replica has said no). The TTFT budget routing sees is
        what is left of it, as the gateway passes on to a retry."""
        tried = self._tried.setdefault(request.index, set())
        for replica in self.replicas:
            replica.refresh(self._now, self.report_interval_s)
        fresh = [r for r in self.replicas if r.endpoint not in tried]
        budget = request.budgets.ttft_s - (self._now - sent_at)
        shape = RequestShape(request.prompt_tokens, budget)
        ranked = self.router.rank(fresh, shape, retry=bool(tried))
        replica = ranked[0]
        tried.add(replica.endpoint)
        ticket = _Ticket(replica, request.prompt_tokens, replica.epoch)
        ticket.open()
        self._tickets[request.index] = ticket
        replica.engine.submit(request, self._now, sent_at)

    # -- EngineHooks: what the engines report back -------------------------------------------

    def release(self, request: BenchRequest, at: float) -> None:
        heapq.heappush(self._arrivals, (at, request.index, request, at))

    def rejected(self, request: BenchRequest, sent_at: float, reason: str, now: float) -> bool:
        self._close(request)
        if len(self._tried.get(request.index, ())) >= len(self.replicas):
            return False  # every replica said no: the request is rejected
        self._now = now
        self._route(request, sent_at)
        return True

    def first_token(self, request: BenchRequest) -> None:
        ticket = self._tickets.get(request.index)
        if ticket is not None:
            ticket.first_token()

    def ended(self, request: BenchRequest) -> None:
        self._close(request)
        self._tried.pop(request.index, None)

    def _close(self, request: BenchRequest) -> None:
        ticket = self._tickets.pop(request.index, None)
        if ticket is not None:
            ticket.close()


def simulate_cluster(
    requests: Sequence[BenchRequest],
    model: StepTimeModel,
    limits: EngineLimits,
    replicas: int,
    routing: str = "slack",
    policy: str = "sloserve",
    *,
    noise_seed: int | None = None,
    step_overhead_s: float = 0.0,
) -> SimResult:
    """Runs `requests` through a fresh cluster of `replicas` engines behind `routing`."""
    cluster = VirtualCluster(
        model,
        limits,
        replicas,
        routing,
        policy,
        noise_seed=noise_seed,
        step_overhead_s=step_overhead_s,
    )
    return cluster.run(requests)

"""What one benchmark run achieved: per-class attainment, latencies, goodput, backlog drain.

Follows the methodology (docs/slo.md): §2 for what counts as a good request and how attainment
is computed, §3 for the backlog drain condition, §7 for trimming the warm-up and cool-down.
Everything is computed from client-side records (RequestRecord), on the client's clock.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sloserve.bench.types import RequestRecord
from sloserve.slo import judge

# §3: the backlog must drain within this long after the last request's deadline.
DRAIN_GRACE_S = 20.0
# §7: the first and last 10% of arrivals are warm-up and cool-down, not steady state.
TRIM_FRACTION = 0.1
# §3: capacity is judged at 90% attainment (99% reported too).
THRESHOLD = 0.9


@dataclass(frozen=True)
class Percentiles:
    """p50/p90/p99 of a sample (linear interpolation); None where the sample is empty."""

    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        if not values:
            return cls(None, None, None)
        p50, p90, p99 = (float(v) for v in np.percentile(np.asarray(values), [50, 90, 99]))
        return cls(p50, p90, p99)


@dataclass(frozen=True)
class ClassStats:
    """One SLO class in one run.

    Every arrived request falls in exactly one of good, late, rejected, best_effort, errors,
    incomplete, so they sum to `arrived` (a check that nothing is dropped or double-counted).
    Latencies cover requests served in the class (not rejected, not best effort) that produced
    tokens, late ones included: they describe what the class got, not only its successes.
    """

    slo_class: str
    arrived: int
    good: int
    attainment: float  # good / arrived
    late: int  # completed in class, but missed a deadline
    rejected: int
    rejected_by_reason: dict[str, int]
    best_effort: int  # served only as best effort: a miss for the class
    errors: int
    incomplete: int  # no full response, no error, not rejected (cancelled or still running)
    # Requests the server accepted under their SLO at arrival (later demotions included), and
    # the share of them that attained it: what admission promised and kept. None with none.
    admitted: int
    admitted_attainment: float | None
    mean_tpot_s: float | None  # mean over requests of each request's mean TPOT
    ttft_s: Percentiles
    inter_token_s: Percentiles  # every gap between consecutive tokens, pooled


@dataclass(frozen=True)
class BestEffortStats:
    """Traffic served as best effort, reported on its own (§2)."""

    requests: int
    completed: int
    completion_rate: float | None  # None when there was none
    mean_ttft_s: float | None
    output_tokens: int
    tokens_per_s: float  # over the run span


@dataclass(frozen=True)
class DrainCheck:
    """Whether the backlog drained within `grace_s` of the last deadline (§3).

    `last_deadline` is the latest final-token deadline of any request: normally the last
    request's, but a long request sent earlier can end later, and the backlog includes it.
    A rejected request leaves no backlog, so it counts as finished even without `finished_at`.
    """

    grace_s: float
    last_deadline: float | None
    last_finished: float | None
    lag_s: float | None  # last_finished - last_deadline
    unfinished: int
    drained: bool


@dataclass(frozen=True)
class RunStats:
    """Everything a run achieved; `meets` is the capacity search's pass/fail."""

    classes: dict[str, ClassStats]
    best_effort: BestEffortStats
    drain: DrainCheck
    records: int  # all records of the run
    trimmed: int  # left out as warm-up and cool-down
    analyzed: int  # records - trimmed
    trim_fraction: float
    # Arrival window of the analyzed requests: first to last sent_at. Rates over it compare
    # directly with the offered rate (goodput_rps / offered_rps = overall attainment).
    span_s: float
    offered_rps: float
    goodput_rps: float  # good requests per second
    goodput_tokens_per_s: float  # output tokens of good requests per second
    output_tokens_per_s: float  # all output tokens, good or not, best effort included
    overall_attainment: float | None

    @property
    def attainment(self) -> dict[str, float]:
        return {name: c.attainment for name, c in self.classes.items()}

    def meets(self, threshold: float = THRESHOLD) -> bool:
        """Every class reaches `threshold` and the backlog drained (§3).

        A run where no SLO request was analyzed proves nothing, so it does not pass.
        """
        if not self.classes:
            return False
        return self.drain.drained and all(c.attainment >= threshold for c in self.classes.values())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- deadlines and drain -------------------------------------------------------------------


def final_deadline(record: RequestRecord) -> float:
    """When the request's last token is due: TTFT deadline plus the planned tokens' TPOTs.

    Uses the nominal decode clock (starting at the TTFT deadline), per stage via Budgets.
    """
    request = record.request
    budgets = request.budgets
    decode = sum(budgets.tpot_for_token(k) for k in range(1, request.output_tokens))
    return record.sent_at + budgets.ttft_s + decode


def check_drain(records: Sequence[RequestRecord], grace_s: float = DRAIN_GRACE_S) -> DrainCheck:
    """The backlog drain condition of §3, over all records of a run (not trimmed ones)."""
    if not records:
        return DrainCheck(grace_s, None, None, None, unfinished=0, drained=True)
    last_deadline = max(final_deadline(r) for r in records)
    unfinished = sum(1 for r in records if r.finished_at is None and not r.rejected)
    finished = [r.finished_at for r in records if r.finished_at is not None]
    last_finished = max(finished) if finished else None
    lag = last_finished - last_deadline if last_finished is not None else None
    drained = unfinished == 0 and (lag is None or lag <= grace_s)
    return DrainCheck(grace_s, last_deadline, last_finished, lag, unfinished, drained)


# -- trimming ------------------------------------------------------------------------------


def trim(records: Sequence[RequestRecord], fraction: float = TRIM_FRACTION) -> list[RequestRecord]:
    """Drops the first and last `fraction` of arrivals (by sent_at): warm-up and cool-down.

    Rounds down per side, so small runs lose nothing rather than everything.
    """
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {fraction}")
    ordered = sorted(records, key=lambda r: (r.sent_at, r.request.index))
    cut = math.floor(len(ordered) * fraction + 1e-9)  # 1e-9: 0.29 * 100 is 28.999...
    return ordered[cut : len(ordered) - cut]


# -- per-request outcomes ------------------------------------------------------------------


def served_in_class(record: RequestRecord) -> bool:
    """Served under its SLO (neither turned away nor demoted to best effort)."""
    return not record.rejected and not record.best_effort


def admitted_at_arrival(record: RequestRecord) -> bool:
    """Accepted under its SLO when it arrived: not turned away, not best effort from the
    start (a later demotion still counts: the promise was made). A round never sent, its
    session having stopped, was never admitted."""
    if not record.sent or record.rejected:
        return False
    return record.demoted or not record.best_effort


def is_good(record: RequestRecord) -> bool:
    """§2: completed, served in its class, and every token on time (judge, 5% tolerance)."""
    if not (record.completed and served_in_class(record)) or record.error:
        return False
    return judge(record.sent_at, record.token_times, record.request.budgets).met


def outcome(record: RequestRecord) -> str:
    """The one bucket a request falls in; the order decides for records that fit several."""
    if record.rejected:
        return "rejected"
    if record.best_effort:
        return "best_effort"
    if record.error:
        return "error"
    if not record.completed:
        return "incomplete"
    return "good" if is_good(record) else "late"


def ttft_s(record: RequestRecord) -> float | None:
    return record.token_times[0] - record.sent_at if record.token_times else None


def mean_tpot_s(record: RequestRecord) -> float | None:
    """(last - first token) / (tokens - 1), the common tools' per-request TPOT."""
    times = record.token_times
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


def inter_token_s(record: RequestRecord) -> list[float]:
    return [b - a for a, b in itertools.pairwise(record.token_times)]


@dataclass
class LatencySamples:
    """Per-class latency samples, shared by the statistics and the plots."""

    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)  # one mean TPOT per request
    inter_token_s: list[float] = field(default_factory=list)


def latency_samples(records: Iterable[RequestRecord]) -> dict[str, LatencySamples]:
    """Latencies of requests served in their class, by class (see ClassStats)."""
    samples: dict[str, LatencySamples] = {}
    for record in records:
        if not served_in_class(record) or not record.token_times:
            continue
        s = samples.setdefault(record.request.slo_class, LatencySamples())
        s.ttft_s.append(record.token_times[0] - record.sent_at)
        tpot = mean_tpot_s(record)
        if tpot is not None:
            s.tpot_s.append(tpot)
        s.inter_token_s.extend(inter_token_s(record))
    return samples


# -- the run -------------------------------------------------------------------------------


def _class_stats(name: str, records: Sequence[RequestRecord], lat: LatencySamples) -> ClassStats:
    buckets = Counter(outcome(r) for r in records)
    reasons = Counter(r.reject_reason or "unspecified" for r in records if r.rejected)
    admitted = sum(1 for r in records if admitted_at_arrival(r))
    return ClassStats(
        slo_class=name,
        arrived=len(records),
        good=buckets["good"],
        attainment=buckets["good"] / len(records),
        late=buckets["late"],
        rejected=buckets["rejected"],
        rejected_by_reason=dict(sorted(reasons.items())),
        best_effort=buckets["best_effort"],
        errors=buckets["error"],
        incomplete=buckets["incomplete"],
        admitted=admitted,
        admitted_attainment=buckets["good"] / admitted if admitted else None,
        mean_tpot_s=float(np.mean(lat.tpot_s)) if lat.tpot_s else None,
        ttft_s=Percentiles.of(lat.ttft_s),
        inter_token_s=Percentiles.of(lat.inter_token_s),
    )


def _per_second(amount: float, span_s: float) -> float:
    return amount / span_s if span_s > 0 else 0.0


def _best_effort_stats(records: Sequence[RequestRecord], span_s: float) -> BestEffortStats:
    served = [r for r in records if r.best_effort]
    completed = sum(1 for r in served if r.completed and not r.error)
    ttfts = [t for t in map(ttft_s, served) if t is not None]
    tokens = sum(len(r.token_times) for r in served)
    return BestEffortStats(
        requests=len(served),
        completed=completed,
        completion_rate=completed / len(served) if served else None,
        mean_ttft_s=float(np.mean(ttfts)) if ttfts else None,
        output_tokens=tokens,
        tokens_per_s=_per_second(tokens, span_s),
    )


def analyze(
    records: Sequence[RequestRecord],
    trim_fraction: float = TRIM_FRACTION,
    drain_grace_s: float = DRAIN_GRACE_S,
) -> RunStats:
    """Statistics of one run (§2), over the arrivals left after trimming (§7).

    The drain check (§3) looks at every record: the backlog at the end of the run includes
    the cool-down requests that trimming leaves out of the statistics.
    """
    kept = trim(records, trim_fraction)
    span = kept[-1].sent_at - kept[0].sent_at if kept else 0.0
    by_class: dict[str, list[RequestRecord]] = {}
    for record in kept:
        by_class.setdefault(record.request.slo_class, []).append(record)
    lat = latency_samples(kept)
    classes = {
        name: _class_stats(name, by_class[name], lat.get(name, LatencySamples()))
        for name in sorted(by_class)
    }
    good = [r for r in kept if outcome(r) == "good"]
    return RunStats(
        classes=classes,
        best_effort=_best_effort_stats(kept, span),
        drain=check_drain(records, drain_grace_s),
        records=len(records),
        trimmed=len(records) - len(kept),
        analyzed=len(kept),
        trim_fraction=trim_fraction,
        span_s=span,
        offered_rps=_per_second(len(kept), span),
        goodput_rps=_per_second(len(good), span),
        goodput_tokens_per_s=_per_second(sum(len(r.token_times) for r in good), span),
        output_tokens_per_s=_per_second(sum(len(r.token_times) for r in kept), span),
        overall_attainment=len(good) / len(kept) if kept else None,
    )

"""Capacity: the highest arrival rate a system serves within SLO (docs/slo.md §3, §6).

`find_capacity` searches for it by running the benchmark at chosen rates; `fluid_bound` is the
physical limit from the step-time model that measured capacity is reported against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from sloserve.bench.analysis import THRESHOLD, RunStats
from sloserve.stepmodel import StepTimeModel

# How a search ended; see CapacityResult.status.
Status = Literal["converged", "below_min_rate", "no_failure", "out_of_trials"]
STRICT_THRESHOLD = 0.99  # §3: report 99% too
# Halvings below `low` before a search gives up and reports capacity 0.
DEFAULT_HALVINGS = 6


@dataclass(frozen=True)
class Trial:
    """One benchmark run of the search, at one arrival rate."""

    rate: float  # requests per second
    stats: RunStats
    passed: bool  # at the search's threshold


def capacity_from_trials(trials: list[Trial], threshold: float) -> float:
    """Highest rate that met `threshold` with no lower rate failing it; 0.0 when none did.

    Ignoring passes above a failure keeps a noisy pass from being reported as capacity. When
    outcomes are monotone in rate this is simply the highest passing rate.
    """
    failing = [t.rate for t in trials if not t.stats.meets(threshold)]
    ceiling = min(failing, default=float("inf"))
    passing = [t.rate for t in trials if t.rate < ceiling and t.stats.meets(threshold)]
    return max(passing, default=0.0)


@dataclass(frozen=True)
class CapacityResult:
    """The outcome of a capacity search, with every trial in the order it ran.

    status: "converged" (the pass/fail bracket is within `resolution`), "below_min_rate" (even
    the smallest rate tried failed: capacity 0), "no_failure" (no rate failed, so capacity is
    only a lower bound), "out_of_trials" (max_trials ran out with the bracket still wide).
    """

    capacity: float  # highest passing rate, req/s; 0.0 when none passed
    lowest_failing: float | None  # top of the bracket: the lowest rate that failed above it
    threshold: float
    resolution: float
    status: Status
    trials: list[Trial]
    # Capacity at 99% attainment, from the same trials: no extra runs, so it is only as fine as
    # the rates the 90% search happened to try below its own capacity.
    capacity_99: float

    @property
    def converged(self) -> bool:
        return self.status == "converged"

    def capacity_at(self, threshold: float) -> float:
        """Capacity at another attainment threshold, from the same trials."""
        return capacity_from_trials(self.trials, threshold)

    def to_json(self) -> dict[str, Any]:
        return {
            "capacity_rps": self.capacity,
            "lowest_failing_rps": self.lowest_failing,
            "threshold": self.threshold,
            "resolution": self.resolution,
            "status": self.status,
            "capacity_99_rps": self.capacity_99,
            "capacity_99_note": "from the same trials as the 90% search; no extra runs",
            "trials": [
                {"rate_rps": t.rate, "passed": t.passed, "stats": t.stats.to_json()}
                for t in self.trials
            ],
        }


class _Trials:
    """Runs trials within the budget, records them, reports progress."""

    def __init__(
        self,
        run_at: Callable[[float], RunStats],
        threshold: float,
        max_trials: int,
        progress: Callable[[str], None] | None,
    ) -> None:
        self.run_at = run_at
        self.threshold = threshold
        self.max_trials = max_trials
        self.progress = progress
        self.trials: list[Trial] = []

    @property
    def left(self) -> bool:
        return len(self.trials) < self.max_trials

    def passes(self, rate: float) -> bool:
        stats = self.run_at(rate)
        trial = Trial(rate=rate, stats=stats, passed=stats.meets(self.threshold))
        self.trials.append(trial)
        if self.progress is not None:
            self.progress(_describe(len(self.trials), self.max_trials, trial))
        return trial.passed


def _describe(number: int, total: int, trial: Trial) -> str:
    verdict = "pass" if trial.passed else "FAIL"
    classes = " ".join(f"{name}={a:.1%}" for name, a in trial.stats.attainment.items())
    drained = "drained" if trial.stats.drain.drained else "NOT drained"
    return f"trial {number}/{total}: {trial.rate:.4g} req/s {verdict} ({classes}; {drained})"


# A bracket: (highest passing rate or None, lowest failing rate above it or None).
_Bracket = tuple[float | None, float | None]


def _grow(trials: _Trials, passing: float, factor: float) -> _Bracket:
    """Multiplies a passing rate by `factor` until one fails (or the trials run out)."""
    rate = passing * factor
    while trials.left:
        if not trials.passes(rate):
            return passing, rate
        passing, rate = rate, rate * factor
    return passing, None


def _shrink(trials: _Trials, failing: float, min_rate: float) -> _Bracket:
    """Halves from a failing rate until one passes, down to `min_rate`."""
    rate = failing / 2
    while trials.left and rate >= min_rate:
        if trials.passes(rate):
            return rate, failing
        failing, rate = rate, rate / 2
    return None, failing


def _bracket(
    trials: _Trials, low: float, high: float | None, min_rate: float, growth: float
) -> _Bracket:
    if not trials.passes(low):
        return _shrink(trials, low, min_rate)
    if high is None:
        return _grow(trials, low, growth)
    if not trials.left:
        return low, None
    return (low, high) if not trials.passes(high) else (high, None)


def _narrow(lo: float, hi: float, resolution: float) -> bool:
    return (hi - lo) / lo <= resolution


def _bisect(trials: _Trials, lo: float, hi: float, resolution: float) -> tuple[float, float]:
    """Halves the bracket until it is within `resolution` of its lower end."""
    while not _narrow(lo, hi, resolution) and trials.left:
        mid = (lo + hi) / 2
        if trials.passes(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def _status(lo: float | None, hi: float | None, resolution: float, min_rate: float) -> Status:
    if hi is None:
        return "no_failure"
    if lo is None:
        return "below_min_rate" if hi / 2 < min_rate else "out_of_trials"
    return "converged" if _narrow(lo, hi, resolution) else "out_of_trials"


def find_capacity(
    run_at: Callable[[float], RunStats],
    low: float,
    high: float | None = None,
    resolution: float = 0.025,
    threshold: float = THRESHOLD,
    max_trials: int = 20,
    progress: Callable[[str], None] | None = None,
    min_rate: float | None = None,
    growth: float = 2.0,
) -> CapacityResult:
    """Highest arrival rate whose run meets `threshold` in every class and drains (§3).

    Brackets the capacity first: from `low`, multiplying by `growth` until a rate fails when
    `high` is None (a smaller factor costs more steps up but fewer bisections after), else
    trying `high`; if `low` itself fails, halving until a rate passes or falls below
    `min_rate` (default: `low` / 64), where it gives up with capacity 0. Then bisects until
    (hi - lo) / lo <= `resolution`. The reported capacity is always a rate that passed.
    `max_trials` caps the runs; `status` says whether the search got where it meant to.
    """
    if low <= 0:
        raise ValueError(f"low must be positive, got {low}")
    if high is not None and high <= low:
        raise ValueError(f"high ({high}) must be above low ({low})")
    if resolution <= 0 or max_trials < 1:
        raise ValueError("resolution must be positive and max_trials at least 1")
    if growth <= 1:
        raise ValueError(f"growth must be above 1, got {growth}")
    floor = low / 2**DEFAULT_HALVINGS if min_rate is None else min_rate
    trials = _Trials(run_at, threshold, max_trials, progress)
    lo, hi = _bracket(trials, low, high, floor, growth)
    if lo is not None and hi is not None:
        lo, hi = _bisect(trials, lo, hi, resolution)
    return CapacityResult(
        capacity=lo if lo is not None else 0.0,
        lowest_failing=hi,
        threshold=threshold,
        resolution=resolution,
        status=_status(lo, hi, resolution, floor),
        trials=trials.trials,
        capacity_99=capacity_from_trials(trials.trials, STRICT_THRESHOLD),
    )


def fluid_bound(
    model: StepTimeModel,
    mean_prompt_tokens: float,
    mean_output_tokens: float,
    tightest_tpot_s: float,
    max_batch: int,
    mean_context_tokens: float,
) -> float:
    """Largest arrival rate (req/s) whose token work fits in steps of the tightest TPOT (§6).

    Derivation, in the fluid (no variance) limit. Let lambda be the arrival rate, P and O the
    mean prompt and output tokens, tau the tightest TPOT, B the batch limit, C the mean context
    (KV tokens) of a running request.

    1. Every running request of the tightest class needs a token every tau, and it rides in
       every step, so no step may take longer than tau; at the limit each step takes tau.
    2. Little's law: a request decodes for O steps, O * tau seconds, so N = lambda * O * tau
       requests run at once, reading N * C context tokens per step; N <= B.
    3. Work arrives at lambda * (P + O) tokens per second, so each step must compute
       n = lambda * (P + O) * tau tokens: n <= model.tokens_within(tau, N, N * C).
    4. The model is a max of affine pieces a + b*n + c*N + d*context, so step 3 holds iff every
       piece stays within tau. Substituting n and N, each piece is linear in lambda:
           a + lambda * tau * (b * (P + O) + O * (c + d * C)) <= tau
           lambda <= (tau - a) / (tau * (b * (P + O) + O * (c + d * C)))
       and step 2 gives lambda <= B / (O * tau). The bound is the smallest of these; 0 when an
       empty step (a) already takes tau.

    It is an upper bound: it leaves out the time a request waits and prefills (which would
    raise N), rounding to whole tokens and requests, scheduling overhead and burstiness.
    """
    if tightest_tpot_s <= 0 or mean_output_tokens <= 0 or max_batch < 1:
        raise ValueError("TPOT, output tokens and max_batch must be positive")
    if mean_prompt_tokens < 0 or mean_context_tokens < 0:
        raise ValueError("prompt and context tokens must not be negative")
    tau, out = tightest_tpot_s, mean_output_tokens
    work = mean_prompt_tokens + out
    bound = max_batch / (out * tau)
    for a, b, c, d in model.pieces:
        if a >= tau:
            return 0.0
        per_rate = tau * (b * work + out * (c + d * mean_context_tokens))
        if per_rate > 0:
            bound = min(bound, (tau - a) / per_rate)
    return bound

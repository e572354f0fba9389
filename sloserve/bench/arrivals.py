"""Arrival processes for benchmark workloads: Poisson, Gamma renewal, and the burst test.

Follows the methodology (docs/slo.md §3). Arrivals are generated at unit rate (one request per
second) and divided by the rate, which is §3's "scale a trace's timestamps" rule applied to the
synthetic processes too: the same seed at another rate gives the same offsets, rescaled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Draws per call when generating arrivals until a duration: fixed, so the draws consumed do not
# depend on the rate (numpy's generators give the same sequence however the draws are batched,
# but a fixed size keeps that from mattering at all).
_BATCH = 1024


GapSampler = Callable[[np.random.Generator, int], np.ndarray]


def exponential_gaps(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_exponential(n)


def gamma_sampler(cv: float) -> GapSampler:
    """Gaps of mean 1 and coefficient of variation `cv`: shape 1/cv^2, scale cv^2."""
    if not cv > 0:
        raise ValueError(f"cv must be positive, got {cv}")
    shape, scale = 1.0 / cv**2, cv**2

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.gamma(shape, scale, n)

    return sample


def _check_span(rate: float, count: int | None, duration_s: float | None) -> None:
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if (count is None) == (duration_s is None):
        raise ValueError("give exactly one of count and duration_s")
    if count is not None and count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    if duration_s is not None and duration_s < 0:
        raise ValueError(f"duration_s must not be negative, got {duration_s}")


def unit_offsets(rng: np.random.Generator, count: int, gaps: GapSampler) -> list[float]:
    """`count` arrivals of a renewal process of mean rate 1, the first at 0.

    The first request arrives at 0 so that a run starts with its first request, as a trace
    re-based on its first row does.
    """
    if count == 0:
        return []
    offsets = np.concatenate(([0.0], np.cumsum(gaps(rng, count - 1))))
    return [float(t) for t in offsets]


def _unit_offsets_until(rng: np.random.Generator, end: float, gaps: GapSampler) -> list[float]:
    """Arrivals of a renewal process of mean rate 1 in [0, end), the first at 0."""
    if end <= 0:
        return []
    offsets = [0.0]
    while True:
        for t in offsets[-1] + np.cumsum(gaps(rng, _BATCH)):
            if t >= end:
                return offsets
            offsets.append(float(t))


def _renewal(
    rate: float, count: int | None, duration_s: float | None, seed: int, gaps: GapSampler
) -> list[float]:
    _check_span(rate, count, duration_s)
    rng = np.random.default_rng(seed)
    if count is not None:
        return [t / rate for t in unit_offsets(rng, count, gaps)]
    assert duration_s is not None
    return [t / rate for t in _unit_offsets_until(rng, duration_s * rate, gaps)]


def poisson_arrivals(
    rate: float, *, count: int | None = None, duration_s: float | None = None, seed: int = 0
) -> list[float]:
    """Sorted arrival offsets (s) of a Poisson process of `rate` requests/s.

    Give `count` (that many arrivals) or `duration_s` (all arrivals before it). The first
    arrival is at 0. The same seed at another rate gives the same offsets scaled by the ratio.
    """
    return _renewal(rate, count, duration_s, seed, exponential_gaps)


def gamma_arrivals(
    rate: float,
    *,
    cv: float,
    count: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
) -> list[float]:
    """Sorted arrival offsets (s) of a Gamma renewal process of mean `rate` requests/s.

    `cv` is the gaps' coefficient of variation: 1 is Poisson, above 1 is bursty (many short
    gaps, a few long ones), which is how production traces such as Azure's code trace look.
    """
    return _renewal(rate, count, duration_s, seed, gamma_sampler(cv))


@dataclass(frozen=True)
class Burst:
    """The methodology's burst test: the rate times `factor` for `duration_s` mid-run.

    The burst is a time warp of a steady process: inside the window, time runs `factor` times
    faster, so any arrival stream (Poisson, Gamma, a trace) keeps its own shape and gets
    exactly `factor` times its rate there. `start_s` None centres the window in the run.
    """

    factor: float = 2.0
    # Methodology: doubled for 30-60 s; 45 s is the middle of that range.
    duration_s: float = 45.0
    start_s: float | None = None

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"burst factor must be positive, got {self.factor}")
        if not self.duration_s > 0:
            raise ValueError(f"burst duration must be positive, got {self.duration_s}")
        if self.start_s is not None and self.start_s < 0:
            raise ValueError(f"burst start must not be negative, got {self.start_s}")

    def window_in_run(self, run_s: float) -> tuple[float, float]:
        """(start, length) of the window in a run of `run_s` seconds (real time).

        A centred window takes at most half the run, so a short run still has steady parts
        on both sides to compare with.
        """
        if self.start_s is not None:
            return self.start_s, self.duration_s
        length = min(self.duration_s, run_s / 2)
        return (run_s - length) / 2, length

    def window_for_base(self, base_end_s: float) -> tuple[float, float]:
        """(start, length) of the window for a steady stream whose last arrival is at
        `base_end_s`: the warp shortens the run, so the centre is found in the warped run."""
        if self.start_s is not None:
            return self.start_s, self.duration_s
        # The warped run lasts base_end - (factor - 1) * length; the window takes at most half.
        length = min(self.duration_s, base_end_s / (self.factor + 1))
        run_s = base_end_s - (self.factor - 1) * length
        return (run_s - length) / 2, length

    def warp(self, offsets: Sequence[float], window: tuple[float, float]) -> list[float]:
        """Maps steady arrival offsets to bursty ones; monotone, identity before the window."""
        start, length = window
        fast_end = start + self.factor * length  # base time the window's end maps from
        shift = (self.factor - 1) * length
        return [
            t if t <= start else start + (t - start) / self.factor if t <= fast_end else t - shift
            for t in offsets
        ]

    def describe(self, window: tuple[float, float]) -> dict[str, float]:
        return {"factor": self.factor, "start_s": window[0], "duration_s": window[1]}


def burst_arrivals(
    rate: float,
    *,
    count: int | None = None,
    duration_s: float | None = None,
    seed: int = 0,
    burst: Burst | None = None,
    cv: float = 1.0,
) -> list[float]:
    """Sorted arrival offsets (s): a steady process of `rate` whose rate is multiplied by
    `burst.factor` for `burst.duration_s` in the middle of the run (methodology: burst test).

    The steady process is Poisson (`cv` 1) or Gamma (`cv` other than 1).
    """
    _check_span(rate, count, duration_s)
    burst = burst or Burst()
    gaps = exponential_gaps if cv == 1.0 else gamma_sampler(cv)
    rng = np.random.default_rng(seed)
    if count is not None:
        base = [t / rate for t in unit_offsets(rng, count, gaps)]
        return burst.warp(base, burst.window_for_base(base[-1] if base else 0.0))
    assert duration_s is not None
    window = burst.window_in_run(duration_s)
    # The warp squeezes (factor - 1) * length seconds out of the run: generate that much more.
    base_end = duration_s + max(0.0, (burst.factor - 1) * window[1])
    base = [t / rate for t in _unit_offsets_until(rng, base_end * rate, gaps)]
    return [t for t in burst.warp(base, window) if t < duration_s]

"""A straight line fitted online to how long decode-only steps really take.

The step-time model is fitted mostly on prefill-heavy steps. Decode-only steps run faster than
it predicts for large batches (weights are read once for the whole batch) and slower for a
request or two (the engine loop's fixed cost weighs more). A single ratio learned at one batch
size misjudges the others: learned at low load, it turns away tight-TPOT requests a larger
batch would serve. So admission asks this line: actual = intercept + slope x predicted, fitted
by exponentially weighted least squares over the recent decode-only steps.
"""

from __future__ import annotations

from dataclasses import dataclass

# Each new step's weight against the past: about the last 1 / (1 - DECAY) = 50 steps count.
DECAY = 0.98
# Below this spread of predicted times (relative to their mean) the slope is not identified:
# the line keeps slope 1 and learns only the offset.
MIN_RELATIVE_SPREAD = 0.1
SLOPE_RANGE = (0.5, 2.0)


@dataclass
class LiveLine:
    intercept_s: float = 0.0
    slope: float = 1.0
    _n: float = 0.0
    _x: float = 0.0
    _y: float = 0.0
    _xx: float = 0.0
    _xy: float = 0.0

    def observe(self, predicted_s: float, actual_s: float) -> None:
        self._n = DECAY * self._n + 1.0
        self._x = DECAY * self._x + predicted_s
        self._y = DECAY * self._y + actual_s
        self._xx = DECAY * self._xx + predicted_s * predicted_s
        self._xy = DECAY * self._xy + predicted_s * actual_s
        mean_x, mean_y = self._x / self._n, self._y / self._n
        variance = self._xx / self._n - mean_x * mean_x
        slope = 1.0
        if variance > (MIN_RELATIVE_SPREAD * mean_x) ** 2:
            covariance = self._xy / self._n - mean_x * mean_y
            slope = min(max(covariance / variance, SLOPE_RANGE[0]), SLOPE_RANGE[1])
        self.slope = slope
        self.intercept_s = mean_y - slope * mean_x

    def __call__(self, predicted_s: float) -> float:
        """Expected actual time of a decode-only step the model predicts at `predicted_s`."""
        return self.intercept_s + self.slope * predicted_s

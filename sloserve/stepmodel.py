"""A model of how long one engine step takes, fitted from measured steps.

A step's time is the max of a few linear pieces over its shape:

    T(step) = max_p  a_p + b_p * tokens + c_p * requests + d_p * context_tokens

`tokens` are the tokens computed in the step (prefill chunks plus one per decoding request),
`requests` the requests in the batch, `context_tokens` the KV tokens the step's attention reads
(each request's computed tokens plus its new ones). One piece is the memory-bound floor
(weights read once per step), another the compute-bound slope past the knee; the max of
affine pieces is convex and monotone, so the inverse (tokens that fit a budget) is exact.

The fit is max-affine regression (assign each step to the piece that predicts it highest,
refit each piece by least squares with non-negative slopes, repeat), scored on held-out steps.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "sloserve-step-profile/v1"
FEATURES = ("intercept", "tokens", "requests", "context_tokens")
# Relative-residual quantiles kept in a profile, for the planner's safety margin.
RESIDUAL_QUANTILES = (0.5, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class StepShape:
    tokens: int
    requests: int
    context_tokens: int

    def features(self) -> tuple[float, float, float, float]:
        return (1.0, float(self.tokens), float(self.requests), float(self.context_tokens))


@dataclass(frozen=True)
class StepSample:
    shape: StepShape
    seconds: float


@dataclass(frozen=True)
class FitQuality:
    r2: float  # on held-out steps
    mape: float  # mean absolute percentage error on held-out steps, in percent
    train_steps: int
    heldout_steps: int


@dataclass
class StepTimeModel:
    """Coefficients of each piece, in FEATURES order, seconds per unit."""

    pieces: list[tuple[float, float, float, float]]
    # Relative residuals (actual / predicted - 1) at RESIDUAL_QUANTILES, from held-out steps.
    residual_quantiles: dict[str, float] = field(default_factory=dict)
    quality: FitQuality | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- prediction ----------------------------------------------------------------------

    def predict(self, shape: StepShape) -> float:
        """Seconds the step takes."""
        x = shape.features()
        return max(sum(c * v for c, v in zip(piece, x, strict=True)) for piece in self.pieces)

    def safety_factor(self, quantile: str = "p99") -> float:
        """Multiply a prediction by this to cover the given residual quantile."""
        return 1.0 + max(0.0, self.residual_quantiles.get(quantile, 0.0))

    def tokens_within(
        self, budget_s: float, requests: int, context_tokens: int, cap: int = 1 << 20
    ) -> int:
        """Most tokens a step of `requests` and `context_tokens` can compute in `budget_s`.

        Exact for this model: every piece is non-decreasing in tokens, so the max is too.
        Returns 0 when even an empty step overruns the budget; `cap` bounds flat models.
        """
        best = cap
        for a, b, c, d in self.pieces:
            room = budget_s - a - c * requests - d * context_tokens
            if room < 0:
                return 0
            if b > 0:
                best = min(best, math.floor(room / b))
        return max(0, best)

    def prefill_s(self, prompt_tokens: int, chunk_tokens: int = 2048) -> float:
        """Zero-load time to prefill a prompt alone, in chunks of `chunk_tokens`."""
        done, total = 0, 0.0
        while done < prompt_tokens:
            n = min(chunk_tokens, prompt_tokens - done)
            total += self.predict(StepShape(tokens=n, requests=1, context_tokens=done + n))
            done += n
        return total

    @property
    def on_cpu(self) -> bool:
        """Whether the profile describes a CPU engine (its `hardware` names a CPU)."""
        return "cpu" in str(self.metadata.get("hardware", "")).lower()

    def idle_decode_s(self, context_tokens: int = 0) -> float:
        """Time of a decode step for one request: the floor every TPOT must clear."""
        return self.predict(StepShape(tokens=1, requests=1, context_tokens=context_tokens + 1))

    # -- persistence ---------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            **self.metadata,
            "features": list(FEATURES),
            "pieces": [list(p) for p in self.pieces],
            "fit": asdict(self.quality) if self.quality else None,
            "residual_quantiles": self.residual_quantiles,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepTimeModel:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a step profile ({FORMAT}): format={data.get('format')!r}")
        if list(data["features"]) != list(FEATURES):
            raise ValueError(f"unsupported features {data['features']}")
        pieces = [(float(a), float(b), float(c), float(d)) for a, b, c, d in data["pieces"]]
        if not pieces:
            raise ValueError("a step profile needs at least one piece")
        known = {"format", "features", "pieces", "fit", "residual_quantiles"}
        return cls(
            pieces=pieces,
            residual_quantiles={k: float(v) for k, v in data.get("residual_quantiles", {}).items()},
            quality=FitQuality(**data["fit"]) if data.get("fit") else None,
            metadata={k: v for k, v in data.items() if k not in known},
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> StepTimeModel:
        return cls.from_json(json.loads(path.read_text()))


def shipped_profile_path(name: str) -> Path:
    """Where the profile shipped as NAME is (sloserve/profiles/NAME.json)."""
    path = Path(__file__).with_name("profiles") / f"{name}.json"
    if not path.exists():
        names = sorted(p.stem for p in path.parent.glob("*.json"))
        raise FileNotFoundError(f"no shipped profile {name!r}; shipped: {names}")
    return path


def shipped_profile(name: str) -> StepTimeModel:
    """A profile shipped with sloserve (sloserve/profiles/NAME.json)."""
    return StepTimeModel.load(shipped_profile_path(name))


# -- fitting -------------------------------------------------------------------------------


def _fit_nonnegative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative slopes (the intercept is free).

    A negative slope would make a bigger step predict faster, which breaks the inverse; drop
    the most negative feature and refit until none is left (a small active-set NNLS).
    """
    active = list(range(x.shape[1]))
    while True:
        coef_active, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        coef = np.zeros(x.shape[1])
        coef[active] = coef_active
        negative = [(coef[j], j) for j in active if j != 0 and coef[j] < 0]
        if not negative:
            return coef
        active.remove(min(negative)[1])


def _max_affine(x: np.ndarray, y: np.ndarray, pieces: int, iterations: int = 50) -> np.ndarray:
    """Max-affine regression: alternate assignment and per-piece least squares."""
    # Start by splitting the steps by token count: the pieces are regimes of step size.
    order = np.argsort(x[:, 1], kind="stable")
    assignment = np.empty(len(y), dtype=int)
    for p, chunk in enumerate(np.array_split(order, pieces)):
        assignment[chunk] = p
    coefs = np.zeros((pieces, x.shape[1]))
    for _ in range(iterations):
        for p in range(pieces):
            mask = assignment == p
            if mask.sum() >= x.shape[1]:
                coefs[p] = _fit_nonnegative(x[mask], y[mask])
        new_assignment = np.argmax(x @ coefs.T, axis=1)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
    # Drop pieces that never win: they add nothing but risk.
    winners = sorted(set(np.argmax(x @ coefs.T, axis=1).tolist()))
    return coefs[winners]


def _scores(
    model: StepTimeModel, samples: Sequence[StepSample]
) -> tuple[float, float, list[float]]:
    actual = np.array([s.seconds for s in samples])
    predicted = np.array([model.predict(s.shape) for s in samples])
    ss_res = float(np.sum((actual - predicted) ** 2))
    ss_tot = float(np.sum((actual - actual.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    relative = actual / predicted - 1.0
    mape = float(np.mean(np.abs(actual - predicted) / actual) * 100)
    return r2, mape, relative.tolist()


def fit(
    samples: Iterable[StepSample],
    max_pieces: int = 3,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
) -> StepTimeModel:
    """Fits the step-time model; picks the number of pieces by held-out error."""
    data = [s for s in samples if s.seconds > 0 and s.shape.tokens > 0]
    if len(data) < 10:
        raise ValueError(f"need at least 10 measured steps to fit, got {len(data)}")
    random.Random(seed).shuffle(data)
    n_heldout = max(2, int(len(data) * heldout_fraction))
    heldout, train = data[:n_heldout], data[n_heldout:]
    x = np.array([s.shape.features() for s in train])
    y = np.array([s.seconds for s in train])

    best: tuple[float, StepTimeModel] | None = None
    for pieces in range(1, max_pieces + 1):
        coefs = _max_affine(x, y, pieces)
        candidate = StepTimeModel(pieces=[tuple(map(float, c)) for c in coefs])  # type: ignore[misc]
        _, mape, _ = _scores(candidate, heldout)
        # A further piece must earn its keep: at least 1 point of MAPE.
        if best is None or mape < best[0] - 1.0:
            best = (mape, candidate)
    assert best is not None
    model = best[1]
    r2, mape, relative = _scores(model, heldout)
    model.quality = FitQuality(r2=r2, mape=mape, train_steps=len(train), heldout_steps=len(heldout))
    model.residual_quantiles = {
        f"p{round(q * 100)}": float(np.quantile(relative, q)) for q in RESIDUAL_QUANTILES
    }
    model.metadata = dict(metadata or {})
    return model

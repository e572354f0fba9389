"""Helpers shared by the benchmark tests (arrivals, traces, scenarios, capacity searches)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sloserve.bench.analysis import BestEffortStats, ClassStats, DrainCheck, Percentiles, RunStats

# The real Azure traces, when the steering repo's shared/ sits beside the checkout.
REAL_TRACES = Path(
    os.environ.get("SLOSERVE_TRACE_DIR", Path(__file__).resolve().parents[2] / "shared" / "traces")
)


def gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.array(offsets))


def cv(values: np.ndarray) -> float:
    return float(np.std(values) / np.mean(values))


def write_trace(path: Path, rows: list[tuple[str, int, int]]) -> Path:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens", *(f"{t},{p},{o}" for t, p, o in rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


NO_LATENCY = Percentiles(None, None, None)


def fake_stats(attainment: dict[str, float], drained: bool = True) -> RunStats:
    """RunStats with the given per-class attainment (out of 1000 requests each)."""
    classes = {
        name: ClassStats(
            slo_class=name,
            arrived=1000,
            good=round(a * 1000),
            attainment=a,
            late=1000 - round(a * 1000),
            rejected=0,
            rejected_by_reason={},
            best_effort=0,
            errors=0,
            incomplete=0,
            admitted=1000,
            admitted_attainment=a,
            mean_tpot_s=None,
            ttft_s=NO_LATENCY,
            inter_token_s=NO_LATENCY,
        )
        for name, a in attainment.items()
    }
    return RunStats(
        classes=classes,
        best_effort=BestEffortStats(0, 0, None, None, 0, 0.0),
        drain=DrainCheck(20.0, 0.0, 0.0, 0.0, unfinished=0 if drained else 1, drained=drained),
        records=1000,
        trimmed=0,
        analyzed=1000,
        trim_fraction=0.0,
        span_s=100.0,
        offered_rps=10.0,
        goodput_rps=10.0,
        goodput_tokens_per_s=100.0,
        output_tokens_per_s=100.0,
        overall_attainment=min(attainment.values(), default=None),
    )

"""Helpers shared by the benchmark workload tests (arrivals, traces, scenarios)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

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

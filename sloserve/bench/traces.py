"""Trace replay for benchmark workloads: reading Azure LLM inference traces, windows, rates,
and finding a trace's bursts.

Follows the methodology (docs/slo.md §3): a trace's timestamps are re-based on its first row
and scaled to the rate under test, which keeps the trace's burst shape.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np

CONV_TRACE = "azure-llm-2023-conv.csv"
CODE_TRACE = "azure-llm-2023-code.csv"


@dataclass(frozen=True)
class TraceRow:
    """One request of a trace: arrival offset from the trace's first request, and lengths."""

    offset_s: float
    prompt_tokens: int
    output_tokens: int


_TIMESTAMP = re.compile(
    r"^(?P<main>\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})"
    r"(?:[.,](?P<frac>\d{1,9}))?"
    r"\s*(?P<tz>Z|[+-]\d{2}:?\d{2})?$"
)
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")


def parse_timestamp_ns(text: str) -> int:
    """Nanoseconds since the epoch of a trace timestamp.

    Accepts "2023-11-16 18:15:46.6805900" (the Azure format: 7 fractional digits, more than
    datetime keeps), ISO forms with 'T' and a zone, and plain seconds ("1700158546.68").
    Naive times count as UTC: only differences matter. Integer nanoseconds keep the
    trace's 100 ns resolution, which a float of epoch seconds (ulp ~0.2 us) would blur.
    """
    text = text.strip()
    if _NUMBER.match(text):
        whole, _, frac = text.partition(".")
        return int(whole) * 1_000_000_000 + _fraction_ns(frac)
    match = _TIMESTAMP.match(text)
    if not match:
        raise ValueError(f"unrecognised timestamp {text!r}")
    moment = datetime.fromisoformat(match["main"].replace("T", " "))
    moment = moment.replace(tzinfo=_zone(match["tz"]))
    return int(moment.timestamp()) * 1_000_000_000 + _fraction_ns(match["frac"] or "")


def _fraction_ns(digits: str) -> int:
    return int(digits[:9].ljust(9, "0")) if digits else 0


def _zone(text: str | None) -> timezone:
    if not text or text == "Z":
        return UTC
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[-2:])
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


_COLUMNS = {"timestamp": "TIMESTAMP", "prompt": "ContextTokens", "output": "GeneratedTokens"}


def load_trace(path: Path) -> list[TraceRow]:
    """Reads an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens).

    Rows come back sorted by arrival (stable for ties), with offsets relative to the earliest
    (the first row of a sorted trace).
    Header names match case-insensitively. A malformed row raises ValueError naming its line.
    """
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty trace")
        columns = _column_positions(path, header)
        stamped = [
            _parse_row(path, line, row, columns)
            for line, row in enumerate(reader, start=2)
            if any(cell.strip() for cell in row)  # tolerate blank lines
        ]
    if not stamped:
        raise ValueError(f"{path}: trace has no rows")
    stamped.sort(key=lambda r: r[0])
    first = stamped[0][0]
    return [TraceRow((ns - first) / 1e9, prompt, output) for ns, prompt, output in stamped]


def _column_positions(path: Path, header: list[str]) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    missing = [col for col in _COLUMNS.values() if col.lower() not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
    return {key: names.index(col.lower()) for key, col in _COLUMNS.items()}


def _parse_row(
    path: Path, line: int, row: list[str], columns: dict[str, int]
) -> tuple[int, int, int]:
    try:
        ns = parse_timestamp_ns(row[columns["timestamp"]])
        prompt = int(row[columns["prompt"]])
        output = int(row[columns["output"]])
    except (IndexError, ValueError) as e:
        raise ValueError(f"{path}:{line}: bad trace row {row}: {e}") from e
    if prompt < 0 or output < 0:
        raise ValueError(f"{path}:{line}: negative token count in {row}")
    return ns, prompt, output


def trace_window(
    rows: Sequence[TraceRow], *, start_s: float = 0.0, count: int | None = None
) -> list[TraceRow]:
    """The `count` rows (all when None) arriving at or after `start_s`, re-based to 0."""
    chosen = [r for r in rows if r.offset_s >= start_s]
    if count is not None:
        if count > len(chosen):
            raise ValueError(f"window wants {count} rows, only {len(chosen)} from {start_s} s")
        chosen = chosen[:count]
    if not chosen:
        return []
    first = chosen[0].offset_s
    return [replace(r, offset_s=r.offset_s - first) for r in chosen]


def observed_rate(rows: Sequence[TraceRow]) -> float:
    """Mean arrival rate (requests/s) over the rows: gaps / span, from first to last row."""
    if len(rows) < 2:
        raise ValueError("a rate needs at least 2 rows")
    span = rows[-1].offset_s - rows[0].offset_s
    if not span > 0:
        raise ValueError("all rows arrive at once: no rate")
    return (len(rows) - 1) / span


def scale_to_rate(rows: Sequence[TraceRow], rate: float) -> list[TraceRow]:
    """The rows with timestamps scaled so their mean rate is `rate` (burst shape kept)."""
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    factor = observed_rate(rows) / rate
    return [replace(r, offset_s=r.offset_s * factor) for r in rows]


# The stretch of trace time a burst is measured over: the methodology's burst lasts 30-60 s.
BURST_SPAN_S = 30.0


@dataclass(frozen=True)
class TraceBurst:
    """A stretch of `span_s` trace seconds from row `first_row`, holding `rows` arrivals."""

    first_row: int
    offset_s: float
    span_s: float
    rows: int

    @property
    def centre_s(self) -> float:
        return self.offset_s + self.span_s / 2


def densest_stretches(
    rows: Sequence[TraceRow], *, span_s: float = BURST_SPAN_S, limit: int = 5
) -> list[TraceBurst]:
    """The `limit` stretches of `span_s` seconds that hold the most arrivals, densest first.

    Each stretch starts at a row; no two chosen stretches overlap (a burst is found once, not
    once per row inside it). Ties go to the earlier stretch.
    """
    if not span_s > 0 or limit < 1:
        raise ValueError(f"need span_s > 0 and limit >= 1, got {span_s}, {limit}")
    times = np.array([r.offset_s for r in rows])
    held = np.searchsorted(times, times + span_s, side="left") - np.arange(len(times))
    chosen: list[TraceBurst] = []
    for i in np.argsort(-held, kind="stable"):
        start = float(times[i])
        if all(abs(start - c.offset_s) >= span_s for c in chosen):
            chosen.append(TraceBurst(int(i), start, span_s, int(held[i])))
            if len(chosen) == limit:
                break
    return chosen


def window_around(rows: Sequence[TraceRow], centre_s: float, count: int) -> int:
    """The first row of the `count` consecutive rows whose time span is centred nearest
    `centre_s`: in time, not in rows, so a dense burst is not pushed to one side."""
    if not 1 <= count <= len(rows):
        raise ValueError(f"a window of {count} rows from a trace of {len(rows)}")
    times = np.array([r.offset_s for r in rows])
    middles = (times[: len(times) - count + 1] + times[count - 1 :]) / 2
    return int(np.argmin(np.abs(middles - centre_s)))

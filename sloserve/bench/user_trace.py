"""Reading a trace a user brings: the benchmark's own JSONL and CSV request-log format.

One request per JSONL line (an object) or CSV row (under a header row naming the fields):

- `arrival` (required): seconds from the start (a number), or a timestamp (ISO 8601, or the
  Azure traces' "2023-11-16 18:15:46.6805900"; naive times count as UTC). One kind per file.
- `input_tokens`, `output_tokens` (required): prompt length and true output length, whole
  numbers >= 1.
- `class`: one of the known SLO classes; absent or empty: the default class.
- `session`: rounds of one conversation share it; each later round is sent when the round
  before it has completed.
- `prefix_hash`: requests with the same value share a prompt prefix; `prefix_tokens` (only
  with it): how many leading prompt tokens (default: as many as the shortest prompt of that
  hash has).
- `thinking_tokens` (class `reasoning` only): leading output tokens judged at the thinking
  TPOT.

Arrivals are re-based on the earliest one; rows may come in any order (they are sorted by
arrival, ties in file order). A field this format does not know is an error, so a misspelt
optional field cannot be silently ignored. Every error names the file, the line and the field.

A file is read as a stream and at most `max_rows` rows are kept (`--trace-max-rows`): a longer
file is cut there, and the trace says so (`truncated`), so a huge log cannot exhaust memory.

How the rows become requests (rate scaling, sessions, classes, length scaling) is
workloads.replay_user_trace's; this module only reads and checks.
"""

from __future__ import annotations

import csv
import enum
import json
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from sloserve.bench.traces import parse_timestamp_ns

# Rows kept from one file unless told otherwise: far more than a load point replays (1,000),
# small enough (tens of MB) to hold.
DEFAULT_MAX_ROWS = 100_000

REQUIRED_FIELDS = ("arrival", "input_tokens", "output_tokens")
OPTIONAL_FIELDS = ("class", "session", "prefix_hash", "prefix_tokens", "thinking_tokens")
FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS
# The only class with a thinking stage (presets.REASONING).
THINKING_CLASS = "reasoning"


class TraceFormat(enum.Enum):
    JSONL = "jsonl"
    CSV = "csv"

    @classmethod
    def of_path(cls, path: Path) -> TraceFormat:
        """The format a file's name says: .jsonl/.ndjson/.json are JSONL, .csv is CSV."""
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson", ".json"):
            return cls.JSONL
        if suffix == ".csv":
            return cls.CSV
        raise UserTraceError(
            path, None, None, f"cannot tell the format from {suffix or 'no suffix'!r}: "
            "name the file .jsonl or .csv, or give --trace-format"
        )  # fmt: skip


class ArrivalKind(enum.Enum):
    SECONDS = "seconds from the start"
    TIMESTAMP = "timestamps"


class UserTraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file, line and field."""

    def __init__(self, path: Path, line: int | None, field: str | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        what = f" field {field!r}:" if field is not None else ""
        super().__init__(f"{where}:{what} {problem}")
        self.path, self.line, self.field = path, line, field


@dataclass(frozen=True, slots=True)
class UserTraceRow:
    """One request of the file, checked. `arrival_ns` is not yet re-based."""

    line: int  # where it is in the file, for messages and for stable ordering
    arrival_ns: int
    input_tokens: int
    output_tokens: int
    slo_class: str
    session: str | None = None
    prefix_hash: str | None = None
    prefix_tokens: int | None = None
    thinking_tokens: int | None = None


@dataclass(frozen=True)
class UserTrace:
    """The rows read from a file, sorted by arrival, and how they were read."""

    path: Path
    format: TraceFormat
    rows: tuple[UserTraceRow, ...]
    arrival_kind: ArrivalKind
    max_rows: int
    truncated: bool  # the file has more rows than `max_rows`: the rest were not read

    def offsets_s(self, rows: Collection[UserTraceRow] | None = None) -> list[float]:
        """Arrival offsets (s) of `rows` (default: all) from the trace's first arrival."""
        first = self.rows[0].arrival_ns
        return [(r.arrival_ns - first) / 1e9 for r in (self.rows if rows is None else rows)]

    # Whole-file aggregates, computed once however many load points replay the trace.
    @cached_property
    def longest_output(self) -> dict[str, int]:
        """Per class: the longest output of the class in the rows read."""
        longest: dict[str, int] = {}
        for r in self.rows:
            longest[r.slo_class] = max(longest.get(r.slo_class, 0), r.output_tokens)
        return longest

    @cached_property
    def shortest_prompt(self) -> dict[str, int]:
        """Per prefix hash: the shortest prompt with the hash in the rows read."""
        shortest: dict[str, int] = {}
        for r in self.rows:
            if r.prefix_hash is not None:
                shortest[r.prefix_hash] = min(
                    shortest.get(r.prefix_hash, r.input_tokens), r.input_tokens
                )
        return shortest

    def describe(self) -> dict[str, Any]:
        return {
            "trace_file": str(self.path),
            "format": self.format.value,
            "arrivals": self.arrival_kind.value,
            "rows_read": len(self.rows),
            "max_rows": self.max_rows,
            "truncated": self.truncated,
        }


def read_user_trace(
    path: Path,
    *,
    classes: Collection[str],
    default_class: str,
    fmt: TraceFormat | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> UserTrace:
    """Reads and checks a trace file (module docstring); raises UserTraceError.

    `classes` are the class names a row may give; a row that gives none gets `default_class`.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if default_class not in classes:
        raise ValueError(f"default class {default_class!r} is not one of {sorted(classes)}")
    fmt = fmt or TraceFormat.of_path(path)
    checker = _RowChecker(path, frozenset(classes), default_class)
    rows: list[UserTraceRow] = []
    truncated = False
    try:
        # utf-8-sig: a byte-order mark (a spreadsheet's CSV export) is not part of a field name.
        newline = "" if fmt is TraceFormat.CSV else None
        with path.open(newline=newline, encoding="utf-8-sig") as f:
            reader = _JsonlReader(path, f) if fmt is TraceFormat.JSONL else _CsvReader(path, f)
            for line, parse in reader.entries():
                if len(rows) == max_rows:
                    # The entry past the cap is seen, not parsed (a bad row there is no
                    # error), and nothing after it is read.
                    truncated = True
                    break
                rows.append(checker.row(line, parse()))
    except OSError as e:
        raise UserTraceError(path, None, None, f"cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise UserTraceError(path, None, None, f"not UTF-8 text: {e}") from e
    if not rows:
        raise UserTraceError(path, None, None, "no requests in the file")
    assert checker.kind is not None
    rows.sort(key=lambda r: (r.arrival_ns, r.line))
    return UserTrace(path, fmt, tuple(rows), checker.kind, max_rows, truncated)


# A request's line and how to parse it: parsed only when wanted (not past the row cap).
_Entry = tuple[int, Callable[[], Mapping[str, Any]]]


class _JsonlReader:
    """One JSON object per line; blank lines (a trailing newline, say) are no requests."""

    def __init__(self, path: Path, lines: Iterable[str]) -> None:
        self.path, self.lines = path, lines

    def entries(self) -> Iterator[_Entry]:
        for number, text in enumerate(self.lines, start=1):
            if text.strip():
                yield number, partial(self.parse, number, text)

    def parse(self, line: int, text: str) -> Mapping[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserTraceError(self.path, line, None, f"not JSON: {e.msg}") from e
        if not isinstance(value, dict):
            raise UserTraceError(self.path, line, None, "a request must be a JSON object")
        return value


class _CsvReader:
    """A header row naming the fields, then one request per row; blank rows are skipped and
    empty cells are absent optional fields (CSV has no null)."""

    def __init__(self, path: Path, lines: Iterable[str]) -> None:
        self.path = path
        self.reader = csv.reader(lines)
        self.names: list[str] = []

    def entries(self) -> Iterator[_Entry]:
        header = next(self.reader, None)
        if header is None:
            return
        self.names = [name.strip() for name in header]
        duplicated = sorted({name for name in self.names if self.names.count(name) > 1})
        if duplicated:
            raise UserTraceError(self.path, 1, None, f"columns repeated: {duplicated}")
        _check_fields(self.path, 1, self.names)
        for cells in self.reader:
            if any(cell.strip() for cell in cells):
                # line_num counts physical lines: right even after a quoted multi-line cell.
                yield self.reader.line_num, partial(self.parse, self.reader.line_num, cells)

    def parse(self, line: int, cells: list[str]) -> Mapping[str, Any]:
        if len(cells) != len(self.names):
            raise UserTraceError(
                self.path, line, None, f"{len(cells)} cells under {len(self.names)} columns"
            )
        return {n: c.strip() for n, c in zip(self.names, cells, strict=True) if c.strip()}


def _check_fields(path: Path, line: int, names: Collection[str]) -> None:
    unknown = [name for name in names if name not in FIELDS]
    if unknown:
        raise UserTraceError(
            path,
            line,
            None,
            f"unknown field(s) {unknown}; the format's fields: {', '.join(FIELDS)}",
        )


class _RowChecker:
    """Checks rows one at a time, remembering what must agree across the file."""

    def __init__(self, path: Path, classes: frozenset[str], default_class: str) -> None:
        self.path, self.classes, self.default_class = path, classes, default_class
        self.kind: ArrivalKind | None = None  # the first row's arrival kind, for all rows

    def error(self, line: int, field: str | None, problem: str) -> UserTraceError:
        return UserTraceError(self.path, line, field, problem)

    def row(self, line: int, record: Mapping[str, Any]) -> UserTraceRow:
        _check_fields(self.path, line, record.keys())
        missing = [f for f in REQUIRED_FIELDS if _absent(record.get(f))]
        if missing:
            raise self.error(
                line, missing[0], "missing (required: " + ", ".join(REQUIRED_FIELDS) + ")"
            )
        input_tokens = self.whole(line, record, "input_tokens", minimum=1)
        output_tokens = self.whole(line, record, "output_tokens", minimum=1)
        slo_class = self.slo_class(line, record.get("class"))
        prefix_hash = self.key(line, record, "prefix_hash")
        prefix_tokens = self.optional_whole(line, record, "prefix_tokens", 1, input_tokens)
        if prefix_tokens is not None and prefix_hash is None:
            raise self.error(line, "prefix_tokens", "given without a prefix_hash to share")
        thinking = self.optional_whole(line, record, "thinking_tokens", 0, output_tokens)
        if thinking is not None and slo_class != THINKING_CLASS:
            raise self.error(
                line, "thinking_tokens", f"only class {THINKING_CLASS!r} has a thinking stage, "
                f"this row's class is {slo_class!r}"
            )  # fmt: skip
        return UserTraceRow(
            line=line,
            arrival_ns=self.arrival(line, record["arrival"]),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            slo_class=slo_class,
            session=self.key(line, record, "session"),
            prefix_hash=prefix_hash,
            prefix_tokens=prefix_tokens,
            thinking_tokens=thinking,
        )

    def arrival(self, line: int, value: Any) -> int:
        kind, ns = self._arrival(line, value)
        if self.kind is None:
            self.kind = kind
        elif kind is not self.kind:
            raise self.error(
                line, "arrival", f"{kind.value}, where the rows before gave {self.kind.value}: "
                "use one kind throughout"
            )  # fmt: skip
        return ns

    def _arrival(self, line: int, value: Any) -> tuple[ArrivalKind, int]:
        if isinstance(value, bool):  # a JSON true is no time
            raise self.error(line, "arrival", f"{value!r} is not a time")
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str):
            try:
                seconds = float(value)
            except ValueError:
                try:
                    return ArrivalKind.TIMESTAMP, parse_timestamp_ns(value)
                except ValueError as e:
                    raise self.error(
                        line, "arrival", f"{e}; give seconds from the start or an ISO timestamp"
                    ) from None
        else:
            raise self.error(line, "arrival", f"{value!r} is not a time")
        if not math.isfinite(seconds) or seconds < 0:
            raise self.error(line, "arrival", f"{value!r} seconds: must be finite and >= 0")
        return ArrivalKind.SECONDS, round(seconds * 1e9)

    def whole(self, line: int, record: Mapping[str, Any], field: str, minimum: int) -> int:
        value = record[field]
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                number = None
        if number is None:
            raise self.error(line, field, f"{value!r} is not a whole number")
        if number < minimum:
            raise self.error(line, field, f"{number} is below {minimum}")
        return number

    def optional_whole(
        self, line: int, record: Mapping[str, Any], field: str, minimum: int, maximum: int
    ) -> int | None:
        if _absent(record.get(field)):
            return None
        number = self.whole(line, record, field, minimum)
        if number > maximum:
            bound = "input_tokens" if field == "prefix_tokens" else "output_tokens"
            raise self.error(line, field, f"{number} is more than the row's {bound} ({maximum})")
        return number

    def key(self, line: int, record: Mapping[str, Any], field: str) -> str | None:
        """A grouping key (session, prefix hash): a string or a whole number, kept as text."""
        value = record.get(field)
        if _absent(value):
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.error(line, field, f"{value!r}: give a string or a whole number")
        return str(value)

    def slo_class(self, line: int, value: Any) -> str:
        if _absent(value):
            return self.default_class
        if not isinstance(value, str) or value not in self.classes:
            raise self.error(
                line, "class", f"{value!r} is not a known SLO class "
                f"(known: {', '.join(sorted(self.classes))}; absent: {self.default_class})"
            )  # fmt: skip
        return value


def _absent(value: Any) -> bool:
    """JSON null and an empty string count as a field left out."""
    return value is None or (isinstance(value, str) and not value.strip())

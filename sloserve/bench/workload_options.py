"""The options that choose a benchmark's workload, shared by `sloserve bench run|compare` and
`sloserve simulate`: a named scenario or a user's trace file, and the methodology's burst test
on top of either.

Both commands build every load point's workload through `WorkloadChoice.build`, so a trace
file is read once (at `resolve`) and replayed at every rate, and the burst options mean the
same in both.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sloserve.bench.arrivals import Burst
from sloserve.bench.presets import LengthScale
from sloserve.bench.user_trace import DEFAULT_MAX_ROWS, FIELDS, TraceFormat, UserTrace
from sloserve.bench.workloads import (
    DEFAULT_TRACE_CLASS,
    SCENARIOS,
    TRACE_CLASSES,
    Workload,
    build_scenario,
    read_trace_file,
    replay_user_trace,
    with_burst,
)
from sloserve.stepmodel import StepTimeModel

# Where `resolve` keeps the choice on the parsed arguments.
_ATTRIBUTE = "workload_choice"

TRACE_FILE_HELP = (
    "replay this trace instead of a --scenario: JSONL (one object per line) or CSV (a header "
    f"row), fields {', '.join(FIELDS)}; arrival is seconds from the start or an ISO "
    "timestamp, the first three are required. class is one of "
    f"{', '.join(TRACE_CLASSES)} (default {DEFAULT_TRACE_CLASS}); rows of one session are "
    "rounds of a conversation, each sent when the one before completes; rows with one "
    "prefix_hash share their first prefix_tokens prompt tokens. A load point replays the "
    "trace's first N requests (its request count) and the rate scales the timestamps, keeping "
    "the trace's shape. See docs/benchmarks.md, 'Bring your own trace'"
)


@dataclass(frozen=True)
class WorkloadChoice:
    """A named scenario or a read trace (exactly one), and an optional burst test."""

    scenario: str | None = None
    trace: UserTrace | None = None
    burst: Burst | None = None
    # Request counts already warned about (a trace shorter than a load point): say it once.
    _short_counts: set[int] = field(default_factory=set, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.scenario is None) == (self.trace is None):
            raise ValueError("choose a scenario or a trace, not both or neither")

    @property
    def label(self) -> str:
        """The name results and headings carry: the scenario's, or trace:FILE."""
        if self.trace is not None:
            return f"trace:{self.trace.path.name}"
        assert self.scenario is not None
        return self.scenario

    def build(
        self,
        *,
        model: StepTimeModel,
        rate: float,
        count: int,
        seed: int,
        scale: LengthScale,
        trace_dir: Path | None,
        chunk_tokens: int,
    ) -> Workload:
        if self.trace is None:
            assert self.scenario is not None
            return build_scenario(
                self.scenario,
                burst=self.burst,
                model=model,
                rate=rate,
                count=count,
                seed=seed,
                scale=scale,
                trace_dir=trace_dir,
                chunk_tokens=chunk_tokens,
            )
        workload = replay_user_trace(
            self.trace,
            model=model,
            rate=rate,
            count=count,
            seed=seed,
            scale=scale,
            chunk_tokens=chunk_tokens,
        )
        if len(workload.requests) < count and count not in self._short_counts:
            self._short_counts.add(count)
            _warn(
                f"{self.trace.path} holds {len(self.trace.rows):,} requests: a load point of "
                f"{count:,} replays all of them"
            )
        return workload if self.burst is None else with_burst(workload, self.burst)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--scenario, --trace-file (and its --trace-format, --trace-max-rows), --burst-*."""
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        help="the workload (required unless --trace-file is given)",
    )
    parser.add_argument("--trace-file", type=Path, metavar="FILE", help=TRACE_FILE_HELP)
    parser.add_argument(
        "--trace-format",
        choices=[f.value for f in TraceFormat],
        help="the --trace-file's format (default: from its suffix, .jsonl/.ndjson/.json or .csv)",
    )
    parser.add_argument(
        "--trace-max-rows",
        type=int,
        default=DEFAULT_MAX_ROWS,
        metavar="N",
        help="read at most N rows of the --trace-file; a longer file is cut there, with a "
        f"warning (default: {DEFAULT_MAX_ROWS:,})",
    )
    parser.add_argument(
        "--burst-factor",
        type=float,
        metavar="F",
        help="burst test (methodology §4): the arrival rate times F for --burst-duration "
        "seconds in the middle of the run, for a scenario or a --trace-file",
    )
    parser.add_argument(
        "--burst-duration",
        type=float,
        metavar="S",
        help=f"with --burst-factor: seconds the burst lasts (default {Burst().duration_s:g}; "
        "a centred burst takes at most half the run)",
    )
    parser.add_argument(
        "--burst-start",
        type=float,
        metavar="S",
        help="with --burst-factor: seconds into the run the burst starts (default: centred)",
    )


def resolve(args: argparse.Namespace) -> WorkloadChoice:
    """The choice the arguments make, checked, with the trace file read; kept on `args`, and
    `args.scenario` set to its label (results and headings name the workload by it). Exits
    with a message naming the option, the line or the field that is wrong."""
    cached = getattr(args, _ATTRIBUTE, None)
    if isinstance(cached, WorkloadChoice):
        return cached
    scenario: str | None = args.scenario
    trace_file: Path | None = args.trace_file
    if (scenario is None) == (trace_file is None):
        raise SystemExit("give one of --scenario and --trace-file")
    if trace_file is None and (args.trace_format or args.trace_max_rows != DEFAULT_MAX_ROWS):
        raise SystemExit("--trace-format and --trace-max-rows go with --trace-file")
    trace = None if trace_file is None else _read(args, trace_file)
    choice = WorkloadChoice(scenario=scenario, trace=trace, burst=_burst(args))
    setattr(args, _ATTRIBUTE, choice)
    args.scenario = choice.label
    return choice


def _read(args: argparse.Namespace, path: Path) -> UserTrace:
    if args.trace_max_rows < 1:
        raise SystemExit("--trace-max-rows must be at least 1")
    fmt = None if args.trace_format is None else TraceFormat(args.trace_format)
    try:
        trace = read_trace_file(path, fmt=fmt, max_rows=args.trace_max_rows)
    except ValueError as error:  # UserTraceError: names the file, the line and the field
        raise SystemExit(f"--trace-file: {error}") from None
    offsets = trace.offsets_s()
    if len(offsets) >= 2 and offsets[-1] == 0:
        raise SystemExit(
            f"--trace-file: {path}: every request arrives at the same time, so there is no "
            "rate to scale; spread the arrivals"
        )
    if trace.truncated:
        _warn(
            f"{path} has more than {trace.max_rows:,} rows; only the first "
            f"{trace.max_rows:,} were read (--trace-max-rows)"
        )
    return trace


def _warn(message: str) -> None:
    print(f"  warning: {message}", file=sys.stderr, flush=True)


def _burst(args: argparse.Namespace) -> Burst | None:
    if args.burst_factor is None:
        if args.burst_duration is not None or args.burst_start is not None:
            raise SystemExit("--burst-duration and --burst-start go with --burst-factor")
        return None
    defaults = Burst()
    try:
        return Burst(
            factor=args.burst_factor,
            duration_s=defaults.duration_s if args.burst_duration is None else args.burst_duration,
            start_s=args.burst_start,
        )
    except ValueError as error:
        raise SystemExit(f"--burst-*: {error}") from None

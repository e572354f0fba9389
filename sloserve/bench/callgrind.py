"""Instruction counts of chosen Python calls, with valgrind's callgrind.

On a shared, noisy machine a time is a sample of the machine as much as of the code; the
number of instructions a call executes is not. Callgrind counts them, but only for C functions:
so the calls to count are run through two C functions of the interpreter that nothing else on
the measured path calls, and callgrind collects inside those alone (`--toggle-collect`):
`sys.call_tracing` and `contextvars.Context.run`, whose C implementations are
`sys_call_tracing` and `context_run` in libpython (a CPython without its symbol table, a
stripped build, cannot be measured so).

Start-up (importing torch and vLLM) under valgrind's instrumentation takes a quarter of an
hour; so the process starts uninstrumented (`--instr-atstart=no`) and switches
instrumentation on itself (`callgrind_control -i on`) once what it measures is about to run.
"""

from __future__ import annotations

import contextvars
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")

# The two regions, by the C function that marks each.
PRIMARY = "sys_call_tracing"
SECONDARY = "context_run"
REGIONS = (PRIMARY, SECONDARY)


def missing_tools() -> list[str]:
    """The valgrind tools this needs that are not on PATH."""
    return [
        t for t in ("valgrind", "callgrind_control", "callgrind_annotate") if not shutil.which(t)
    ]


def command(argv: Sequence[str], out_file: Path) -> list[str]:
    """`argv` under callgrind, counting only inside the two regions."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--collect-atstart=no",
        *(f"--toggle-collect={region}" for region in REGIONS),
        f"--callgrind-out-file={out_file}",
        *argv,
    ]


def environment() -> dict[str, str]:
    """The environment of a counted process: string hashing fixed, so that sets and dicts
    iterate the same way every run and the counts repeat."""
    return {**os.environ, "PYTHONHASHSEED": "0"}


def start_instrumentation() -> None:
    """Switches callgrind's instrumentation on for this process (run under `command`)."""
    subprocess.run(
        ["callgrind_control", "--instr=on", str(os.getpid())],
        check=True,
        capture_output=True,
        timeout=300,
    )


def in_primary(call: Callable[[], _T]) -> _T:
    """Runs `call` inside the primary region. (sys.call_tracing suspends a tracer, if one is
    set, for the call: none is, when counting.)"""
    result: _T = sys.call_tracing(call, ())
    return result


def in_secondary(call: Callable[[], _T]) -> _T:
    """Runs `call` inside the secondary region (in a copy of the current context, which the
    code measured neither sets nor reads)."""
    return contextvars.copy_context().run(call)


_TOTALS = re.compile(r"^(?:totals|summary):\s*(\d+)", re.MULTILINE)
# A line of callgrind_annotate's listing: "1,234 (12.3%)  file:function'2 [object]".
_LISTED = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+\S*?:?([\w.]+)(?:'\d+)?(?:\s+\[.*\])?\s*$")


def annotate(out_file: Path) -> str:
    """callgrind_annotate's listing of every function by instructions, inclusive."""
    return subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def region_counts(out_file: Path, listing: str | None = None) -> dict[str, int]:
    """Instructions executed inside each region (inclusive of everything they called), and
    in all ("total"). `listing`: annotate(out_file), when already made."""
    totals = _TOTALS.search(out_file.read_text())
    counts = dict.fromkeys(REGIONS, 0)
    for line in (listing if listing is not None else annotate(out_file)).splitlines():
        match = _LISTED.match(line)
        # A function inlined into several files is listed once per file: the largest is it.
        if match and match.group(2) in counts:
            counts[match.group(2)] = max(
                counts[match.group(2)], int(match.group(1).replace(",", ""))
            )
    return {"total": int(totals.group(1)) if totals else 0, **counts}

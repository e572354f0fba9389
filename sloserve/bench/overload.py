"""What an overload run (a burst over capacity) did with every request, untrimmed.

A capacity run's statistics leave out the first and last 10% of arrivals (§7); an overload
run must account for every request instead: each one ends complete, rejected with a reason,
or with an explicit error, and none hangs. Best-effort work (what the gateway's spillover
queue took) is followed past the end of the arrivals: it should finish after the burst.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sloserve.bench.analysis import admitted_at_arrival, is_good
from sloserve.bench.types import RequestRecord

# The runner's message for a request with no complete response in time (runner.run).
HUNG_PREFIX = "no complete response within"


@dataclass(frozen=True)
class OverloadReport:
    """Every request of a run, in one bucket each, and when best-effort work finished.

    Times are seconds after the first request was sent."""

    requests: int  # every record, rounds never sent included
    arrivals_end_s: float  # the last request sent
    last_finished_s: float | None  # the last request to end, either way
    # Admitted under their SLO at arrival (later demotions included) and of those, the ones
    # that attained it: the promise admission made, and kept.
    admitted: int
    admitted_good: int
    admitted_attainment: float | None
    rejected: int
    rejected_by_reason: dict[str, int]
    best_effort: int  # served as best effort, from the queue or demoted
    best_effort_completed: int
    best_effort_completed_after_arrivals: int  # of those, finished after the last arrival
    best_effort_last_done_s: float | None
    errors: int  # explicit errors (rounds never sent, their session having stopped, included)
    never_sent: int  # later rounds of sessions that stopped
    hung: int  # no complete response within the runner's timeout
    unanswered: int  # sent, yet neither completed, rejected nor failed: lost

    @property
    def every_request_answered(self) -> bool:
        """No request was lost and none hung."""
        return self.hung == 0 and self.unanswered == 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"every_request_answered": self.every_request_answered}


def overload_report(records: Sequence[RequestRecord]) -> OverloadReport:
    if not records:
        raise ValueError("an overload report needs at least one request")
    start = min(r.sent_at for r in records)
    sent = [r for r in records if r.sent]
    arrivals_end = max(r.sent_at for r in sent) if sent else start
    finished = [r.finished_at for r in records if r.finished_at is not None]
    admitted = [r for r in records if admitted_at_arrival(r)]
    good = sum(1 for r in admitted if is_good(r))
    best_effort = [r for r in records if r.best_effort and not r.rejected]
    done = [r for r in best_effort if r.completed and not r.error]
    done_at = [r.finished_at for r in done if r.finished_at is not None]
    hung = sum(1 for r in records if r.error.startswith(HUNG_PREFIX))
    unanswered = sum(
        1 for r in sent if not (r.completed or r.rejected or r.error) or r.finished_at is None
    )
    return OverloadReport(
        requests=len(records),
        arrivals_end_s=arrivals_end - start,
        last_finished_s=max(finished) - start if finished else None,
        admitted=len(admitted),
        admitted_good=good,
        admitted_attainment=good / len(admitted) if admitted else None,
        rejected=sum(1 for r in records if r.rejected),
        rejected_by_reason=dict(
            sorted(Counter(r.reject_reason or "unspecified" for r in records if r.rejected).items())
        ),
        best_effort=len(best_effort),
        best_effort_completed=len(done),
        best_effort_completed_after_arrivals=sum(1 for t in done_at if t > arrivals_end),
        best_effort_last_done_s=max(done_at) - start if done_at else None,
        errors=sum(1 for r in records if r.error and not r.error.startswith(HUNG_PREFIX)),
        never_sent=sum(1 for r in records if not r.sent),
        hung=hung,
        unanswered=unanswered,
    )


def overload_table(report: OverloadReport) -> str:
    """The report as a two-column markdown table."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} s"

    attainment = (
        "-" if report.admitted_attainment is None else f"{100 * report.admitted_attainment:.1f}%"
    )
    rows = [
        ("requests", str(report.requests)),
        ("arrivals end", seconds(report.arrivals_end_s)),
        ("last request ended", seconds(report.last_finished_s)),
        ("admitted (attained)", f"{report.admitted} ({report.admitted_good})"),
        ("admitted attainment", attainment),
        (
            "rejected (reason)",
            f"{report.rejected} "
            + (", ".join(f"{k} {v}" for k, v in report.rejected_by_reason.items()) or "-"),
        ),
        (
            "best effort: served / completed / completed after the arrivals",
            f"{report.best_effort} / {report.best_effort_completed} / "
            f"{report.best_effort_completed_after_arrivals}",
        ),
        ("last best-effort request done", seconds(report.best_effort_last_done_s)),
        ("errors (rounds never sent)", f"{report.errors} ({report.never_sent})"),
        ("hung / unanswered", f"{report.hung} / {report.unanswered}"),
    ]
    lines = ["| overload, every request | |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"

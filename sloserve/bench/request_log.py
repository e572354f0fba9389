"""The per-request log of a benchmark run: what each request got, and how close it came.

The run's tables say how many requests missed; this says which, and where: the token that was
first past its line and by how much. One JSON object per line (requests.jsonl), so a miss can
be lined up with the engine's scheduler trace (SLOSERVE_SCHEDULER_TRACE) by time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sloserve.bench.analysis import outcome
from sloserve.bench.types import RequestRecord
from sloserve.slo import judge


def request_entry(record: RequestRecord, start: float) -> dict[str, Any]:
    """One request's line; times in seconds, `sent_s` from `start` (the run's first send)."""
    request = record.request
    entry: dict[str, Any] = {
        "index": request.index,
        "class": request.slo_class,
        "session": request.session,
        "round": request.round,
        "sent": record.sent,
        "sent_s": round(record.sent_at - start, 6) if record.sent else None,
        "outcome": outcome(record) if record.sent else "never_sent",
        "prompt_tokens": request.prompt_tokens,
        "output_tokens": request.output_tokens,
        "tokens_received": len(record.token_times),
        "demoted": record.demoted,
        "retry_completed": record.retry_completed,
        "reject_reason": record.reject_reason,
        "error": record.error,
    }
    if record.token_times:
        verdict = judge(record.sent_at, record.token_times, request.budgets)
        entry |= {
            "ttft_s": round(verdict.ttft_s, 6),
            "mean_tpot_s": round(verdict.mean_tpot_s, 6),
            "max_inter_token_s": round(verdict.max_inter_token_s, 6),
            "late_tokens": verdict.late_tokens,
            "first_late_token": verdict.first_late_token,
            "worst_margin_s": round(verdict.worst_margin_s, 6),  # finite: a token came
        }
    return entry


def entries(records: Sequence[RequestRecord]) -> Iterable[dict[str, Any]]:
    sent = [r.sent_at for r in records if r.sent]
    start = min(sent, default=0.0)
    for record in sorted(records, key=lambda r: r.request.index):
        yield request_entry(record, start)


def write_request_log(path: Path, records: Sequence[RequestRecord]) -> None:
    with path.open("w") as out:
        for entry in entries(records):
            out.write(json.dumps(entry) + "\n")

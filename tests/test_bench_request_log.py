"""The per-request log of a bench run (unit level; test_bench_e2e.py checks a real run's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sloserve.bench.request_log import write_request_log
from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.slo import Budgets

BUDGETS = Budgets(ttft_s=1.0, tpot_s=0.1)


def _record(index: int, sent_at: float, times: list[float], **fields: object) -> RequestRecord:
    request = BenchRequest(index, "chat", BUDGETS, 10, len(times) or 3, 0.0)
    fields = {"completed": True, **fields}
    return RequestRecord(request, sent_at, token_times=times, **fields)  # type: ignore[arg-type]


def test_each_request_gets_its_outcome_and_where_it_missed(tmp_path: Path) -> None:
    records = [
        _record(1, 100.5, [101.0, 101.6, 101.9]),  # decode from 101.5: token 3 due 101.71
        _record(0, 100.0, [100.5, 101.0, 101.1]),  # on time
        _record(2, 101.0, [], completed=False, rejected=True, reject_reason="COMPUTE"),
    ]
    path = tmp_path / "requests.jsonl"
    write_request_log(path, records)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["index"] for e in lines] == [0, 1, 2]
    good, late, rejected = lines
    assert good["outcome"] == "good" and good["first_late_token"] is None
    assert good["sent_s"] == 0.0 and good["worst_margin_s"] > 0
    assert late["outcome"] == "late" and late["sent_s"] == pytest.approx(0.5)
    assert late["first_late_token"] == 3 and late["late_tokens"] == 1
    assert late["worst_margin_s"] == pytest.approx(101.71 - 101.9)
    assert rejected["outcome"] == "rejected" and rejected["reject_reason"] == "COMPUTE"
    assert rejected["tokens_received"] == 0 and "worst_margin_s" not in rejected

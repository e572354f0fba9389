"""The bench client's session logic, against a target that injects rejections.

The real targets are exercised in test_bench_e2e.py and test_bench_routing.py; this fake only
turns chosen rounds away, which a real replica does only under load it cannot be made to
produce on cue.
"""

from __future__ import annotations

import asyncio
import time

from sloserve.bench.runner import PromptBook, run
from sloserve.bench.types import BenchRequest, RequestRecord
from sloserve.slo import Budgets

BUDGETS = Budgets(ttft_s=1.0, tpot_s=0.1)


class _RejectingTarget:
    """Turns away the first try of the rounds in `reject`; serves everything else."""

    name = "fake"

    def __init__(self, reject: set[int]) -> None:
        self.reject = reject
        self.sent: list[tuple[int, bool]] = []  # (index, allow_best_effort) per send

    async def send(self, request: BenchRequest, prompt: list[int], record: RequestRecord) -> None:
        self.sent.append((request.index, request.allow_best_effort))
        if request.index in self.reject and not request.allow_best_effort:
            record.rejected, record.reject_reason = True, "COMPUTE"
        else:
            record.best_effort = request.allow_best_effort
            for _ in range(request.output_tokens):
                record.token_times.append(time.time())
            record.completed = True
        record.finished_at = time.time()

    async def close(self) -> None:
        return None


def _session(first: int, rounds: int, session: int) -> list[BenchRequest]:
    def one(k: int) -> BenchRequest:
        after = None if k == 0 else first + k - 1
        return BenchRequest(
            first + k, "tool", BUDGETS, prompt_tokens=8 + k, output_tokens=3, arrival_s=0.0,
            session=session, round=k, after=after, delay_s=0.01,
        )  # fmt: skip

    return [one(k) for k in range(rounds)]


def test_a_rejected_round_is_retried_as_best_effort_and_its_session_goes_on() -> None:
    requests = [*_session(0, 3, session=0), *_session(3, 2, session=1)]
    target = _RejectingTarget(reject={1, 4})  # round 1 of session 0; the last round of 1
    records = asyncio.run(run(target, requests, PromptBook(vocab_size=100, seed=0)))
    by_index = {r.request.index: r for r in records}

    # The rejected round stays a rejection (a miss), its retry ran as best effort...
    assert by_index[1].rejected and by_index[1].retry_completed
    assert (1, False) in target.sent and (1, True) in target.sent
    # ...and the session's later round was sent after it, under its SLO.
    assert by_index[2].sent and by_index[2].completed and not by_index[2].best_effort
    assert by_index[2].sent_at >= by_index[1].finished_at  # type: ignore[operator]
    # A last round is retried too (its load is real), and stays a rejection.
    assert by_index[4].rejected and by_index[4].retry_completed
    assert (4, True) in target.sent
    assert all(by_index[i].completed for i in (0, 3))

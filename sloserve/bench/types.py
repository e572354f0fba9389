"""Records shared by the benchmark's workloads, runner and analysis."""

from __future__ import annotations

from dataclasses import dataclass, field

from sloserve.slo import Budgets


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: its shape, its SLO, and when it arrives."""

    index: int  # position in the workload, unique
    slo_class: str  # class name, for per-class attainment
    budgets: Budgets  # the SLO it is judged against (and sent with, as explicit budgets)
    prompt_tokens: int
    output_tokens: int  # forced: ignore end-of-sequence, max_tokens = output_tokens
    arrival_s: float  # offset from the run's start; for a follow-up round: see `after`
    session: int | None = None  # multi-round (tool-calling) session id
    round: int = 0  # round within its session, from 0
    after: int | None = None  # index of the request whose completion releases this one
    delay_s: float = 0.0  # tool delay between `after` completing and this one arriving
    allow_best_effort: bool = False


@dataclass
class RequestRecord:
    """What the client saw of one request, on the client's clock (time.time())."""

    request: BenchRequest
    sent_at: float  # when it was sent: its arrival for deadlines
    token_times: list[float] = field(default_factory=list)  # one entry per output token
    finished_at: float | None = None  # when the stream ended (either way)
    completed: bool = False  # ended with a full response
    rejected: bool = False  # turned away (RESOURCE_EXHAUSTED / HTTP 429)
    reject_reason: str = ""
    best_effort: bool = False  # served, but as best effort (from admission or demoted later)
    demoted: bool = False  # admitted, then demoted to best effort once it could not attain
    error: str = ""  # any other failure
    sent: bool = True  # False: never sent (a later round of a session that had stopped)
    # A rejected round of a session is sent again as best effort (bench/runner.py); whether
    # that retry completed. The round's own outcome stays "rejected".
    retry_completed: bool = False

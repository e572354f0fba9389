"""Records shared by the benchmark's workloads, runner and analysis."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sloserve.slo import Budgets


def client_cap(longest_output: int) -> int:
    """The `max_tokens` a client sets for a class of requests: the smallest power of two at
    least the longest output the class can produce (its length distribution's cap, or the
    longest in its trace, after length scaling). A client knows roughly how long its
    application's answers can get, never how long this one will be.

    A class of one (a request built by hand) gets the rule applied to its own length."""
    if longest_output < 1:
        raise ValueError(f"the longest output must be at least 1, got {longest_output}")
    return 1 << (longest_output - 1).bit_length()


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: its shape, its SLO, and when it arrives.

    `output_tokens` is the true output length: what "the model" will produce. No server is
    told it: servers get `max_tokens` (a cap every request of the class shares) with
    end-of-sequence ignored, and the client, once it has received `output_tokens` tokens,
    takes the request as complete and closes the stream, as it would on the model's
    end-of-sequence. The analysis judges the tokens up to there. Likewise the thinking-token
    count in `budgets` serves the judge (where the thinking TPOT ends) and is never sent
    (`client_budgets`).
    """

    index: int  # position in the workload, unique
    slo_class: str  # class name, for per-class attainment
    budgets: Budgets  # the SLO it is judged against; sent as `client_budgets`
    prompt_tokens: int
    output_tokens: int  # the true length: known to the client's stand-in model and the judge
    arrival_s: float  # offset from the run's start; for a follow-up round: see `after`
    session: int | None = None  # multi-round (tool-calling) session id
    round: int = 0  # round within its session, from 0
    after: int | None = None  # index of the request whose completion releases this one
    delay_s: float = 0.0  # tool delay between `after` completing and this one arriving
    allow_best_effort: bool = False
    # The cap sent as max_tokens: the class's `client_cap`, clipped to what the model's context
    # leaves after the prompt (workloads.py). 0: `client_cap(output_tokens)`, a class of one.
    max_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens == 0 and self.output_tokens >= 1:
            object.__setattr__(self, "max_tokens", client_cap(self.output_tokens))

    @property
    def client_budgets(self) -> Budgets:
        """The SLO as a client sends it: the budgets (TTFT, TPOT, thinking TPOT), without the
        thinking-token count that no client knows before the model has answered."""
        return replace(self.budgets, thinking_tokens=0)


@dataclass
class RequestRecord:
    """What the client saw of one request, on the client's clock (time.time())."""

    request: BenchRequest
    sent_at: float  # when it was sent: its arrival for deadlines
    token_times: list[float] = field(default_factory=list)  # one entry per output token
    # When it ended, either way: for a completed request, when its last token arrived (the
    # client then closes the stream).
    finished_at: float | None = None
    completed: bool = False  # the client received all `output_tokens` of its true length
    rejected: bool = False  # turned away (RESOURCE_EXHAUSTED, HTTP 429, vLLM's admission 503)
    reject_reason: str = ""
    best_effort: bool = False  # served, but as best effort (from admission or demoted later)
    demoted: bool = False  # admitted, then demoted to best effort once it could not attain
    error: str = ""  # any other failure
    sent: bool = True  # False: never sent (a later round of a session that had stopped)
    # A rejected round of a session is sent again as best effort (bench/runner.py); whether
    # that retry completed. The round's own outcome stays "rejected".
    retry_completed: bool = False

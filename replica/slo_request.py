"""The SLO scheduler's view of one request: its progress and its deadlines (docs/slo.md §1).

Independent of vLLM, so the planner, admission and expiry run the same in the engine and in the
simulator. The engine adapter (scheduler.py) or the virtual engine (simulator.py) keeps the
progress fields up to date.
"""

from __future__ import annotations

import enum
import math

from sloserve.slo import TOLERANCE, Budgets, RequestSlo

# Kept between a decode token's planned delivery and the judge's deadline, in its own TPOTs.
RESERVE_TPOTS = 1.0
# Kept between a decode token's planned step end and the client's line (below), in its own
# TPOTs: room for a step that overruns its prediction, in a stream that may end at any token.
CLIENT_RESERVE_TPOTS = 0.25


class Mode(enum.Enum):
    ADMITTED = "admitted"  # the replica plans to meet its deadlines
    BEST_EFFORT = "best_effort"  # runs in slack, no deadlines, preempted first


# Why a request is best effort or gone; the names match slo.proto's RejectReason where shared.
class Reason(enum.Enum):
    NONE = "NONE"
    COMPUTE = "COMPUTE"  # its tokens cannot be computed in time alongside the admitted load
    MEMORY = "MEMORY"  # the KV cache cannot hold it alongside the admitted load
    EXPIRED = "EXPIRED"  # admitted, but can no longer meet its SLO


class SloRequest:
    """Progress and deadlines of one request inside the engine.

    The figures its deadlines are made of (its TTFT deadline, the TPOT of its next token, how
    far its deadline line has got, the tightest stage ahead) are kept as attributes, derived
    when what they depend on changes: the SLO (`slo` is set), the output (`on_tokens`), the
    thinking stage (`end_thinking`). Planning, expiry and admission read a request's deadline
    several times a step, and with a thousand requests in flight, deriving it from the SLO on
    every read was a fifth of the scheduler's time. Progress fields other than the output
    (computed_tokens, mode) are plain attributes the caller sets.

    Equality is identity: one engine request is one object.
    """

    def __init__(
        self,
        request_id: str,  # the engine's id
        slo: RequestSlo,
        prompt_tokens: int,
        max_tokens: int,
        mode: Mode = Mode.ADMITTED,
        # False: its prefill must run in one step. vLLM on a CPU cannot rewind a seeded
        # request's random generator after a partial prefill (its engine dies), so seeded
        # requests there are never split.
        split_prefill: bool = True,
        reason: Reason = Reason.NONE,
        # Tokens whose KV is computed, prompt and output (vLLM's num_computed_tokens). A
        # request preempted by recomputation drops back to 0 and prefills its prompt and
        # output again.
        computed_tokens: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.mode = mode  # derives `admitted`
        self.split_prefill = split_prefill
        self.reason = reason
        self.computed_tokens = computed_tokens
        self.output_tokens = 0
        self.first_token_at: float | None = None
        # Index of the first answer token, once the model has been seen to end its thinking
        # stage (end_thinking); None while it thinks, or when the stage's length came with
        # the request (Budgets.thinking_tokens).
        self.thinking_ended_at: int | None = None
        # Sum of the TPOT budgets of tokens 2..output_tokens: where the deadline line has got.
        self._decode_budget_s = 0.0
        self.slo = slo  # derives the deadline figures below

    # -- derived figures ----------------------------------------------------------------------

    # From the SLO:
    _slo: RequestSlo
    _mode: Mode
    budgets: Budgets
    # Where its deadlines count from: its arrival upstream (RequestSlo.origin_time), earlier
    # than its arrival here by the time it already waited in a gateway.
    arrival: float
    ttft_deadline: float
    # Whose output lengths forecast its own (RequestSlo.length_group).
    length_group: str
    # From the SLO and the output:
    # TPOT budget of the next token (the current stage's).
    next_tpot_s: float
    # Whether it may still produce thinking tokens (held to the thinking TPOT).
    thinking: bool
    # TPOT budget of the tightest stage still ahead of it: once it has ended its thinking,
    # only its answer's TPOT is.
    tightest_tpot_s: float
    # The TPOT budgets of tokens 2..output_tokens + 1: where the deadline line of its next
    # token is, from the start of the decode clock.
    _line_s: float

    @property
    def slo(self) -> RequestSlo:
        return self._slo

    @slo.setter
    def slo(self, slo: RequestSlo) -> None:
        self._slo = slo
        self.budgets = slo.budgets
        self.arrival = slo.origin_time
        self.ttft_deadline = self.arrival + self.budgets.ttft_s
        self.length_group = slo.length_group
        self._derive_progress()

    def _derive_progress(self) -> None:
        budgets = self.budgets
        self.next_tpot_s = self._tpot_for_token(max(1, self.output_tokens))
        self._line_s = self._decode_budget_s + self.next_tpot_s
        if budgets.thinking_tpot_s is None:
            self.thinking = False
        else:
            end = budgets.thinking_tokens or self.thinking_ended_at
            self.thinking = end is None or self.output_tokens < end
        thinking = budgets.thinking_tpot_s if self.thinking else None
        self.tightest_tpot_s = min(budgets.tpot_s, thinking or math.inf)

    # -- progress ------------------------------------------------------------------------------

    # Whether the replica plans to meet its deadlines (its mode is ADMITTED): read for every
    # request in every step, so kept beside the mode.
    admitted: bool

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        self._mode = mode
        self.admitted = mode is Mode.ADMITTED

    @property
    def prefill_left(self) -> int:
        """Tokens to compute before the next decode step: the prompt, plus after a
        preemption every output token but the last (the last is the next decode's input)."""
        # (Comparisons rather than max(): this is read several times a step for every request,
        # and CPython 3.11's max() of two numbers costs over ten times a comparison.)
        recomputed = self.output_tokens - 1 if self.output_tokens > 1 else 0
        left = self.prompt_tokens + recomputed - self.computed_tokens
        return left if left > 0 else 0

    @property
    def decoding(self) -> bool:
        """Its next step is a decode step of one token. (With async scheduling a request can
        be here before its first token is back: it then still counts against its TTFT.)"""
        return self.prefill_left == 0

    @property
    def context_tokens(self) -> int:
        return self.computed_tokens

    def _tpot_for_token(self, index: int) -> float:
        return self.budgets.tpot_for_token(index, self.thinking_ended_at)

    # -- deadlines -----------------------------------------------------------------------------

    def next_deadline(self, tolerance: float = 1.0, delivery_s: float = 0.0) -> float:
        """When the next token is due: the first token's TTFT deadline, else the decode clock
        (it starts at the later of the TTFT deadline and the first token, §1). `tolerance`
        scales the budgets as the attainment judge does (1.05).

        With `delivery_s` (from a step's end to its tokens reaching the client): when the step
        that produces the token must end. The client sees every token that much after its
        step, the first one too, so where the decode clock starts at the first token it moves
        with it, and only deadlines counted from the arrival come earlier.
        """
        if self.output_tokens == 0 or self.first_token_at is None:
            return self.arrival + tolerance * self.budgets.ttft_s - delivery_s
        start = self.ttft_deadline - delivery_s  # the later of this and the first token
        if self.first_token_at > start:
            start = self.first_token_at
        return start + tolerance * self._line_s

    def planning_deadline(self, delivery_s: float = 0.0) -> float:
        """When the step producing the next token should end, as the planner works to it.

        The first token: its TTFT deadline. A decode token: the earlier of two lines.
        - The judge's (1.05 x the budgets, §2) less a reserve of RESERVE_TPOTS of its TPOT,
          so a step that overruns its prediction is absorbed. Early in a stream this is
          stricter than the budget itself; further on, the 5% of a growing budget is slack.
        - The client's: the first token plus the TPOT budgets since, less CLIENT_RESERVE_TPOTS.
          Common clients (vLLM's `bench serve --goodput` among them) judge a request's mean
          TPOT, counted from its first token, against the budget itself; a first token
          earlier than its TTFT budget gives the judge's decode clock slack that those
          clients do not count, and a stream spending it would be late by theirs.
        """
        if self.output_tokens == 0 or self.first_token_at is None:
            return self.ttft_deadline - delivery_s
        judge = self.next_deadline(TOLERANCE, delivery_s) - RESERVE_TPOTS * self.next_tpot_s
        client = self.first_token_at + self._line_s - CLIENT_RESERVE_TPOTS * self.next_tpot_s
        return judge if judge < client else client

    # -- events --------------------------------------------------------------------------------

    def on_tokens(self, count: int, now: float) -> None:
        """`count` new output tokens came out of a step that ended at `now`."""
        for _ in range(count):
            self.output_tokens += 1
            if self.output_tokens == 1:
                self.first_token_at = now
            else:
                self._decode_budget_s += self._tpot_for_token(self.output_tokens - 1)
        self._derive_progress()

    def end_thinking(self) -> None:
        """The model ended its thinking stage: the tokens from the next one on are answer
        tokens, held to the answer TPOT."""
        if self.thinking_ended_at is None and self.budgets.thinking_tpot_s is not None:
            self.thinking_ended_at = self.output_tokens
            self._derive_progress()

    def demote(self, reason: Reason) -> None:
        self.mode = Mode.BEST_EFFORT
        self.reason = reason

    def __repr__(self) -> str:
        return (
            f"SloRequest({self.request_id!r}, {self.slo.class_name or self.length_group!r}, "
            f"prompt={self.prompt_tokens}, max_tokens={self.max_tokens}, "
            f"mode={self.mode.value}, computed={self.computed_tokens}, "
            f"output={self.output_tokens})"
        )

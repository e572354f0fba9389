"""The SLO scheduler's view of one request: its progress and its deadlines (docs/slo.md §1).

Independent of vLLM, so the planner, admission and expiry run the same in the engine and in the
simulator. The engine adapter (scheduler.py) or the virtual engine (simulator.py) keeps the
progress fields up to date.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from sloserve.slo import TOLERANCE, Budgets, RequestSlo

# Kept between a decode token's planned delivery and the judge's deadline, in its own TPOTs.
RESERVE_TPOTS = 1.0


class Mode(enum.Enum):
    ADMITTED = "admitted"  # the replica plans to meet its deadlines
    BEST_EFFORT = "best_effort"  # runs in slack, no deadlines, preempted first


# Why a request is best effort or gone; the names match slo.proto's RejectReason where shared.
class Reason(enum.Enum):
    NONE = "NONE"
    COMPUTE = "COMPUTE"  # its tokens cannot be computed in time alongside the admitted load
    MEMORY = "MEMORY"  # the KV cache cannot hold it alongside the admitted load
    EXPIRED = "EXPIRED"  # admitted, but can no longer meet its SLO


@dataclass
class SloRequest:
    """Progress and deadlines of one request inside the engine."""

    request_id: str  # the engine's id
    slo: RequestSlo
    prompt_tokens: int
    max_tokens: int
    mode: Mode = Mode.ADMITTED
    # False: its prefill must run in one step. vLLM on a CPU cannot rewind a seeded request's
    # random generator after a partial prefill (its engine dies), so seeded requests there
    # are never split.
    split_prefill: bool = True
    reason: Reason = Reason.NONE
    # Tokens whose KV is computed, prompt and output (vLLM's num_computed_tokens). A request
    # preempted by recomputation drops back to 0 and prefills its prompt and output again.
    computed_tokens: int = 0
    output_tokens: int = 0
    first_token_at: float | None = None
    # Index of the first answer token, once the model has been seen to end its thinking
    # stage (end_thinking); None while it thinks, or when the stage's length came with the
    # request (Budgets.thinking_tokens).
    thinking_ended_at: int | None = None
    # Sum of the TPOT budgets of tokens 2..output_tokens: where the deadline line has got to.
    _decode_budget_s: float = field(default=0.0, repr=False)

    @property
    def budgets(self) -> Budgets:
        return self.slo.budgets

    @property
    def arrival(self) -> float:
        """Where its deadlines count from: its arrival upstream (RequestSlo.origin_time),
        earlier than its arrival here by the time it already waited in a gateway."""
        return self.slo.origin_time

    @property
    def admitted(self) -> bool:
        return self.mode is Mode.ADMITTED

    @property
    def ttft_deadline(self) -> float:
        return self.arrival + self.slo.budgets.ttft_s

    @property
    def prefill_left(self) -> int:
        """Tokens to compute before the next decode step: the prompt, plus after a
        preemption every output token but the last (the last is the next decode's input)."""
        return max(0, self.prompt_tokens + max(0, self.output_tokens - 1) - self.computed_tokens)

    @property
    def decoding(self) -> bool:
        """Its next step is a decode step of one token. (With async scheduling a request can
        be here before its first token is back: it then still counts against its TTFT.)"""
        return self.prefill_left == 0

    @property
    def context_tokens(self) -> int:
        return self.computed_tokens

    @property
    def next_tpot_s(self) -> float:
        """TPOT budget of the next token (the current stage's)."""
        return self._tpot_for_token(max(1, self.output_tokens))

    @property
    def thinking(self) -> bool:
        """Whether it may still produce thinking tokens (held to the thinking TPOT)."""
        budgets = self.slo.budgets
        if budgets.thinking_tpot_s is None:
            return False
        end = budgets.thinking_tokens or self.thinking_ended_at
        return end is None or self.output_tokens < end

    def _tpot_for_token(self, index: int) -> float:
        return self.slo.budgets.tpot_for_token(index, self.thinking_ended_at)

    def next_deadline(self, tolerance: float = 1.0, delivery_s: float = 0.0) -> float:
        """When the next token is due: the first token's TTFT deadline, else the decode clock
        (it starts at the later of the TTFT deadline and the first token, §1). `tolerance`
        scales the budgets as the attainment judge does (1.05).

        With `delivery_s` (from a step's end to its tokens reaching the client): when the step
        that produces the token must end. The client sees every token that much after its
        step, the first one too, so where the decode clock starts at the first token it moves
        with it, and only deadlines counted from the arrival come earlier.
        """
        budgets = self.slo.budgets
        if self.output_tokens == 0 or self.first_token_at is None:
            return self.arrival + tolerance * budgets.ttft_s - delivery_s
        start = max(self.ttft_deadline - delivery_s, self.first_token_at)
        return start + tolerance * (self._decode_budget_s + self.next_tpot_s)

    def planning_deadline(self, delivery_s: float = 0.0) -> float:
        """When the step producing the next token should end, as the planner works to it.

        The first token: its TTFT deadline. A decode token: the judge's line (1.05 x the
        budgets, §2) less a reserve of RESERVE_TPOTS of its TPOT, so a step that overruns its
        prediction is absorbed. Early in a stream this is stricter than the budget itself;
        further on, the 5% of a growing budget is slack the planner may use.
        """
        if self.output_tokens == 0 or self.first_token_at is None:
            return self.ttft_deadline - delivery_s
        return self.next_deadline(TOLERANCE, delivery_s) - RESERVE_TPOTS * self.next_tpot_s

    def on_tokens(self, count: int, now: float) -> None:
        """`count` new output tokens came out of a step that ended at `now`."""
        for _ in range(count):
            self.output_tokens += 1
            if self.output_tokens == 1:
                self.first_token_at = now
            else:
                self._decode_budget_s += self._tpot_for_token(self.output_tokens - 1)

    def end_thinking(self) -> None:
        """The model ended its thinking stage: the tokens from the next one on are answer
        tokens, held to the answer TPOT."""
        if self.thinking_ended_at is None and self.slo.budgets.thinking_tpot_s is not None:
            self.thinking_ended_at = self.output_tokens

    def demote(self, reason: Reason) -> None:
        self.mode = Mode.BEST_EFFORT
        self.reason = reason

"""Stock vLLM's own settings the comparison turns, shared by the benchmark's real vLLM servers
(systems.py, targets.py) and the simulator's stand-ins for them (simulator_policies.py).

Kept apart from both so the simulator needs neither the HTTP client nor the servers.
"""

from __future__ import annotations

import enum
import math

from sloserve.slo import Budgets


class VllmKnob(enum.Enum):
    """Which of vLLM's own settings a stock-vLLM variant turns."""

    DEFAULT = "default settings"
    TOKEN_BUDGET = "token budget (--max-num-batched-tokens)"
    PRIORITY = "priority policy (--scheduling-policy priority)"
    LONG_PREFILL = "long prefill cap (--long-prefill-token-threshold)"
    QUEUED_TOKENS = "queue admission (--max-num-queued-tokens)"
    MAX_SEQS = "running batch (--max-num-seqs)"


def vllm_priority(budgets: Budgets) -> int:
    """vLLM's per-request `priority` (lower runs first, ties by arrival) from a request's
    binding budget: the tightest of its TTFT and its stage TPOTs (the thinking TPOT of a
    reasoning request), in whole microseconds, so budgets a few percent apart stay distinct."""
    tightest = min(budgets.ttft_s, budgets.tpot_s, budgets.thinking_tpot_s or math.inf)
    return round(tightest * 1_000_000)

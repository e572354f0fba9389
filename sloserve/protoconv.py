"""Conversions between sloserve's SLO types and their protobuf messages."""

from __future__ import annotations

from google.protobuf import duration_pb2

from sloserve.slo import Budgets, SloOutcome
from sloserve.v1 import slo_pb2


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def seconds(d: duration_pb2.Duration) -> float:
    return d.ToNanoseconds() / 1e9


def budgets_to_proto(budgets: Budgets) -> slo_pb2.SloBudgets:
    message = slo_pb2.SloBudgets(
        ttft=duration(budgets.ttft_s),
        tpot=duration(budgets.tpot_s),
        thinking_tokens=budgets.thinking_tokens,
    )
    if budgets.thinking_tpot_s is not None:
        message.thinking_tpot.CopyFrom(duration(budgets.thinking_tpot_s))
    return message


def outcome_to_proto(outcome: SloOutcome, admitted: bool) -> slo_pb2.SloOutcome:
    return slo_pb2.SloOutcome(
        ttft=duration(outcome.ttft_s),
        mean_tpot=duration(outcome.mean_tpot_s),
        max_inter_token=duration(outcome.max_inter_token_s),
        ttft_met=outcome.ttft_met,
        tpot_met=outcome.tpot_met,
        late_tokens=outcome.late_tokens,
        attained=admitted and outcome.met,
    )

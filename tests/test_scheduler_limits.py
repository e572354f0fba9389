"""The SLO scheduler keeps vLLM's invariants at and past its limits.

vLLM's own scheduler, driven in process with a stand-in model (sloserve/bench/scheduler_loop.py),
with sloserve's policy inside: arrivals faster than the engine drains them, running requests the
plan hides for a step, and requests vLLM preempts when the KV cache runs out and resumes later.
Hidden requests once made room that vLLM filled with waiting ones, so the running list outgrew
`max_num_seqs` when they came back and vLLM's next `schedule()` failed its own assertion.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from vllm.v1.request import Request, RequestStatus

from sloserve.bench.scheduler_loop import SAMPLED_TOKEN, LoopConfig, SchedulerLoop
from sloserve.replica.planner import StepPlan
from sloserve.slo import Budgets, RequestSlo
from sloserve.stepmodel import shipped_profile

MAX_SEQS = 8
BUDGET = 256


def _slo(request_id: str, ttft_s: float, tpot_s: float) -> RequestSlo:
    budgets = Budgets(ttft_s=ttft_s, tpot_s=tpot_s)
    return RequestSlo(request_id, "stress", budgets, True, time.time())


class _Counted:
    """Counts the requests the scheduler hides each step (its `_arrange`)."""

    def __init__(self, loop: SchedulerLoop) -> None:
        self.hidden_steps = 0
        scheduler: Any = loop.scheduler
        arrange = scheduler._arrange

        def counting(plan: StepPlan) -> list[Request]:
            hidden: list[Request] = arrange(plan)
            self.hidden_steps += bool(hidden)
            return hidden

        scheduler._arrange = counting


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kv_tokens", [64 * 1024, 1024], ids=["roomy-kv", "preempting-kv"])
def test_running_never_exceeds_max_num_seqs(
    tiny_model: Path, async_scheduling: bool, kv_tokens: int
) -> None:
    loop = SchedulerLoop(
        LoopConfig(
            model=tiny_model,
            kv_tokens=kv_tokens,
            max_num_seqs=MAX_SEQS,
            max_num_batched_tokens=BUDGET,
            async_scheduling=async_scheduling,
            profile=shipped_profile("cpu-bench").to_json(),
        )
    )
    scheduler: Any = loop.scheduler
    counted = _Counted(loop)
    preempted: set[str] = set()
    arrived: list[str] = []
    for step in range(5000):
        if step < 200 and step % 2 == 0:  # three arrivals every other step: past the seats
            for _ in range(3):
                request_id = f"r{len(arrived)}"
                arrived.append(request_id)
                # Loose budgets: decodes run far ahead of schedule and the plan hides them
                # while prefills wait.
                loop.add([loop.request(request_id, 40 + len(arrived) % 5 * 30, 30,
                                       _slo(request_id, 5.0, 1.0))])  # fmt: skip
        output = loop.step()
        preempted |= set(output.preempted_req_ids or ())
        assert len(scheduler.running) <= MAX_SEQS, f"step {step}: {len(scheduler.running)} running"
        assert len(output.num_scheduled_tokens) <= MAX_SEQS
        assert output.total_num_scheduled_tokens <= BUDGET
        if step >= 200 and not scheduler.has_requests():
            break
    else:
        pytest.fail(f"{len(scheduler.requests)} requests still held after 5,000 steps")
    loop.drain()
    assert counted.hidden_steps > 0, "the plan never hid a running request"
    if kv_tokens < 4096:  # fewer blocks than seats can hold
        assert preempted, "the small KV cache never made vLLM preempt"
    # Every request ended (completed, or answered with a rejection), none was lost.
    assert loop.finished_ids() == set(arrived)


def test_a_stream_its_client_ends_teaches_its_output_length(tiny_model: Path) -> None:
    """A client that closes its stream has had its answer: its length counts for the class
    as one the model ended would (the benchmark's clients end every request so)."""
    loop = SchedulerLoop(
        LoopConfig(
            model=tiny_model,
            kv_tokens=64 * 1024,
            max_num_seqs=32,
            max_num_batched_tokens=BUDGET,
            profile=shipped_profile("cpu-bench").to_json(),
        )
    )
    scheduler: Any = loop.scheduler
    ids = [f"c{i}" for i in range(25)]
    loop.add(loop.request(i, 20, 200, _slo(i, 60.0, 1.0)) for i in ids)
    while min(scheduler.requests[i].num_output_tokens for i in ids) < 7:
        loop.step()
    loop.drain()
    lengths = {scheduler.requests[i].num_output_tokens for i in ids}
    scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)  # the engine core's abort
    # The 90th percentile of what the 25 streams produced, not max_tokens (200).
    assert scheduler.slo_policy.lengths.expected("stress", 200) == max(lengths) < 200


def test_the_end_of_thinking_is_read_with_vllms_reasoning_parser(tiny_model: Path) -> None:
    """A reasoning request is held to its thinking TPOT until the model ends its thinking;
    the engine's reasoning parser (deepseek_r1: `</think>`) tells the scheduler when."""
    end_of_thinking = json.loads((tiny_model / "tokenizer.json").read_text())
    think_end = next(t["id"] for t in end_of_thinking["added_tokens"] if t["content"] == "</think>")
    thinking_for = 6  # output tokens before the model emits </think>

    def sample(request: Request) -> int:
        return think_end if request.num_output_tokens == thinking_for else SAMPLED_TOKEN

    loop = SchedulerLoop(
        LoopConfig(
            model=tiny_model,
            kv_tokens=64 * 1024,
            max_num_seqs=8,
            max_num_batched_tokens=BUDGET,
            profile=shipped_profile("cpu-bench").to_json(),
            reasoning_parser="deepseek_r1",
        ),
        sample=sample,
    )
    budgets = Budgets(ttft_s=60.0, tpot_s=1.0, thinking_tpot_s=0.5)
    slo = RequestSlo("think", "reasoning", budgets, True, time.time())
    loop.add([loop.request("think", 20, 40, slo)])
    tracked = loop.scheduler.slo_policy.requests["think"]  # type: ignore[attr-defined]
    while tracked.output_tokens <= thinking_for:  # </think> is token thinking_for + 1
        assert tracked.thinking and tracked.next_tpot_s == 0.5, tracked.output_tokens
        loop.step()
    assert tracked.output_tokens == thinking_for + 1
    assert not tracked.thinking and tracked.next_tpot_s == 1.0
    assert tracked.thinking_ended_at == thinking_for + 1  # the index of the first answer token


def test_without_a_reasoning_parser_every_token_keeps_the_thinking_tpot(tiny_model: Path) -> None:
    loop = SchedulerLoop(
        LoopConfig(
            model=tiny_model,
            kv_tokens=64 * 1024,
            max_num_seqs=8,
            max_num_batched_tokens=BUDGET,
            profile=shipped_profile("cpu-bench").to_json(),
        )
    )
    budgets = Budgets(ttft_s=60.0, tpot_s=1.0, thinking_tpot_s=0.5)
    loop.add([loop.request("think", 20, 12, RequestSlo("think", "r", budgets, True, time.time()))])
    tracked = loop.scheduler.slo_policy.requests["think"]  # type: ignore[attr-defined]
    while tracked.output_tokens < 10:
        loop.step()
    assert tracked.thinking and tracked.next_tpot_s == 0.5

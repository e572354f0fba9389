"""Reports from the engine core (steps, verdicts) over a real Unix socket, the front end's
verdict registry, and the deadline-ordered waiting queue."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import cast

from vllm.v1.request import Request

from sloserve.replica.deadline_queue import DeadlineQueue
from sloserve.replica.reports import (
    ReportReceiver,
    ReportSender,
    StepRecord,
    VerdictRecord,
    decode,
)
from sloserve.replica.verdicts import Verdicts
from sloserve.stepmodel import StepShape


def test_reports_cross_a_real_socket(tmp_path: Path) -> None:
    steps: list[StepRecord] = []
    verdicts: list[VerdictRecord] = []
    both = threading.Event()

    def on_step(record: StepRecord) -> None:
        steps.append(record)

    def on_verdict(record: VerdictRecord) -> None:
        verdicts.append(record)
        both.set()

    receiver = ReportReceiver(tmp_path / "r.sock", on_step, on_verdict)
    try:
        sender = ReportSender(str(receiver.path))
        step = StepRecord(StepShape(130, 3, 900), prefill_tokens=128, seconds=0.021, planner_s=4e-5)
        verdict = VerdictRecord("req-ü-1", "rejected", "COMPUTE", "coding")
        sender.send(step)
        sender.send(verdict)
        assert both.wait(5)
    finally:
        receiver.close()
    assert steps == [step] and verdicts == [verdict]
    assert sender.dropped == 0


def test_unknown_reports_are_ignored() -> None:
    assert decode(b"Xwhatever") is None
    assert decode(b"S" + b"\0" * 3) is None  # a truncated step


def test_a_sender_without_a_receiver_drops_and_counts(tmp_path: Path) -> None:
    sender = ReportSender(str(tmp_path / "nobody.sock"))
    sender.send(VerdictRecord("r", "admitted", "", "chat"))
    assert sender.dropped == 1


def test_verdicts_reach_the_waiting_handler() -> None:
    async def scenario() -> None:
        registry = Verdicts()
        registry.bind(asyncio.get_running_loop())
        arrival = registry.expect("a")
        registry.deliver_threadsafe(VerdictRecord("a", "best_effort", "MEMORY", "chat"))
        assert (await asyncio.wait_for(arrival, 5)).reason == "MEMORY"
        # a demotion later is kept for the handler's next look
        registry.deliver_threadsafe(VerdictRecord("a", "demoted", "EXPIRED", "chat"))
        await asyncio.sleep(0.01)
        later = registry.take_later("a")
        assert later is not None and later.event == "demoted"
        assert registry.take_later("a") is None
        # once the handler is gone, nothing more is kept for it
        registry.forget("a")
        registry.deliver_threadsafe(VerdictRecord("a", "demoted", "EXPIRED", "chat"))
        await asyncio.sleep(0.01)
        assert registry.take_later("a") is None
        # forgetting a request still waiting cancels its future
        pending = registry.expect("b")
        registry.forget("b")
        assert pending.cancelled()

    asyncio.run(scenario())


def _request(request_id: str) -> Request:
    return cast(Request, SimpleNamespace(request_id=request_id))


def test_the_waiting_queue_orders_by_key_fifo_among_equals() -> None:
    keys = {"late": (0, 5.0), "soon": (0, 1.0), "be": (1, 0.0), "soon2": (0, 1.0)}
    queue = DeadlineQueue(lambda r: keys[r.request_id])
    for name in ("late", "be", "soon", "soon2"):
        queue.add_request(_request(name))
    assert [r.request_id for r in queue] == ["soon", "soon2", "late", "be"]
    assert queue.peek_request().request_id == "soon" and len(queue) == 4
    first = queue.pop_request()
    queue.prepend_request(first)  # back by its key, not to the head regardless
    assert [r.request_id for r in queue] == ["soon2", "soon", "late", "be"]
    keys["be"] = (0, 0.5)  # re-keyed (promotion never happens; demotion does the same)
    be = next(r for r in queue if r.request_id == "be")
    queue.remove_request(be)
    queue.add_request(be)
    assert queue.peek_request().request_id == "be"
    queue.remove_requests([r for r in queue if r.request_id.startswith("soon")])
    assert [r.request_id for r in queue] == ["be", "late"] and bool(queue)

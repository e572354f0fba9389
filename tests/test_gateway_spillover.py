"""The best-effort queue: deadline order, per-class bounds, TTL, withdrawal (no replicas)."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_gateway_routing import FakeReplica

from sloserve.gateway.replica_pool import Outstanding, ReplicaPool
from sloserve.gateway.routing import RequestShape, Router
from sloserve.gateway.spillover import QueueFull, Spilled, SpilloverDrainer, SpilloverQueue
from sloserve.v1 import replica_control_pb2

SHAPE = RequestShape(prompt_tokens=10, ttft_budget_s=1.0)


def entry(request_id: str, deadline: float, class_name: str = "chat", ttl_s: float = 30) -> Spilled:
    return Spilled(
        request_id=request_id,
        class_name=class_name,
        deadline=deadline,
        expires_at=time.monotonic() + ttl_s,
        shape=SHAPE,
        reason="COMPUTE",
    )


def drain(queue: SpilloverQueue) -> list[str]:
    order = []
    while (e := queue.pop()) is not None:
        order.append(e.request_id)
    return order


def test_entries_leave_earliest_deadline_first_across_classes() -> None:
    async def scenario() -> list[str]:
        queue = SpilloverQueue(capacity_per_class=10)
        queue.push(entry("late", 30.0, "chat"))
        queue.push(entry("early", 10.0, "coding"))
        queue.push(entry("middle", 20.0, "chat"))
        assert queue.depths() == {"chat": 2, "coding": 1}
        return drain(queue)

    assert asyncio.run(scenario()) == ["early", "middle", "late"]


def test_each_class_is_bounded_on_its_own() -> None:
    async def scenario() -> None:
        queue = SpilloverQueue(capacity_per_class=2, ttl_s=30)
        queue.push(entry("a", 1.0))
        queue.push(entry("b", 2.0))
        with pytest.raises(QueueFull) as full:
            queue.push(entry("c", 3.0))
        # A slot frees at the latest when the oldest entry's TTL runs out.
        assert 0 < full.value.retry_after_s <= 30
        queue.push(entry("other-class", 3.0, "coding"))  # another class still has room
        assert queue.depth() == 3
        queue.pop()
        queue.push(entry("c", 3.0))  # popping freed a slot of its class

    asyncio.run(scenario())


def test_expired_entries_are_skipped_and_free_their_slot() -> None:
    async def scenario() -> list[str]:
        queue = SpilloverQueue(capacity_per_class=2)
        queue.push(entry("expired", 1.0, ttl_s=-1))
        queue.push(entry("alive", 2.0))
        assert queue.peek() is not None and queue.peek().request_id == "alive"  # type: ignore[union-attr]
        assert queue.depth("chat") == 1
        return drain(queue)

    assert asyncio.run(scenario()) == ["alive"]


def test_withdrawn_entries_leave_the_queue() -> None:
    async def scenario() -> list[str]:
        queue = SpilloverQueue()
        gone = entry("gone", 1.0)
        queue.push(gone)
        queue.push(entry("stays", 2.0))
        queue.withdraw(gone)
        assert gone.granted.cancelled()
        assert queue.depth() == 1
        return drain(queue)

    assert asyncio.run(scenario()) == ["stays"]


def test_a_requeued_entry_keeps_its_place() -> None:
    async def scenario() -> list[str]:
        queue = SpilloverQueue(capacity_per_class=2)
        first = entry("first", 1.0)
        queue.push(first)
        queue.push(entry("second", 2.0))
        assert queue.pop() is first
        queue.push(entry("third", 3.0))
        first.granted = asyncio.get_running_loop().create_future()
        queue.requeue(first)  # its replica turned it away: back in line, ahead of the others
        return drain(queue)

    assert asyncio.run(scenario()) == ["first", "second", "third"]


def test_a_replica_has_room_for_spilled_work_only_when_nothing_waits_there() -> None:
    def fake(running: int = 0, waiting: int = 0, ours: Outstanding | None = None) -> FakeReplica:
        report = replica_control_pb2.LoadReport(ready=True, running=running, waiting=waiting)
        return FakeReplica("r", report, ours or Outstanding())

    async def scenario() -> None:
        drainer = SpilloverDrainer(SpilloverQueue(), ReplicaPool(), Router(), max_in_flight=2)
        assert drainer.has_room(fake())
        assert drainer.has_room(fake(running=1))
        assert not drainer.has_room(fake(running=2))  # at the bound
        assert not drainer.has_room(fake(waiting=1))  # the engine queues already
        # The gateway's own request, sent since the last report, still awaits its first token.
        assert not drainer.has_room(fake(ours=Outstanding(1, 1, 100)))
        assert not drainer.has_room(fake(ours=Outstanding(in_flight=2)))
        assert not drainer.has_room(FakeReplica("r", None))  # no report yet

    asyncio.run(scenario())

"""The best-effort queue: requests that no replica admits with their SLO, but that accept
best-effort service, wait here instead of piling onto replicas that are already full.

- Bounded per SLO class: a burst of one class cannot crowd out the others' spill.
- Each entry has a TTL: it is answered (QUEUE_TIMEOUT) rather than left waiting forever.
- Drained earliest deadline (arrival + TTFT budget) first, across classes.

The drainer hands an entry a replica (as a Ticket, so the slot is counted at once) when a
replica has room for best-effort work: nothing of the gateway's waiting for a first token
there, an empty engine queue, and fewer than `max_in_flight` requests running. It looks again
whenever the pool says capacity may have changed: a load report, a finished request.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sloserve.gateway.replica_pool import ReplicaHandle, ReplicaPool, Ticket
from sloserve.gateway.routing import Candidate, RequestShape, Router


@dataclass(eq=False)
class Spilled:
    """One waiting request. `granted` resolves to the Ticket of the replica it may use."""

    request_id: str
    class_name: str
    deadline: float  # wall-clock time its first token was due
    expires_at: float  # time.monotonic() after which it is answered QUEUE_TIMEOUT
    shape: RequestShape
    reason: str  # why replicas turned it away (COMPUTE, MEMORY, QUEUE_FULL, ...)
    granted: asyncio.Future[Ticket] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    queued: bool = True


class QueueFull(Exception):
    def __init__(self, class_name: str, capacity: int, retry_after_s: float) -> None:
        super().__init__(
            f"the best-effort queue of class {class_name or '(budgets)'!r} is full "
            f"({capacity} waiting)"
        )
        self.retry_after_s = retry_after_s


class SpilloverQueue:
    def __init__(self, capacity_per_class: int = 64, ttl_s: float = 30.0) -> None:
        self.capacity_per_class = capacity_per_class
        self.ttl_s = ttl_s
        self._heap: list[tuple[float, int, Spilled]] = []
        self._order = itertools.count()
        self._depth: dict[str, int] = {}
        self._by_class: dict[str, list[Spilled]] = {}

    def depth(self, class_name: str | None = None) -> int:
        if class_name is None:
            return sum(self._depth.values())
        return self._depth.get(class_name, 0)

    def depths(self) -> dict[str, int]:
        return dict(self._depth)

    def push(self, entry: Spilled) -> None:
        """Queues `entry`; raises QueueFull when its class has no room."""
        waiting = self._by_class.setdefault(entry.class_name, [])
        if len(waiting) >= self.capacity_per_class:
            # A slot frees up at the latest when the oldest entry's TTL runs out.
            first_expiry = min(e.expires_at for e in waiting)
            retry = max(0.1, first_expiry - time.monotonic())
            raise QueueFull(entry.class_name, self.capacity_per_class, retry)
        waiting.append(entry)
        self._depth[entry.class_name] = len(waiting)
        heapq.heappush(self._heap, (entry.deadline, next(self._order), entry))

    def requeue(self, entry: Spilled) -> None:
        """Puts back an entry whose replica turned it away; it keeps its place (deadline)
        and may exceed the bound by itself, as it held a slot a moment ago."""
        entry.queued = True
        waiting = self._by_class.setdefault(entry.class_name, [])
        waiting.append(entry)
        self._depth[entry.class_name] = len(waiting)
        heapq.heappush(self._heap, (entry.deadline, next(self._order), entry))

    def _unlist(self, entry: Spilled) -> None:
        entry.queued = False
        waiting = self._by_class[entry.class_name]
        waiting.remove(entry)
        self._depth[entry.class_name] = len(waiting)

    def peek(self, now: float | None = None) -> Spilled | None:
        """The live entry with the earliest deadline; drops expired and withdrawn ones."""
        now = time.monotonic() if now is None else now
        while self._heap:
            entry = self._heap[0][2]
            if entry.queued and entry.expires_at > now and not entry.granted.done():
                return entry
            heapq.heappop(self._heap)
            if entry.queued:
                self._unlist(entry)
        return None

    def pop(self, now: float | None = None) -> Spilled | None:
        entry = self.peek(now)
        if entry is not None:
            heapq.heappop(self._heap)
            self._unlist(entry)
        return entry

    def withdraw(self, entry: Spilled) -> None:
        """The waiter gives up (TTL or client gone); frees a slot granted meanwhile."""
        if entry.queued:
            self._unlist(entry)  # its heap item is dropped lazily
        if entry.granted.done() and not entry.granted.cancelled():
            entry.granted.result().close()
        else:
            entry.granted.cancel()


class SpilloverDrainer:
    """Grants queued requests to replicas with room, whenever capacity may have changed."""

    def __init__(
        self,
        queue: SpilloverQueue,
        pool: ReplicaPool,
        router: Router,
        max_in_flight: int = 4,
        on_depth: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.queue = queue
        self.max_in_flight = max_in_flight
        self._pool = pool
        self._router = router
        self._wake = asyncio.Event()
        self._on_depth = on_depth
        pool.subscribe(self.poke)

    def poke(self) -> None:
        self._wake.set()

    def has_room(self, replica: Candidate) -> bool:
        report, ours = replica.report, replica.outstanding
        if report is None or ours.awaiting_first_token > 0 or report.waiting > 0:
            return False
        return max(report.running, ours.in_flight) < self.max_in_flight

    def drain_once(self) -> int:
        """Grants as many queued entries as replicas have room for; returns how many."""
        granted = 0
        while (entry := self.queue.peek()) is not None:
            roomy: Sequence[ReplicaHandle] = [
                r for r in self._pool.in_rotation() if self.has_room(r)
            ]
            if not roomy:
                break
            best = self._router.rank(roomy, entry.shape)[0]
            self.queue.pop()
            entry.granted.set_result(self._pool.ticket(best, entry.shape.prompt_tokens))
            granted += 1
        if self._on_depth is not None:
            self._on_depth(self.queue.depths())
        return granted

    async def run(self) -> None:
        """Drains until cancelled. Also wakes once a second, to drop expired entries."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            self.drain_once()

"""vLLM's waiting queue, ordered by SLO urgency instead of arrival.

vLLM's scheduler takes waiting requests from the head of this queue while its token budget
lasts. Ordering it by the policy's key (admitted requests by next deadline, then best effort)
makes that loop serve prefills earliest-deadline-first. A request's key is fixed while it
waits, except when it is demoted; the scheduler then removes and re-adds it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator

from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.request import Request

Key = tuple[int, float]


class DeadlineQueue(RequestQueue):
    def __init__(self, key: Callable[[Request], Key]) -> None:
        self._key = key
        # Sorted by (key, insertion number); the number keeps equal keys in FIFO order.
        self._entries: list[tuple[Key, int, Request]] = []
        self._counter = 0

    def add_request(self, request: Request) -> None:
        self._counter += 1
        bisect.insort(self._entries, (self._key(request), self._counter, request))

    def pop_request(self) -> Request:
        if not self._entries:
            raise IndexError("pop from an empty queue")
        return self._entries.pop(0)[2]

    def peek_request(self) -> Request:
        if not self._entries:
            raise IndexError("peek at an empty queue")
        return self._entries[0][2]

    def prepend_request(self, request: Request) -> None:
        # A preempted or skipped request goes back in by its key: it is as urgent as its
        # deadline says, not more.
        self.add_request(request)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.add_request(request)

    def remove_request(self, request: Request) -> None:
        self.remove_requests([request])

    def remove_requests(self, requests: Iterable[Request]) -> None:
        gone = {id(r) for r in requests}
        self._entries = [e for e in self._entries if id(e[2]) not in gone]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Request]:
        return iter([e[2] for e in self._entries])

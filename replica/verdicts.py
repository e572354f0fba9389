"""The engine's admission verdicts, as the front end's request handlers wait for them.

The SLO policy decides inside the engine core and reports each verdict over the report socket
(reports.py). A request handler registers before it submits the request and then waits for
whichever comes first: the verdict, or the engine's first output for the request. Outputs
always come, so a lost verdict never hangs a request (it is then taken as admitted). Later
verdicts (demoted, aborted) are kept for the handler to pick up with its next tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sloserve.replica.reports import VerdictRecord

ARRIVAL_EVENTS = ("admitted", "best_effort", "rejected")


class Verdicts:
    def __init__(self, on_verdict: Callable[[VerdictRecord], None] | None = None) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrival: dict[str, asyncio.Future[VerdictRecord]] = {}
        self._later: dict[str, VerdictRecord] = {}
        self._active: set[str] = set()  # handlers still running
        self._on_verdict = on_verdict

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def expect(self, request_id: str) -> asyncio.Future[VerdictRecord]:
        """Registers a request before it is submitted; the future holds its arrival verdict."""
        future: asyncio.Future[VerdictRecord] = asyncio.get_running_loop().create_future()
        self._arrival[request_id] = future
        self._active.add(request_id)
        return future

    def take_later(self, request_id: str) -> VerdictRecord | None:
        """A demotion or abort reported since the last call, if any."""
        return self._later.pop(request_id, None)

    def forget(self, request_id: str) -> None:
        future = self._arrival.pop(request_id, None)
        if future is not None and not future.done():
            future.cancel()
        self._later.pop(request_id, None)
        self._active.discard(request_id)

    def deliver_threadsafe(self, record: VerdictRecord) -> None:
        """Called from the report receiver's thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, record)

    def _deliver(self, record: VerdictRecord) -> None:
        if self._on_verdict is not None:
            self._on_verdict(record)
        if record.event in ARRIVAL_EVENTS:
            future = self._arrival.pop(record.request_id, None)
            if future is not None and not future.done():
                future.set_result(record)
        elif record.request_id in self._active:
            self._later[record.request_id] = record

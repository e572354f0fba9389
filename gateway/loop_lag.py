"""How late the gateway's event loop runs what is due: time no clock of the gateway's sees.

A request's SLO clock starts when the gateway's handler first runs for it. When the event loop
is busy (JSON, TLS, many streams), a request that has already arrived on the socket waits for
the loop before its handler runs, and every token waits before it is written; a client counts
that time and the gateway cannot. The monitor sleeps a fixed interval and measures how much
later than asked it wakes: that overshoot is the loop's lag at that moment. It is exported as
a histogram (`sloserve_gateway_event_loop_lag_seconds`) and its recent maximum is in the SLO
summary, so a gap between the gateway's attainment and a client's is explained, not hidden.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import CollectorRegistry, Histogram

INTERVAL_S = 0.05
# Lags kept for the summary's recent maximum: the last ~10 s at the interval above.
_RECENT = 200
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class LoopLag:
    def __init__(self, registry: CollectorRegistry, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._recent: deque[float] = deque(maxlen=_RECENT)
        self._histogram = Histogram(
            "sloserve_gateway_event_loop_lag_seconds",
            "How much later than due the gateway's event loop ran a timer: time a request or "
            "a token waited for the loop, which the gateway's own SLO clock does not see.",
            buckets=_BUCKETS,
            registry=registry,
        )

    async def run(self) -> None:
        """Measures until cancelled."""
        while True:
            asked = time.monotonic()
            await asyncio.sleep(self.interval_s)
            self.observe(max(0.0, time.monotonic() - asked - self.interval_s))

    def observe(self, lag_s: float) -> None:
        self._recent.append(lag_s)
        self._histogram.observe(lag_s)

    def recent_max_s(self) -> float | None:
        """The largest lag over the last ~10 s; None before the first measurement."""
        return max(self._recent) if self._recent else None

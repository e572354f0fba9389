"""Session affinity: which replica served a session's last round.

The rounds of a multi-round session (tool calling: the model calls a tool, the client sends
the result back with the whole conversation so far) share a growing prompt prefix; sending
them to the replica that served the previous round lets its prefix cache skip most of the
prefill. The table only remembers; the dispatcher decides whether the pinned replica is
still in rotation and still feasible for this round's SLO, and re-pins when it moves.

Bounded both ways, so sessions that clients abandon cost nothing for long: at most
`capacity` sessions (the least recently used is forgotten first) and each for `ttl_s` after
its last round.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# A session is one client's: keyed by (tenant, session id), so one tenant cannot steer
# another's rounds by guessing its session ids.
SessionKey = tuple[str, str]


class AffinityTable:
    def __init__(
        self,
        capacity: int = 100_000,
        ttl_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or ttl_s <= 0:
            raise ValueError("an affinity table needs capacity >= 1 and ttl_s > 0")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        # session -> (replica endpoint, when it was last used); oldest use first.
        self._pins: OrderedDict[SessionKey, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    def get(self, session: SessionKey) -> str | None:
        """The replica pinned for `session`, or None (never pinned, expired or evicted)."""
        pin = self._pins.get(session)
        if pin is None:
            return None
        endpoint, used_at = pin
        if self._clock() - used_at > self.ttl_s:
            del self._pins[session]
            return None
        return endpoint

    def pin(self, session: SessionKey, endpoint: str) -> None:
        """Records that `endpoint` served `session` now; forgets the oldest beyond capacity."""
        now = self._clock()
        self._pins[session] = (endpoint, now)
        self._pins.move_to_end(session)
        while len(self._pins) > self.capacity:
            self._pins.popitem(last=False)
        # Expired entries at the old end go too, so an idle table does not hold them forever.
        while self._pins:
            oldest, (_, used_at) = next(iter(self._pins.items()))
            if now - used_at <= self.ttl_s:
                break
            del self._pins[oldest]

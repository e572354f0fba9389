"""Failed requests in the gateway's log without flooding it: at most one line per kind of
failure per interval, the next one saying how many were left out in between.

A replica that fails takes many requests with it at once; one line a second per reason says
what happens, and the counters (gateway/metrics.py) say how often.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Key:
    last_at: float
    suppressed: int = 0


class ThrottledLog:
    """Logs through `logger`, at most once per key per `interval_s`."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._keys: dict[str, _Key] = {}

    def log(self, level: int, key: str, message: str) -> bool:
        """Logs `message` unless a line of `key` was logged less than an interval ago;
        True when it was logged."""
        now = self._clock()
        seen = self._keys.get(key)
        if seen is not None and now - seen.last_at < self._interval_s:
            seen.suppressed += 1
            return False
        if seen is not None and seen.suppressed:
            message += f" ({seen.suppressed} more like it in the last {now - seen.last_at:.1f} s)"
        self._keys[key] = _Key(now)
        self._logger.log(level, "%s", message)
        return True

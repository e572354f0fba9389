"""The gateway's event-loop lag monitor sees a loop that is held up, and exports it."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from sloserve.gateway.loop_lag import LoopLag


def test_a_blocked_loop_shows_as_lag_in_the_summary_and_the_histogram() -> None:
    registry = CollectorRegistry()
    lag = LoopLag(registry, interval_s=0.01)

    async def hold_the_loop() -> None:
        monitor = asyncio.create_task(lag.run())
        await asyncio.sleep(0.1)  # a few measurements of an idle loop
        idle = lag.recent_max_s()
        time.sleep(0.3)  # a handler that blocks the loop, as heavy JSON would
        await asyncio.sleep(0.05)
        monitor.cancel()
        assert idle is not None  # measured before the hold

    asyncio.run(hold_the_loop())
    held = lag.recent_max_s()
    assert held is not None and held >= 0.25
    count = registry.get_sample_value("sloserve_gateway_event_loop_lag_seconds_count")
    over = registry.get_sample_value(
        "sloserve_gateway_event_loop_lag_seconds_bucket", {"le": "0.1"}
    )
    assert count is not None and over is not None and count - over >= 1

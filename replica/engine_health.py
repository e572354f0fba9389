"""Whether the engine still serves: vLLM's own engine-death signal, and a wedge check.

- Dead: vLLM's engine client watches its engine-core process (`VLLM::EngineCore`) and, when it
  exits, marks itself errored (`AsyncLLM.errored`, what vLLM's own API server answers /health
  503 on) and ends every request's stream with EngineDeadError. Either signal is a dead engine;
  the Inference service reports the second the moment it sees it.
- Wedged: the engine core is alive but makes no progress (stopped, deadlocked, a step that
  never ends). The engine core sends its scheduler stats with every step it finishes
  (LoadListener), so an engine that holds unfinished requests and has finished no step for
  `wedge_timeout_s` while it held them is wedged. Idle time does not count: the clock starts
  at the later of its latest step and the last time it was seen without work.

Neither comes back: the replica reports the fault (ReplicaRuntime.fail_engine) and the server
exits non-zero so that its supervisor (Kubernetes) restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from sloserve.replica.runtime import ReplicaRuntime
from sloserve.replica.state import EngineFault, FaultKind

# vLLM's own liveness monitor notices a dead engine-core process within about a second.
CHECK_INTERVAL_S = 0.5


@dataclass
class WedgeCheck:
    """Judges progress from the engine's step heartbeat, one observation at a time."""

    timeout_s: float
    idle_at: float  # time.monotonic() when the engine was last seen without work

    def observe(self, now: float, unfinished: int, stepped_at: float) -> EngineFault | None:
        if unfinished == 0:
            self.idle_at = now
            return None
        stuck_s = now - max(stepped_at, self.idle_at)
        if stuck_s <= self.timeout_s:
            return None
        return EngineFault(
            FaultKind.WEDGED,
            f"no engine step finished for {stuck_s:.0f} s with {unfinished} request(s) "
            f"unfinished (--wedge-timeout {self.timeout_s:g} s)",
        )


def dead_fault(engine: Any) -> EngineFault | None:
    """A fault when vLLM says its engine is dead (AsyncLLM.errored), else None."""
    if not engine.errored:
        return None
    return EngineFault(FaultKind.DEAD, f"vLLM's engine client reports {engine.dead_error!r}")


async def watch_engine(runtime: ReplicaRuntime, wedge_timeout_s: float | None) -> EngineFault:
    """Returns the engine's fault once there is one (reported to `runtime` already).

    `wedge_timeout_s` None turns the wedge check off. Call once the engine serves."""
    engine = runtime.engine
    wedge = WedgeCheck(wedge_timeout_s, time.monotonic()) if wedge_timeout_s is not None else None
    while runtime.state.fault is None:
        fault = dead_fault(engine)
        if fault is None and wedge is not None:
            fault = wedge.observe(
                time.monotonic(),
                engine.get_num_unfinished_requests(),
                runtime.listener.stepped_at(),
            )
        if fault is not None:
            runtime.fail_engine(fault)
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.engine_failed.wait(), CHECK_INTERVAL_S)
    assert runtime.state.fault is not None
    return runtime.state.fault

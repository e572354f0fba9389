"""The scheduler class vLLM loads inside its engine-core process (`scheduler_cls`).

It reads each request's SLO from SamplingParams.extra_args when the request reaches the
scheduler. Scheduling policy is still vLLM's own for now; the SLO planner builds on the
per-request SLO table kept here. KV-cache bookkeeping stays with vLLM.

vLLM runs a different base class when async scheduling is on (AsyncScheduler keeps output
placeholders); a scheduler that subclasses the wrong one corrupts that bookkeeping. So there
is one class per base, sharing the SLO logic, and `scheduler_class_for` picks the right one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from sloserve.replica.steps import StepRecord, StepSender
from sloserve.slo import RequestSlo
from sloserve.stepmodel import StepShape

# When set, the scheduler appends one JSON line per SLO event to this file. It lets tests and
# operators see what the engine core itself received, from outside its process.
TRACE_ENV = "SLOSERVE_SCHEDULER_TRACE"
# Key of sloserve's settings in vLLM's `additional_config`, which reaches the engine core.
CONFIG_KEY = "sloserve"


class _EventTrace:
    """Appends JSON lines to a file; a no-op without a path."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        if not self._path:
            return
        line = json.dumps({"event": event, "pid": os.getpid(), "time": time.time(), **fields})
        with self._lock, open(self._path, "a") as f:
            f.write(line + "\n")


class SloPolicyMixin:
    """SLO state shared by both scheduler bases. Must come first in the MRO."""

    # Set in __init__; declared for type checkers.
    slo_by_request: dict[str, RequestSlo]
    requests: dict[str, Request]
    _slo_trace: _EventTrace
    _step_sender: StepSender | None
    _steps_in_flight: dict[int, tuple[StepShape, int, float]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slo_by_request = {}
        self._slo_trace = _EventTrace(os.environ.get(TRACE_ENV))
        settings = getattr(self, "vllm_config").additional_config.get(CONFIG_KEY, {})  # noqa: B009
        socket_path = settings.get("step_socket")
        self._step_sender = StepSender(socket_path) if socket_path else None
        # Steps handed to the executor and not yet back, by id of their SchedulerOutput: one
        # with sync scheduling, two with async scheduling (the next step is planned while the
        # last one runs).
        self._steps_in_flight = {}

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        output: SchedulerOutput = super().schedule(*args, **kwargs)  # type: ignore[misc]
        if self._step_sender is not None and output.total_num_scheduled_tokens > 0:
            shape, prefill = self._shape_of(output)
            self._steps_in_flight[id(output)] = (shape, prefill, time.perf_counter())
        return output

    def _shape_of(self, output: SchedulerOutput) -> tuple[StepShape, int]:
        # schedule() has already advanced num_computed_tokens past this step's tokens, so it
        # is the context the step's attention reads.
        context = prefill = 0
        for request_id, tokens in output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            context += request.num_computed_tokens
            if request.num_computed_tokens - tokens < request.num_prompt_tokens:
                prefill += tokens
        shape = StepShape(
            tokens=output.total_num_scheduled_tokens,
            requests=len(output.num_scheduled_tokens),
            context_tokens=context,
        )
        return shape, prefill

    def update_from_output(
        self, scheduler_output: SchedulerOutput, *args: Any, **kwargs: Any
    ) -> Any:
        step = self._steps_in_flight.pop(id(scheduler_output), None)
        if step is not None and self._step_sender is not None:
            shape, prefill, started = step
            self._step_sender.send(StepRecord(shape, prefill, time.perf_counter() - started))
        return super().update_from_output(scheduler_output, *args, **kwargs)  # type: ignore[misc]

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        slo = RequestSlo.from_extra_args(params.extra_args) if params is not None else None
        if slo is not None:
            self.slo_by_request[request.request_id] = slo
            self._slo_trace.write(
                "added",
                engine_request_id=request.request_id,
                request_id=slo.request_id,
                class_name=slo.class_name,
                ttft_s=slo.budgets.ttft_s,
                tpot_s=slo.budgets.tpot_s,
                thinking_tpot_s=slo.budgets.thinking_tpot_s,
                allow_best_effort=slo.allow_best_effort,
                tenant=slo.tenant,
                scheduler=type(self).__name__,
            )
        super().add_request(request)  # type: ignore[misc]

    def _free_request(self, request: Request, delay_free_blocks: bool = False) -> Any:
        # Every finished request passes here (stopped, length, or aborted by the client).
        freed = super()._free_request(request, delay_free_blocks)  # type: ignore[misc]
        slo = self.slo_by_request.pop(request.request_id, None)
        if slo is not None:
            self._slo_trace.write(
                "freed",
                engine_request_id=request.request_id,
                request_id=slo.request_id,
                status=request.status.name,
            )
        return freed


class SloScheduler(SloPolicyMixin, Scheduler):
    """For engines with async scheduling off."""


class SloAsyncScheduler(SloPolicyMixin, AsyncScheduler):
    """For engines with async scheduling on."""


def scheduler_class_for(async_scheduling: bool) -> str:
    """The qualified name vLLM should load, for the engine's async-scheduling setting."""
    cls = SloAsyncScheduler if async_scheduling else SloScheduler
    return f"{cls.__module__}.{cls.__qualname__}"

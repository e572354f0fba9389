"""A real vLLM scheduler driven in process, with no model behind it.

The engine core's loop without the engine: `SchedulerLoop` calls the scheduler's own
`schedule()` and `update_from_output()` as vLLM's `EngineCore` does, and stands in for the
model runner by sampling one token for every request whose prompt a step completes. With async
scheduling it keeps one step in flight while the next is scheduled, as `step_with_batch_queue`
does. The scheduler is vLLM's own class or sloserve's (replica/scheduler.py), built from a real
`VllmConfig` and KV-cache configuration, so every invariant vLLM asserts is checked as it would
be in a serving engine.

Two uses: stress tests that drive the scheduler at and past its limits (arrivals, hidden and
resumed requests), and `sloserve bench scheduler`, which times the whole `schedule()` of both
classes at GPU-scale loads, without the noise of a model.

Time. Without a clock the stand-in model is instant and the scheduler reads the wall clock, so
every decode is far ahead of schedule. With a `VirtualClock` each step takes the time a step
profile predicts for its shape, and sloserve's scheduler reads that clock instead (see
`_SchedulerTime`): deadlines fall due as in a serving engine, no time is spent sleeping, and a
given request stream yields the same plans on any machine, under a profiler or valgrind too.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from vllm import SamplingParams
from vllm.engine.arg_utils import EngineArgs
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import BlockHash, get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from sloserve.replica import scheduler as slo_scheduler_module
from sloserve.replica.scheduler import CONFIG_KEY, SloAsyncScheduler, SloScheduler
from sloserve.slo import RequestSlo
from sloserve.stepmodel import StepShape, StepTimeModel

# What the stand-in model samples: an ordinary token of any generated model's vocabulary (the
# special tokens come first: end-of-sequence, padding, the thinking markers).
SAMPLED_TOKEN = 20
# A virtual clock starts here: a time.time() of 2001, plausible (nothing takes it for unset)
# and far from the wall clock (a test can tell which clock a time came from).
VIRTUAL_EPOCH = 1e9
# Virtual time a step that schedules nothing takes: the engine core's loop goes round again,
# and without this the clock would stand still while nothing runs.
IDLE_STEP_S = 0.001

_T = TypeVar("_T")


class VirtualClock:
    """Engine time that passes only as the stand-in model runs steps.

    A step handed to the model starts when the model is done with the one before it (with
    async scheduling the next step is handed over while one runs) and takes what `model`
    predicts for its shape, plus `step_overhead_s` (the engine's fixed host time per step,
    which a profile may give apart, as `sloserve simulate` adds it); completing it moves the
    clock to its end.
    """

    def __init__(
        self, model: StepTimeModel, step_overhead_s: float = 0.0, start: float = VIRTUAL_EPOCH
    ) -> None:
        self.model = model
        self.step_overhead_s = step_overhead_s
        self.now = start
        self._busy_until = start

    def start_step(self, shape: StepShape) -> float:
        """Hands the model a step of `shape`; returns when it ends."""
        seconds = self.model.predict(shape) + self.step_overhead_s if shape.tokens else IDLE_STEP_S
        self._busy_until = max(self.now, self._busy_until) + seconds
        return self._busy_until

    def wait_until(self, moment: float) -> None:
        self.now = max(self.now, moment)


class _SchedulerTime:
    """Stands in for the `time` module inside replica/scheduler.py, where sloserve's
    scheduler reads the clock (deadlines, arrivals, gaps between steps): the virtual clock of
    the loop calling into it, else the real one.

    Patched in at run time, not passed in, because the scheduler is built by vLLM's code
    paths and has no clock parameter; it falls back to the real clock, so a scheduler driven
    without a virtual clock (or the replica, in another process) behaves exactly as before.
    """

    def __init__(self) -> None:
        self.clock: VirtualClock | None = None

    def time(self) -> float:
        return self.clock.now if self.clock is not None else time.time()

    def perf_counter(self) -> float:
        return self.clock.now if self.clock is not None else time.perf_counter()

    def monotonic(self) -> float:
        return self.clock.now if self.clock is not None else time.monotonic()

    def sleep(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)  # anything else the scheduler may read: the real module


_SCHEDULER_TIME = _SchedulerTime()


def _install_scheduler_time() -> None:
    vars(slo_scheduler_module)["time"] = _SCHEDULER_TIME


class Meter(Protocol):
    """Runs each call the loop makes into the scheduler; a benchmark's meter times it, or
    marks it for a profiler. `phase` is "add" (one arriving request), "schedule" or
    "update" (update_from_output)."""

    def __call__(self, phase: str, call: Callable[[], _T]) -> _T: ...


def unmetered(phase: str, call: Callable[[], _T]) -> _T:
    """The meter that only makes the call."""
    return call()


@dataclass(frozen=True)
class LoopConfig:
    """The engine a scheduler is built for."""

    model: Path  # a model folder; only its config is read (the layer shapes of the KV cache)
    kv_tokens: int  # tokens the KV cache holds
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 1024
    async_scheduling: bool = False
    # sloserve's step profile (StepTimeModel.to_json()); None builds vLLM's own scheduler.
    profile: dict[str, Any] | None = None
    # vLLM's reasoning parser of the model (the engine's --reasoning-parser), or None.
    reasoning_parser: str | None = None


def build_scheduler(config: LoopConfig) -> tuple[Scheduler, Callable[[Request], list[BlockHash]]]:
    """vLLM's scheduler, or sloserve's when a profile is given, for the engine `config` names,
    with the prefix-cache block hasher the engine core gives each request."""
    sloserve: dict[str, Any] = {}
    if config.profile is not None:
        sloserve = {"policy": "slo", "profile": config.profile}
    vllm_config = EngineArgs(
        model=str(config.model),
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        enforce_eager=True,
        async_scheduling=config.async_scheduling,
        additional_config={CONFIG_KEY: sloserve},
        reasoning_parser=config.reasoning_parser or "",
    ).create_engine_config()
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    block_size = int(cache_config.block_size)
    num_blocks = max(1, config.kv_tokens // block_size) + 1  # vLLM keeps one block aside
    cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(
        block_size=block_size,
        num_kv_heads=model_config.get_total_num_kv_heads(),
        head_size=model_config.get_head_size(),
        dtype=torch.bfloat16,
    )
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)],
    )
    cls: type[Scheduler]
    if config.profile is not None:
        cls = SloAsyncScheduler if config.async_scheduling else SloScheduler
    else:
        cls = AsyncScheduler if config.async_scheduling else Scheduler
    scheduler = cls(
        vllm_config,
        kv_cache_config,
        StructuredOutputManager(vllm_config),
        block_size=block_size,
    )
    hash_fn = get_hash_fn_by_name(cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return scheduler, get_request_block_hasher(block_size, hash_fn)


class SchedulerLoop:
    """Runs a scheduler step by step, as the engine core would, with a stand-in model.

    `clock`: steps take virtual time (see VirtualClock); None, they are instant and the
    scheduler reads the wall clock. `meter` runs every call into the scheduler.
    `keep_outputs`: False drops the output batches (a long benchmark need not hold them).
    `sample`: the token the stand-in model samples for a request (default SAMPLED_TOKEN).
    """

    def __init__(
        self,
        config: LoopConfig,
        clock: VirtualClock | None = None,
        meter: Meter = unmetered,
        keep_outputs: bool = True,
        sample: Callable[[Request], int] = lambda _: SAMPLED_TOKEN,
    ) -> None:
        self.config = config
        self._sample = sample
        self.clock = clock
        self._meter = meter
        self._keep_outputs = keep_outputs
        if clock is not None:
            _install_scheduler_time()
        self.scheduler, self._block_hasher = build_scheduler(config)
        # Steps scheduled and not yet "executed": at most one with sync scheduling (it is
        # executed at once), two with async (one runs while the next is scheduled). Each
        # with the requests it samples for and when it ends (virtual time; 0 without a clock).
        self._depth = 2 if config.async_scheduling else 1
        self._in_flight: deque[tuple[SchedulerOutput, list[str], float]] = deque()
        self.outputs: list[EngineCoreOutputs] = []  # every output batch, in order
        self.finished = 0  # requests ended so far, by any finish reason

    def now(self) -> float:
        """The time the scheduler sees."""
        return self.clock.now if self.clock is not None else time.time()

    def _enter(self) -> None:
        # Several loops may share the process: the scheduler reads the caller's clock.
        _SCHEDULER_TIME.clock = self.clock

    def request(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        slo: RequestSlo | None = None,
        first_token: int = 10,
        prompt: Sequence[int] | None = None,
    ) -> Request:
        """An engine request, as the engine core makes one from the front end's.

        Prompts that start with the same `first_token` share a prefix (for prefix caching).
        `prompt`, when given, is the prompt's token ids instead (`prompt_tokens` of them).
        """
        params = SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            extra_args=slo.to_extra_args() if slo is not None else None,
        )
        if prompt is None:
            prompt = [first_token + i % 200 for i in range(prompt_tokens)]
        return Request(
            request_id, list(prompt), params, None, arrival_time=self.now(),
            block_hasher=self._block_hasher,
        )  # fmt: skip

    def add(self, requests: Iterable[Request]) -> None:
        self._enter()
        for request in requests:
            self._meter("add", partial(self.scheduler.add_request, request))

    def step(self) -> SchedulerOutput:
        """Schedules one step; returns it. The oldest step in flight completes first when
        the queue of steps is full, as the engine core blocks on it then."""
        self._enter()
        output = self._meter("schedule", self.scheduler.schedule)
        sampling = [
            request_id
            for request_id in output.num_scheduled_tokens
            if not self.scheduler.requests[request_id].is_prefill_chunk
        ]
        ends = self.clock.start_step(self.shape_of(output)) if self.clock is not None else 0.0
        self._in_flight.append((output, sampling, ends))
        while len(self._in_flight) >= self._depth:
            self._complete_oldest()
        return output

    def shape_of(self, output: SchedulerOutput) -> StepShape:
        """The shape of a step just scheduled, as a step profile counts it: schedule() has
        advanced each request's computed tokens past the step's, so they are the context
        its attention reads."""
        requests = self.scheduler.requests
        context = sum(requests[r].num_computed_tokens for r in output.num_scheduled_tokens)
        return StepShape(
            tokens=output.total_num_scheduled_tokens,
            requests=len(output.num_scheduled_tokens),
            context_tokens=context,
        )

    def drain(self) -> None:
        """Completes every step still in flight."""
        while self._in_flight:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        output, sampling, ends = self._in_flight.popleft()
        if self.clock is not None:
            self.clock.wait_until(ends)  # the engine core blocks on the step's result
        request_ids = list(output.num_scheduled_tokens)
        sampled = set(sampling)
        runner_output = ModelRunnerOutput(
            req_ids=request_ids,
            req_id_to_index={request_id: i for i, request_id in enumerate(request_ids)},
            sampled_token_ids=[
                [self._sample(self.scheduler.requests[request_id])] if request_id in sampled else []
                for request_id in request_ids
            ],
        )
        self._enter()
        results = self._meter(
            "update", partial(self.scheduler.update_from_output, output, runner_output)
        )
        for batch in results.values():
            self.finished += sum(out.finish_reason is not None for out in batch.outputs)
        if self._keep_outputs:
            self.outputs.extend(results.values())

    def finished_ids(self) -> set[str]:
        """Requests that have ended, by any finish reason, in the outputs so far."""
        return {
            output.request_id
            for batch in self.outputs
            for output in batch.outputs
            if output.finish_reason is not None
        }

"""Builds the vLLM engine with sloserve's scheduler inside, and listens to its load."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from sloserve.cpu_cores import BIND_VARIABLE
from sloserve.replica.scheduler import CONFIG_KEY, scheduler_class_for


@dataclass(frozen=True)
class EngineSettings:
    model: Path
    max_model_len: int | None = None  # None: the model's own
    kv_cache_bytes: int | None = None  # None: vLLM's default sizing (GPU); set on CPU
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    dtype: str = "auto"
    load_format: str = "auto"  # "dummy" on a GPU gives real shapes without weights
    step_socket: Path | None = None  # where the scheduler reports steps and verdicts
    # The step-time profile (StepTimeModel.to_json()) the SLO policy plans with; None runs
    # vLLM's own scheduling policy, as does policy "vllm" (the ablation).
    profile: dict[str, Any] | None = None
    policy: str = "slo"
    # CPU engines: the cores the worker computes on, as vLLM reads them ("0", "2,3"); None
    # leaves it to vLLM, which picks the same cores for every engine on the machine.
    cpu_cores: str | None = None
    fault_step_delay_s: float = 0.0  # tests only: slows every step down (scheduler.py)
    # vLLM's reasoning parser of the model ("deepseek_r1", ...): tells the scheduler when a
    # request's thinking stage ends. None: the stage never ends (thinking TPOT throughout).
    reasoning_parser: str | None = None


@dataclass
class EngineLoad:
    """The engine core's latest scheduler stats, as its stat logger last saw them."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


class LoadListener:
    """Keeps the latest scheduler stats; vLLM calls `record` after every engine step.

    The engine core sends its stats with every step it finishes, so the time of the latest
    one is also the engine's heartbeat (the wedge check in engine_health.py reads it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._load = EngineLoad()
        self._stepped_at = time.monotonic()

    def snapshot(self) -> EngineLoad:
        with self._lock:
            return EngineLoad(self._load.running, self._load.waiting, self._load.kv_cache_usage)

    def stepped_at(self) -> float:
        """time.monotonic() of the latest finished engine step (of start-up before any)."""
        with self._lock:
            return self._stepped_at

    def update(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        with self._lock:
            self._load = EngineLoad(running, waiting, kv_cache_usage)
            self._stepped_at = time.monotonic()

    def stat_logger_factory(self) -> Any:
        listener = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self,
                scheduler_stats: Any,
                iteration_stats: Any,
                mm_cache_stats: Any = None,
                engine_idx: int = 0,
            ) -> None:
                if scheduler_stats is not None:
                    listener.update(
                        scheduler_stats.num_running_reqs,
                        scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                        scheduler_stats.kv_cache_usage,
                    )

            def log_engine_initialized(self) -> None:
                pass

        return _Logger


def engine_args(settings: EngineSettings) -> AsyncEngineArgs:
    kwargs: dict[str, Any] = {
        "model": str(settings.model),
        "dtype": settings.dtype,
        "enforce_eager": settings.enforce_eager,
        "load_format": settings.load_format,
    }
    # additional_config is how settings reach the scheduler in the engine-core process.
    sloserve: dict[str, Any] = {"policy": settings.policy}
    if settings.step_socket is not None:
        sloserve["step_socket"] = str(settings.step_socket)
    if settings.profile is not None:
        sloserve["profile"] = settings.profile
    if settings.fault_step_delay_s:
        sloserve["fault_step_delay_s"] = settings.fault_step_delay_s
    kwargs["additional_config"] = {CONFIG_KEY: sloserve}
    optional = {
        "max_model_len": settings.max_model_len,
        "kv_cache_memory_bytes": settings.kv_cache_bytes,
        "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "reasoning_parser": settings.reasoning_parser,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    return AsyncEngineArgs(**kwargs)


def build_engine(settings: EngineSettings, listener: LoadListener) -> AsyncLLM:
    """Starts vLLM's engine-core process with the SLO scheduler loaded; blocks until ready.

    Safe to call from a worker thread: the output loop starts on the first request, in the
    caller's event loop.
    """
    if settings.cpu_cores is not None:
        # Read by the worker process vLLM spawns, which inherits this environment.
        os.environ[BIND_VARIABLE] = settings.cpu_cores
    config = engine_args(settings).create_engine_config()
    # Only known once vLLM has resolved the config (it turns async scheduling off where the
    # executor cannot do it, as on CPU).
    config.scheduler_config.scheduler_cls = scheduler_class_for(
        bool(config.scheduler_config.async_scheduling)
    )
    return AsyncLLM.from_vllm_config(
        config, stat_loggers=[listener.stat_logger_factory()], disable_log_stats=True
    )


# Token ids low enough for any vocabulary; what they say does not matter.
_WARM_UP_PROMPT = list(range(10, 26))
_WARM_UP_REQUEST_ID = "sloserve-warm-up"


async def warm_up(engine: AsyncLLM) -> None:
    """Runs one short request through the engine, to be done before the replica serves.

    A fresh engine's first request pays for what is set up on first use (the engine client's
    output loop, the first round trip to the engine core): about 7 ms more between arrival
    and the scheduler on a CPU engine, a good part of a tight TTFT budget. Sent with no SLO,
    it runs as best effort and counts in no SLO figure.
    """
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    async for _ in engine.generate(
        {"prompt_token_ids": _WARM_UP_PROMPT}, params, _WARM_UP_REQUEST_ID
    ):
        pass

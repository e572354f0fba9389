"""The replica process: gRPC up first, engine next, then serve until SIGTERM drains it.

Life cycle:
1. The gRPC server starts at once; health says NOT_SERVING and Generate answers UNAVAILABLE.
2. vLLM's engine starts in a worker thread (tens of seconds) and serves one warm-up request;
   then health says SERVING.
3. SIGTERM (or SIGINT): admit nothing new, let every request in flight finish, then exit 0.
   The Drain RPC does step 3's first part only; the process stays up until it is stopped.
4. An engine that dies or wedges (engine_health.py) never serves again: health says
   NOT_SERVING, load reports say not ready, every request ends UNAVAILABLE, and after a short
   grace (for gateways to see all that) the process exits with ENGINE_FAILED_EXIT_CODE, for
   its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sloserve.replica.control_service import ControlService
from sloserve.replica.engine import EngineSettings, LoadListener, build_engine, warm_up
from sloserve.replica.engine_health import watch_engine
from sloserve.replica.inference_service import InferenceService
from sloserve.replica.metrics import ReplicaMetrics
from sloserve.replica.mux_service import InferenceMuxService
from sloserve.replica.reports import ReportReceiver
from sloserve.replica.runtime import SERVICE_NAMES, ReplicaRuntime
from sloserve.replica.state import EngineFault, ReplicaState
from sloserve.replica.validation import ModelLimits
from sloserve.replica.verdicts import Verdicts
from sloserve.slo import SloCatalog
from sloserve.stepmodel import StepTimeModel, shipped_profile

DEFAULT_PROFILE = "cpu-bench"
# The exit status of a replica whose engine died or wedged (1: the engine never started).
ENGINE_FAILED_EXIT_CODE = 3

log = logging.getLogger("sloserve.replica")


@dataclass(frozen=True)
class ReplicaSettings:
    engine: EngineSettings
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int | None = 9400  # None: no metrics endpoint
    classes_file: Path | None = None  # None: the built-in default classes
    # Step-time profile to plan with; None: MODEL/step-profile.json, else the shipped one.
    profile_file: Path | None = None
    max_waiting: int = 256  # requests waiting for their first token before QUEUE_FULL
    default_max_tokens: int = 256
    drain_timeout_s: float = 300.0
    # An engine with unfinished requests that finishes no step for this long is wedged; None
    # turns the check off. Generous: one long prefill step on a CPU can take many seconds.
    wedge_timeout_s: float | None = 120.0
    # From an engine fault to the exit: requests end and gateways read a not-ready report
    # first, so they take the replica out before its connections drop.
    fault_exit_grace_s: float = 2.0


def _build_grpc_server(runtime: ReplicaRuntime) -> grpc.aio.Server:
    from sloserve.v1 import inference_mux_pb2_grpc, inference_pb2_grpc, replica_control_pb2_grpc

    server = grpc.aio.server()
    inference = InferenceService(runtime)
    inference_pb2_grpc.add_InferenceServicer_to_server(inference, server)
    inference_mux_pb2_grpc.add_InferenceMuxServicer_to_server(
        InferenceMuxService(inference), server
    )
    replica_control_pb2_grpc.add_ReplicaControlServicer_to_server(ControlService(runtime), server)
    runtime.health = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(runtime.health, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server


async def _start_engine(
    settings: ReplicaSettings, engine_settings: EngineSettings, runtime: ReplicaRuntime
) -> None:
    engine = await asyncio.to_thread(build_engine, engine_settings, runtime.listener)
    runtime.engine = engine
    runtime.tokenizer = engine.get_tokenizer()
    runtime.limits = ModelLimits(
        max_model_len=engine.model_config.max_model_len,
        vocab_size=engine.model_config.get_vocab_size(),
        default_max_tokens=settings.default_max_tokens,
        max_seeded_prompt_tokens=_seeded_prompt_limit(engine.vllm_config),
    )
    await warm_up(engine)
    # Everything allocated so far (torch, transformers, the engine client) lives for the
    # process's lifetime. Frozen, it is out of the collector's reach: a full collection over
    # it pauses every stream for hundreds of milliseconds (vLLM's own server does the same).
    gc.collect()
    gc.freeze()
    runtime.state.ready = True
    runtime.publish_health()
    log.info("engine ready: %s", settings.engine.model)


def _seeded_prompt_limit(config: Any) -> int | None:
    """On a CPU engine, a seeded prompt must fit one step (see SloRequest.split_prefill)."""
    if config.device_config.device_type != "cpu":
        return None
    return int(config.scheduler_config.max_num_batched_tokens)


def _step_model(settings: ReplicaSettings) -> StepTimeModel:
    """The profile given, else the one `sloserve profile` wrote beside the model, else the
    shipped CPU bench profile (planning with another engine's profile is only approximate)."""
    if settings.profile_file is not None:
        return StepTimeModel.load(settings.profile_file)
    beside = settings.engine.model / "step-profile.json"
    if beside.exists():
        return StepTimeModel.load(beside)
    log.warning(
        "no step-time profile for %s: planning with the shipped %s profile; run "
        "`sloserve profile` for this model",
        settings.engine.model,
        DEFAULT_PROFILE,
    )
    return shipped_profile(DEFAULT_PROFILE)


async def serve(settings: ReplicaSettings) -> int:
    """Runs the replica until SIGTERM/SIGINT; returns the process exit code."""
    catalog = (
        SloCatalog.load(settings.classes_file) if settings.classes_file else SloCatalog.default()
    )
    runtime = ReplicaRuntime(
        state=ReplicaState(catalog=catalog, max_waiting=settings.max_waiting),
        metrics=ReplicaMetrics(),
        listener=LoadListener(),
    )
    runtime.verdicts = Verdicts(runtime.metrics.observe_verdict)
    runtime.verdicts.bind(asyncio.get_running_loop())
    step_model = _step_model(settings)
    step_dir = Path(tempfile.mkdtemp(prefix="sloserve-replica-"))
    steps = ReportReceiver(
        step_dir / "steps.sock",
        lambda record: runtime.metrics.observe_step(record, step_model),
        runtime.verdicts.deliver_threadsafe,
    )
    engine_settings = dataclasses.replace(
        settings.engine, step_socket=steps.path, profile=step_model.to_json()
    )
    server = _build_grpc_server(runtime)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    runtime.publish_health()
    runtime.metrics.bind_load(
        lambda: runtime.listener.snapshot().running,
        lambda: runtime.listener.snapshot().waiting,
        lambda: runtime.listener.snapshot().kv_cache_usage,
    )
    if settings.metrics_port is not None:
        metrics_port = runtime.metrics.serve(settings.metrics_port, settings.host)
        log.info("metrics on http://%s:%d/metrics", settings.host, metrics_port)
    log.info("gRPC on %s:%d (engine starting)", settings.host, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    engine_start = asyncio.create_task(_start_engine(settings, engine_settings, runtime))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({engine_start, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if engine_start.done() and engine_start.exception() is not None:
        log.error("engine failed to start: %s", engine_start.exception())
        await server.stop(grace=None)
        steps.close()
        return 1
    watchdog: asyncio.Task[EngineFault] | None = None
    if engine_start.done():
        watchdog = asyncio.create_task(
            watch_engine(runtime, settings.wedge_timeout_s), name="engine watchdog"
        )
        await asyncio.wait({watchdog, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if watchdog.done():
            log.error("exiting in %g s: %s", settings.fault_exit_grace_s, watchdog.result())
            await asyncio.sleep(settings.fault_exit_grace_s)
            await server.stop(grace=1)
            runtime.engine.shutdown()
            steps.close()
            shutil.rmtree(step_dir, ignore_errors=True)
            log.error("stopped: %s", watchdog.result())
            return ENGINE_FAILED_EXIT_CODE
    await stopping

    in_flight = runtime.start_drain()
    log.info("draining: %d request(s) in flight", in_flight)
    try:
        await asyncio.wait_for(runtime.state.idle.wait(), settings.drain_timeout_s)
    except TimeoutError:
        log.warning("drain timed out with %d request(s) in flight", len(runtime.state.in_flight))
    await server.stop(grace=5)
    with contextlib.suppress(asyncio.CancelledError):
        await engine_start  # a SIGTERM during start-up still waits for the engine to come up
    if watchdog is not None:
        watchdog.cancel()  # a fault during the drain has ended its requests already
    if runtime.engine is not None:
        runtime.engine.shutdown()
    steps.close()
    shutil.rmtree(step_dir, ignore_errors=True)
    if runtime.state.fault is not None:
        log.error("stopped: %s", runtime.state.fault)
        return ENGINE_FAILED_EXIT_CODE
    log.info("stopped")
    return 0

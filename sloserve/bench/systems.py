"""Systems that `sloserve bench compare` starts itself, each on the same model and settings.

Stock vLLM is served by its own OpenAI-compatible server, in the variants the methodology
names (docs/slo.md §5): default settings, token budget 512 and 2048, priority scheduling.
sloserve is a replica started with `sloserve replica`.

The routing variants (`gateway-*`, §5's baselines for several replicas) are a `sloserve
gateway` with one routing policy each, in front of the same sloserve replicas: `bench
compare` starts the replicas once (`running_replicas`) and one gateway per variant
(`running_gateway`), so the variants differ in routing alone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from sloserve.cpu_cores import replica_core_args

GiB = 1 << 30
START_TIMEOUT_S = 300


@dataclass(frozen=True)
class SystemSpec:
    name: str
    kind: str  # "openai" (stock vLLM server), "sloserve" (one replica), or "gateway"
    extra_args: tuple[str, ...] = ()
    use_priority: bool = False  # send each request's class as a vLLM priority
    description: str = ""
    routing: str = ""  # for kind "gateway": the gateway's routing policy

    @property
    def routed(self) -> bool:
        """A gateway in front of the shared replicas (see running_gateway)."""
        return self.kind == "gateway"


SYSTEMS: dict[str, SystemSpec] = {
    s.name: s
    for s in (
        SystemSpec("vllm-default", "openai", description="stock vLLM, default settings"),
        SystemSpec(
            "vllm-budget-512",
            "openai",
            ("--max-num-batched-tokens", "512"),
            description="stock vLLM, token budget 512",
        ),
        SystemSpec(
            "vllm-budget-2048",
            "openai",
            ("--max-num-batched-tokens", "2048"),
            description="stock vLLM, token budget 2048",
        ),
        SystemSpec(
            "vllm-priority",
            "openai",
            ("--scheduling-policy", "priority"),
            use_priority=True,
            description="stock vLLM, priority policy (tighter TPOT first)",
        ),
        SystemSpec("sloserve", "sloserve", description="sloserve replica, SLO scheduler"),
        SystemSpec(
            "sloserve-vllm-policy",
            "sloserve",
            ("--policy", "vllm"),
            description="ablation: sloserve replica scheduling as vLLM does",
        ),
        SystemSpec(
            "gateway-slack",
            "gateway",
            routing="slack",
            description="sloserve gateway, SLO-aware routing (slack), over sloserve replicas",
        ),
        SystemSpec(
            "gateway-round-robin",
            "gateway",
            routing="round-robin",
            description="sloserve gateway, round-robin routing, over sloserve replicas",
        ),
        SystemSpec(
            "gateway-least-outstanding",
            "gateway",
            routing="least-outstanding",
            description="sloserve gateway, least-outstanding routing, over sloserve replicas",
        ),
    )
}
BASELINE = "vllm-default"
VLLM_VARIANTS = ("vllm-default", "vllm-budget-512", "vllm-budget-2048", "vllm-priority")
# The routing comparison: sloserve's routing first, then the load-blind baselines.
ROUTING_SYSTEM = "gateway-slack"
ROUTING_VARIANTS = (ROUTING_SYSTEM, "gateway-round-robin", "gateway-least-outstanding")


@dataclass(frozen=True)
class EngineShape:
    """What every system is started with, so they differ only in scheduling."""

    model: Path
    max_model_len: int
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    # The step profile sloserve replicas plan with: the one the bench scales SLOs by, so both
    # describe the same engine (None: the replica's own default, MODEL/step-profile.json if
    # there is one, else the shipped profile).
    profile: Path | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _replica_command(shape: EngineShape, port: int, extra_args: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable, "-m", "sloserve", "replica",
        "--model", str(shape.model), "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", "-1", "--kv-cache-gib", str(shape.kv_cache_gib),
        "--max-waiting", "100000",
        *(("--profile", str(shape.profile)) if shape.profile is not None else ()),
        *_engine_args(shape), *extra_args,
    ]  # fmt: skip


def _engine_args(shape: EngineShape) -> list[str]:
    args = ["--max-model-len", str(shape.max_model_len)]
    if shape.enforce_eager:
        args.append("--enforce-eager")
    return args


def _command(spec: SystemSpec, shape: EngineShape, port: int) -> list[str]:
    if spec.kind == "openai":
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(shape.model), "--host", "127.0.0.1", "--port", str(port),
            "--kv-cache-memory-bytes", str(int(shape.kv_cache_gib * GiB)),
            "--no-enable-log-requests",
            *_engine_args(shape), *spec.extra_args,
        ]  # fmt: skip
    if spec.kind == "sloserve":
        return _replica_command(shape, port, spec.extra_args)
    raise ValueError(f"{spec.name} runs in front of replicas: use running_gateway")


def _gateway_command(
    spec: SystemSpec, replicas: Sequence[str], port: int, http_port: int
) -> list[str]:
    # The HTTP port serves the SLO summary, which says when every replica is in rotation.
    return [
        sys.executable, "-m", "sloserve", "gateway",
        *(a for endpoint in replicas for a in ("--replica", endpoint)),
        "--host", "127.0.0.1", "--port", str(port),
        "--http-port", str(http_port), "--metrics-port", "-1",
        "--routing", spec.routing, *spec.extra_args,
    ]  # fmt: skip


def _openai_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
            return True
    except OSError:
        return False


def _sloserve_ready(port: int) -> bool:
    from sloserve.client import serving

    return serving(f"127.0.0.1:{port}")


@contextmanager
def _process(
    name: str, command: list[str], log_path: Path, ready: Callable[[], bool]
) -> Iterator[None]:
    """Runs `command` until the block ends (SIGTERM, then SIGKILL after 60 s); the block
    starts once `ready()` says it serves."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited while starting; see {log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready after {START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running(spec: SystemSpec, shape: EngineShape, log_path: Path) -> Iterator[str]:
    """Starts the system, waits until it serves, yields its target spec, then stops it."""
    port = _free_port()
    if spec.kind == "openai":
        with _process(
            spec.name, _command(spec, shape, port), log_path, lambda: _openai_ready(port)
        ):
            yield f"openai:http://127.0.0.1:{port}"
        return
    with _process(spec.name, _command(spec, shape, port), log_path, lambda: _sloserve_ready(port)):
        yield f"sloserve:127.0.0.1:{port}"


@contextmanager
def running_replicas(shape: EngineShape, count: int, log_dir: Path) -> Iterator[list[str]]:
    """Starts `count` sloserve replicas (started one after another, so their engines do not
    compete for the CPU while warming up), each computing on cores of its own; yields their
    endpoints, then stops them all."""
    with ExitStack() as stack:
        endpoints = []
        for i, binding in enumerate(replica_core_args(count)):
            port = _free_port()
            stack.enter_context(
                _process(
                    f"replica-{i}",
                    _replica_command(shape, port, tuple(binding)),
                    log_dir / f"replica-{i}.log",
                    partial(_sloserve_ready, port),
                )
            )
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints


@contextmanager
def running_gateway(spec: SystemSpec, replicas: Sequence[str], log_path: Path) -> Iterator[str]:
    """Starts a gateway of `spec`'s routing in front of `replicas`; yields its target spec
    once every replica is in its rotation, then stops it (it drains first)."""
    if not spec.routed:
        raise ValueError(f"{spec.name} is not a gateway")
    port, http_port = _free_port(), _free_port()
    command = _gateway_command(spec, replicas, port, http_port)
    # Health says SERVING as soon as one replica is in rotation; a comparison wants them all.
    with _process(spec.name, command, log_path, lambda: _in_rotation(http_port) == len(replicas)):
        yield f"sloserve:127.0.0.1:{port}"


def _in_rotation(http_port: int) -> int:
    """How many replicas the gateway has in rotation (its SLO summary), 0 while it starts."""
    url = f"http://127.0.0.1:{http_port}/v1/slo/summary"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            summary = json.load(response)
    except (OSError, ValueError):
        return 0
    return sum(1 for r in summary.get("replicas", []) if r.get("in_rotation"))

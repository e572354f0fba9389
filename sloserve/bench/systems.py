"""Systems that `sloserve bench compare` starts itself, each on the same model and settings.

Every system is reached the way its users reach it (methodology §5), with the same client code
(targets.OpenAITarget) and the same requests:

- `sloserve`: a `sloserve gateway` in front of one sloserve replica, over the gateway's OpenAI
  HTTP API, each request's SLO in the body's `slo` budgets. `sloserve-vllm-policy` is the same
  stack with the replica scheduling as vLLM does (`--policy vllm`): it isolates the scheduler.
- Stock vLLM, served by its own OpenAI-compatible server: default settings, and tuned variants
  of vLLM's own knobs (VLLM_VARIANTS, each tagged with the knob it turns): token budget
  (`--max-num-batched-tokens` 256, 512, 2048), the priority policy (`--scheduling-policy
  priority`, each request's priority from its binding budget: vllm_knobs.vllm_priority), the long
  prefill cap (`--long-prefill-token-threshold`, fixed and `--long-prefill-token-threshold-
  adaptive`), queue admission (`--max-num-queued-tokens`: its HTTP 503 counts as a rejection),
  and the running batch (`--max-num-seqs`). Report the best variant per scenario
  (best_tuned_vllm).
- `sloserve-replica-grpc`: an ablation, one sloserve replica reached directly over gRPC (no
  gateway, no HTTP).

The routing variants (`gateway-*`, §5's baselines for several replicas) are a `sloserve
gateway` with one routing policy each, in front of the same sloserve replicas, over HTTP too:
`bench compare` starts the replicas once (`running_replicas`) and one gateway per variant
(`running_gateway`), so the variants differ in routing alone.
"""

from __future__ import annotations

import enum
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from sloserve.bench.targets import TargetKind, target_spec
from sloserve.bench.vllm_knobs import VllmKnob
from sloserve.cpu_cores import replica_core_args

GiB = 1 << 30
START_TIMEOUT_S = 300


class SystemKind(enum.Enum):
    VLLM = "vllm"  # stock vLLM's OpenAI server
    REPLICA = "replica"  # one sloserve replica, reached directly over gRPC
    GATEWAY = "gateway"  # a sloserve gateway over sloserve replicas, reached over HTTP


@dataclass(frozen=True)
class SystemSpec:
    name: str
    kind: SystemKind
    # Flags of the server the system is made of: vLLM's server, or the sloserve replica(s).
    extra_args: tuple[str, ...] = ()
    use_priority: bool = False  # send each request a vLLM priority (vllm_knobs.vllm_priority)
    description: str = ""
    routing: str = "slack"  # GATEWAY: the gateway's routing policy
    # GATEWAY: in front of the replicas a comparison shares (the routing variants), rather
    # than in front of one replica of its own.
    shared_replicas: bool = False
    knob: VllmKnob | None = None  # VLLM: the setting the variant turns

    def __post_init__(self) -> None:
        if self.shared_replicas and (self.kind is not SystemKind.GATEWAY or self.extra_args):
            raise ValueError(f"{self.name}: only a gateway shares replicas, with their flags")
        if (self.knob is None) == (self.kind is SystemKind.VLLM):
            raise ValueError(f"{self.name}: a vLLM variant, and only one, names its knob")

    @property
    def routed(self) -> bool:
        """A gateway in front of the shared replicas (see running_gateway)."""
        return self.shared_replicas


def _vllm(name: str, knob: VllmKnob, args: tuple[str, ...], what: str) -> SystemSpec:
    return SystemSpec(
        name,
        SystemKind.VLLM,
        args,
        use_priority=knob is VllmKnob.PRIORITY,
        description=f"stock vLLM, {what}",
        knob=knob,
    )


# The knobs' values, for the bench's engine (the CPU bench model, prompts scaled by 1/8: chat
# prompts ~130 tokens at the median and ~520 at p99, summarization ~375 and ~875):
# - long prefill cap 128 (about a median chat prompt: a long prompt prefills in chunks of that
#   size beside the others) and 512 (only the longest prompts are held back);
# - queued prefill tokens 1024 and 4096: vLLM's rule is target TTFT x prefill throughput, and
#   the bench engine prefills ~6,000 tokens/s against TTFT budgets of ~0.1-1 s;
# - running batch 16 and 64 (the CPU engine's default is 128).
VLLM_SYSTEMS = (
    _vllm("vllm-default", VllmKnob.DEFAULT, (), "default settings"),
    *(
        _vllm(
            f"vllm-budget-{n}",
            VllmKnob.TOKEN_BUDGET,
            ("--max-num-batched-tokens", str(n)),
            f"token budget {n}",
        )
        for n in (256, 512, 2048)
    ),
    _vllm(
        "vllm-priority",
        VllmKnob.PRIORITY,
        ("--scheduling-policy", "priority"),
        "priority policy (the binding budget first: vllm_knobs.vllm_priority)",
    ),
    *(
        _vllm(
            f"vllm-long-prefill-{n}",
            VllmKnob.LONG_PREFILL,
            ("--long-prefill-token-threshold", str(n)),
            f"long prefill threshold {n}",
        )
        for n in (128, 512)
    ),
    _vllm(
        "vllm-long-prefill-128-adaptive",
        VllmKnob.LONG_PREFILL,
        ("--long-prefill-token-threshold", "128", "--long-prefill-token-threshold-adaptive"),
        "long prefill threshold 128, floored at a fair share of the token budget",
    ),
    *(
        _vllm(
            f"vllm-queued-tokens-{n}",
            VllmKnob.QUEUED_TOKENS,
            ("--max-num-queued-tokens", str(n)),
            f"at most {n} prompt tokens waiting for prefill (503 beyond: a rejection)",
        )
        for n in (1024, 4096)
    ),
    *(
        _vllm(
            f"vllm-max-seqs-{n}",
            VllmKnob.MAX_SEQS,
            ("--max-num-seqs", str(n)),
            f"at most {n} running requests",
        )
        for n in (16, 64)
    ),
)

SYSTEMS: dict[str, SystemSpec] = {
    s.name: s
    for s in (
        *VLLM_SYSTEMS,
        SystemSpec(
            "sloserve",
            SystemKind.GATEWAY,
            description="sloserve gateway (OpenAI HTTP API) over one replica, SLO scheduler",
        ),
        SystemSpec(
            "sloserve-vllm-policy",
            SystemKind.GATEWAY,
            ("--policy", "vllm"),
            description="ablation: sloserve gateway over one replica scheduling as vLLM does",
        ),
        SystemSpec(
            "sloserve-replica-grpc",
            SystemKind.REPLICA,
            description="ablation: one sloserve replica reached directly over gRPC",
        ),
        SystemSpec(
            "gateway-slack",
            SystemKind.GATEWAY,
            routing="slack",
            shared_replicas=True,
            description="sloserve gateway, SLO-aware routing (slack), over sloserve replicas",
        ),
        SystemSpec(
            "gateway-round-robin",
            SystemKind.GATEWAY,
            routing="round-robin",
            shared_replicas=True,
            description="sloserve gateway, round-robin routing, over sloserve replicas",
        ),
        SystemSpec(
            "gateway-least-outstanding",
            SystemKind.GATEWAY,
            routing="least-outstanding",
            shared_replicas=True,
            description="sloserve gateway, least-outstanding routing, over sloserve replicas",
        ),
    )
}
BASELINE = "vllm-default"
# Every stock-vLLM variant, the baseline first: `bench compare` runs them all by default.
VLLM_VARIANTS = tuple(s.name for s in VLLM_SYSTEMS)
VLLM_TUNED = tuple(name for name in VLLM_VARIANTS if name != BASELINE)
# The routing comparison: sloserve's routing first, then the load-blind baselines.
ROUTING_SYSTEM = "gateway-slack"
ROUTING_VARIANTS = (ROUTING_SYSTEM, "gateway-round-robin", "gateway-least-outstanding")


def best_tuned_vllm(capacity: Mapping[str, float]) -> str | None:
    """The tuned vLLM variant with the highest capacity among those in `capacity` (one
    scenario's results), None when it holds none: the baseline §5 says to report."""
    tuned = [name for name in VLLM_TUNED if name in capacity]
    return max(tuned, key=lambda name: capacity[name]) if tuned else None


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
    """The command of the system's engine server: vLLM's OpenAI server, or the sloserve
    replica (for a gateway system, the replica behind its gateway)."""
    if spec.kind is SystemKind.VLLM:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(shape.model), "--host", "127.0.0.1", "--port", str(port),
            "--kv-cache-memory-bytes", str(int(shape.kv_cache_gib * GiB)),
            "--no-enable-log-requests",
            *_engine_args(shape), *spec.extra_args,
        ]  # fmt: skip
    if spec.routed:
        raise ValueError(f"{spec.name} runs in front of shared replicas: use running_gateway")
    return _replica_command(shape, port, spec.extra_args)


def _gateway_command(
    spec: SystemSpec, replicas: Sequence[str], port: int, http_port: int
) -> list[str]:
    # Clients reach it over the HTTP port, which also serves the SLO summary that says when
    # every replica is in rotation.
    return [
        sys.executable, "-m", "sloserve", "gateway",
        *(a for endpoint in replicas for a in ("--replica", endpoint)),
        "--host", "127.0.0.1", "--port", str(port),
        "--http-port", str(http_port), "--metrics-port", "-1",
        "--routing", spec.routing,
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
    """Starts the system, waits until it serves, yields its target spec, then stops it.

    A gateway system (not one on shared replicas) starts its replica first, logging beside
    `log_path` (NAME-replica-0.log)."""
    port = _free_port()
    if spec.kind is SystemKind.VLLM:
        with _process(
            spec.name, _command(spec, shape, port), log_path, lambda: _openai_ready(port)
        ):
            yield target_spec(TargetKind.OPENAI, f"http://127.0.0.1:{port}")
        return
    if spec.kind is SystemKind.GATEWAY:
        replicas = running_replicas(
            shape, 1, log_path.parent, spec.extra_args, name=f"{spec.name}-replica"
        )
        with replicas as endpoints, running_gateway(spec, endpoints, log_path) as target:
            yield target
        return
    with _process(spec.name, _command(spec, shape, port), log_path, lambda: _sloserve_ready(port)):
        yield target_spec(TargetKind.SLOSERVE_GRPC, f"127.0.0.1:{port}")


@contextmanager
def running_replicas(
    shape: EngineShape,
    count: int,
    log_dir: Path,
    extra_args: tuple[str, ...] = (),
    name: str = "replica",
) -> Iterator[list[str]]:
    """Starts `count` sloserve replicas with `extra_args` (started one after another, so
    their engines do not compete for the CPU while warming up), each computing on cores of its
    own; yields their endpoints, then stops them all. Logs go to log_dir/NAME-i.log."""
    with ExitStack() as stack:
        endpoints = []
        for i, binding in enumerate(replica_core_args(count)):
            port = _free_port()
            stack.enter_context(
                _process(
                    f"{name}-{i}",
                    _replica_command(shape, port, (*binding, *extra_args)),
                    log_dir / f"{name}-{i}.log",
                    partial(_sloserve_ready, port),
                )
            )
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints


@contextmanager
def running_gateway(spec: SystemSpec, replicas: Sequence[str], log_path: Path) -> Iterator[str]:
    """Starts a gateway of `spec`'s routing in front of `replicas`; yields its target spec
    (its OpenAI HTTP API, with sloserve's SLO extensions) once every replica is in its
    rotation, then stops it (it drains first)."""
    if spec.kind is not SystemKind.GATEWAY:
        raise ValueError(f"{spec.name} is not a gateway")
    port, http_port = _free_port(), _free_port()
    command = _gateway_command(spec, replicas, port, http_port)
    # Health says SERVING as soon as one replica is in rotation; a comparison wants them all.
    with _process(spec.name, command, log_path, lambda: _in_rotation(http_port) == len(replicas)):
        yield target_spec(TargetKind.SLOSERVE_OPENAI, f"http://127.0.0.1:{http_port}")


def _in_rotation(http_port: int) -> int:
    """How many replicas the gateway has in rotation (its SLO summary), 0 while it starts."""
    url = f"http://127.0.0.1:{http_port}/v1/slo/summary"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            summary = json.load(response)
    except (OSError, ValueError):
        return 0
    return sum(1 for r in summary.get("replicas", []) if r.get("in_rotation"))

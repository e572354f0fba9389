"""`sloserve up`: N replicas and a gateway, until Ctrl-C.

Backends place the replicas: `local` (default) runs them as local processes, `ray` as Ray
actors (gateway/ray_backend.py), on a local Ray or the cluster at `--ray-address`. The gateway
is a local process either way, given the replicas' endpoints.

Each child runs in a session of its own, so Ctrl-C reaches only this process, which then
stops the gateway first (it drains what is in flight) and the replicas after it. Logs go to
one file per process, in a directory printed at start.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sloserve.client import serving
from sloserve.cpu_cores import replica_core_args

STOP_TIMEOUT_S = 60


@dataclass(frozen=True)
class StackSettings:
    model: Path
    replicas: int = 2
    host: str = "127.0.0.1"
    port: int = 50050  # gateway gRPC
    http_port: int = 8000
    metrics_port: int = 9500
    first_replica_port: int = 50051
    routing: str = "slack"
    classes_file: Path | None = None
    kv_cache_gib: float | None = None
    startup_timeout_s: float = 300.0
    log_dir: Path | None = None  # None: a new temporary directory
    backend: str = "local"  # local | ray
    ray_address: str | None = None  # None: start a local Ray (backend ray)


@dataclass
class _Child:
    name: str
    command: list[str]
    endpoint: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None)

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def exited(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _sloserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "sloserve", *args]


def _replica_args(settings: StackSettings) -> list[str]:
    """What every replica is given besides its address and ports."""
    classes = ["--classes", str(settings.classes_file.resolve())] if settings.classes_file else []
    kv = ["--kv-cache-gib", str(settings.kv_cache_gib)] if settings.kv_cache_gib else []
    return ["--model", str(settings.model.resolve()), "--enforce-eager", *classes, *kv]


class ReplicaSet(Protocol):
    """Where the replicas run."""

    def start(self) -> list[str]:
        """Starts them; returns their endpoints (serving once their engines are up)."""
        ...

    def problem(self) -> str | None:
        """Why a replica is gone, or None while all run."""
        ...

    def stop(self) -> None: ...


class LocalReplicas:
    def __init__(self, settings: StackSettings, log_dir: Path) -> None:
        self.children = []
        # On a CPU machine, vLLM would put every replica's worker on the same cores.
        for i, binding in enumerate(replica_core_args(settings.replicas)):
            port = settings.first_replica_port + i
            command = _sloserve(
                "replica", "--host", settings.host, "--port", str(port), "--metrics-port", "-1",
                *_replica_args(settings), *binding,
            )  # fmt: skip
            endpoint = f"{settings.host}:{port}"
            self.children.append(
                _Child(f"replica-{i}", command, endpoint, log_dir / f"replica-{i}.log")
            )

    def start(self) -> list[str]:
        for child in self.children:
            child.start()
        return [child.endpoint for child in self.children]

    def problem(self) -> str | None:
        for child in self.children:
            code = child.exited()
            if code is not None:
                return f"{child.name} exited with code {code}; see {child.log_path}"
        return None

    def stop(self) -> None:
        for child in self.children:
            child.stop()


def _replica_set(settings: StackSettings, log_dir: Path) -> ReplicaSet:
    if settings.backend == "ray":
        from sloserve.gateway.ray_backend import RayReplicas

        return RayReplicas(
            _replica_args(settings), settings.replicas, log_dir, address=settings.ray_address
        )
    return LocalReplicas(settings, log_dir)


def _gateway(settings: StackSettings, endpoints: Sequence[str], log_dir: Path) -> _Child:
    classes = ["--classes", str(settings.classes_file)] if settings.classes_file else []
    replica_args = [a for endpoint in endpoints for a in ("--replica", endpoint)]
    command = _sloserve(
        "gateway", *replica_args, "--host", settings.host, "--port", str(settings.port),
        "--http-port", str(settings.http_port), "--metrics-port", str(settings.metrics_port),
        "--routing", settings.routing, "--model-name", settings.model.name, *classes,
    )  # fmt: skip
    endpoint = f"{settings.host}:{settings.port}"
    return _Child("gateway", command, endpoint, log_dir / "gateway.log")


def _wait_ready(
    replicas: ReplicaSet, endpoints: Sequence[str], gateway: _Child, timeout_s: float
) -> str | None:
    """None once every replica and the gateway are SERVING, else why not."""
    deadline = time.monotonic() + timeout_s
    waiting = [*endpoints, gateway.endpoint]
    while waiting:
        problem = replicas.problem()
        if problem is not None:
            return problem
        code = gateway.exited()
        if code is not None:
            return f"the gateway exited with code {code}; see {gateway.log_path}"
        waiting = [endpoint for endpoint in waiting if not serving(endpoint)]
        if time.monotonic() > deadline and waiting:
            return f"not serving after {timeout_s:.0f} s: {waiting}"
        if waiting:
            time.sleep(0.5)
    return None


def run(settings: StackSettings) -> int:
    log_dir = settings.log_dir or Path(tempfile.mkdtemp(prefix="sloserve-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    where = "as Ray actors" if settings.backend == "ray" else "as local processes"
    print(
        f"starting {settings.replicas} replica(s) {where} and a gateway; logs in {log_dir}",
        flush=True,
    )
    # Set both explicitly: a shell that starts this in the background ignores SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    replicas = _replica_set(settings, log_dir)
    gateway: _Child | None = None
    try:
        endpoints = replicas.start()
        gateway = _gateway(settings, endpoints, log_dir)
        gateway.start()
        problem = _wait_ready(replicas, endpoints, gateway, settings.startup_timeout_s)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        _print_endpoints(settings, endpoints)
        while True:
            problem = replicas.problem()
            code = gateway.exited()
            if problem is None and code is not None:
                problem = f"the gateway exited with code {code}"
            if problem is not None:
                print(f"error: {problem}", file=sys.stderr)
                return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping (the gateway drains first) ...", flush=True)
    except RuntimeError as error:  # the backend could not place the replicas
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        # The gateway first: it stops taking requests and lets the replicas finish its own.
        if gateway is not None:
            gateway.stop()
        replicas.stop()
        print("stopped", flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C and SIGTERM stop the stack the same way."""
    raise KeyboardInterrupt


def _print_endpoints(settings: StackSettings, endpoints: Sequence[str]) -> None:
    host, http = settings.host, f"http://{settings.host}:{settings.http_port}"
    replicas = ", ".join(endpoints)
    if settings.backend == "ray":
        replicas += f"   (Ray actors, {settings.ray_address or 'local Ray'})"
    print(
        "sloserve is up:\n"
        f"  gRPC (Inference)  {host}:{settings.port}\n"
        f"  OpenAI HTTP       {http}/v1   (model: {settings.model.name})\n"
        f"  SLO summary       {http}/v1/slo/summary\n"
        f"  metrics           http://{host}:{settings.metrics_port}/metrics\n"
        f"  replicas          {replicas}\n"
        f"try: sloserve generate --endpoint {host}:{settings.port} --class chat "
        '"Hello there"\n'
        "Ctrl-C stops everything.",
        flush=True,
    )

"""`sloserve up`: N replicas and a gateway, until Ctrl-C.

Backends place the replicas: `local` (default) runs them as local processes, `ray` as Ray
actors (gateway/ray_backend.py), on a local Ray or the cluster at `--ray-address`. The gateway
is a local process either way, given the replicas' endpoints.

Each child runs in a session of its own, so Ctrl-C reaches only this process, which then
stops the gateway first (it drains what is in flight) and the replicas after it. Logs go to
one file per process, in a directory printed at start.

Replicas plan with a step-time profile of the model they serve, measured on this machine:
`--profile` when given, else MODEL/step-profile.json, else one measured first (`sloserve
profile --quick`, on the cores the first replica gets) and kept beside the model. The launcher
says which, and warns when the profile was measured on another machine or another model: an
SLO scheduler planning with the wrong step times admits what it cannot serve, or turns away
what it could. Replicas on a Ray cluster elsewhere choose their own (see the replica's log).
"""

from __future__ import annotations

import json
import os
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
from sloserve.machine import cpu_description

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
    # The step-time profile replicas plan with; None: the model's own, measured if missing.
    profile_file: Path | None = None

    @property
    def replicas_here(self) -> bool:
        """Whether the replicas run on this machine (where a profile measured here fits)."""
        return self.backend == "local" or self.ray_address is None


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


def _kv_args(settings: StackSettings) -> list[str]:
    return ["--kv-cache-gib", str(settings.kv_cache_gib)] if settings.kv_cache_gib else []


def _replica_args(settings: StackSettings, profile: Path | None) -> list[str]:
    """What every replica is given besides its address and ports."""
    classes = ["--classes", str(settings.classes_file.resolve())] if settings.classes_file else []
    planning = ["--profile", str(profile.resolve())] if profile else []
    model = ["--model", str(settings.model.resolve()), "--enforce-eager"]
    return [*model, *classes, *_kv_args(settings), *planning]


def planning_profile(settings: StackSettings, log_dir: Path) -> Path | None:
    """The profile every replica plans with (measured now when the model has none); None
    leaves the choice to each replica (on a Ray cluster elsewhere)."""
    if settings.profile_file is not None:
        return settings.profile_file
    beside = settings.model / "step-profile.json"
    if beside.exists() or not settings.replicas_here:
        return beside if beside.exists() else None
    out = beside if os.access(settings.model, os.W_OK) else log_dir / "step-profile.json"
    log_path = log_dir / "profile.log"
    print(
        f"no step-time profile for {settings.model}: measuring one on this machine "
        f"(sloserve profile --quick, a minute or two; log in {log_path})",
        flush=True,
    )
    command = _sloserve(
        "profile", "--model", str(settings.model.resolve()), "--quick", "--enforce-eager",
        *_kv_args(settings), *replica_core_args(settings.replicas)[0], "--out", str(out),
    )  # fmt: skip
    with log_path.open("wb") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"profiling {settings.model} failed (exit {code}); see {log_path}")
    return out


def describe_profile(profile: Path, model: Path) -> list[str]:
    """What a profile is and where it was measured, and a warning for each way it does not
    fit this model on this machine."""
    try:
        metadata = json.loads(profile.read_text())
    except (OSError, ValueError) as error:
        return [f"warning: cannot read the profile {profile}: {error}"]
    hardware = str(metadata.get("hardware", "unknown hardware"))
    measured_for = Path(str(metadata.get("model", "an unnamed model"))).name
    lines = [
        f"replicas plan with {profile}: {measured_for}, measured on {hardware} "
        f"at {metadata.get('measured_at', 'an unknown time')}"
    ]
    if measured_for != model.name:
        lines.append(f"warning: the profile is of {measured_for}, not {model.name}")
    here = cpu_description()
    if hardware.startswith("CPU") and hardware != here:
        lines.append(f"warning: the profile was measured on {hardware}; this machine is {here}")
    return lines


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
    def __init__(self, settings: StackSettings, log_dir: Path, profile: Path | None) -> None:
        self.children = []
        # On a CPU machine, vLLM would put every replica's worker on the same cores.
        for i, binding in enumerate(replica_core_args(settings.replicas)):
            port = settings.first_replica_port + i
            command = _sloserve(
                "replica", "--host", settings.host, "--port", str(port), "--metrics-port", "-1",
                *_replica_args(settings, profile), *binding,
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


def _replica_set(settings: StackSettings, log_dir: Path, profile: Path | None) -> ReplicaSet:
    if settings.backend == "ray":
        from sloserve.gateway.ray_backend import RayReplicas

        return RayReplicas(
            _replica_args(settings, profile),
            settings.replicas,
            log_dir,
            address=settings.ray_address,
        )
    return LocalReplicas(settings, log_dir, profile)


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
    try:
        profile = planning_profile(settings, log_dir)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopped", flush=True)
        return 0
    for line in describe_profile(profile, settings.model) if profile else []:
        print(line, flush=True)
    replicas = _replica_set(settings, log_dir, profile)
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

"""`sloserve up`: N replicas and a gateway as local processes, until Ctrl-C.

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

from sloserve.client import serving

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


def _children(settings: StackSettings, log_dir: Path) -> list[_Child]:
    classes = ["--classes", str(settings.classes_file)] if settings.classes_file else []
    kv = ["--kv-cache-gib", str(settings.kv_cache_gib)] if settings.kv_cache_gib else []
    replicas = []
    for i in range(settings.replicas):
        port = settings.first_replica_port + i
        command = _sloserve(
            "replica", "--model", str(settings.model), "--host", settings.host,
            "--port", str(port), "--metrics-port", "-1", "--enforce-eager", *classes, *kv,
        )  # fmt: skip
        endpoint = f"{settings.host}:{port}"
        replicas.append(_Child(f"replica-{i}", command, endpoint, log_dir / f"replica-{i}.log"))
    replica_args = [a for r in replicas for a in ("--replica", r.endpoint)]
    command = _sloserve(
        "gateway", *replica_args, "--host", settings.host, "--port", str(settings.port),
        "--http-port", str(settings.http_port), "--metrics-port", str(settings.metrics_port),
        "--routing", settings.routing, "--model-name", settings.model.name, *classes,
    )  # fmt: skip
    endpoint = f"{settings.host}:{settings.port}"
    return [*replicas, _Child("gateway", command, endpoint, log_dir / "gateway.log")]


def _wait_ready(children: Sequence[_Child], timeout_s: float) -> str | None:
    """None once every child is SERVING, else why not."""
    deadline = time.monotonic() + timeout_s
    waiting = list(children)
    while waiting:
        for child in list(waiting):
            code = child.exited()
            if code is not None:
                return f"{child.name} exited with code {code}; see {child.log_path}"
            if serving(child.endpoint):
                waiting.remove(child)
        if time.monotonic() > deadline:
            return f"not serving after {timeout_s:.0f} s: {[c.name for c in waiting]}"
        time.sleep(0.5)
    return None


def run(settings: StackSettings) -> int:
    log_dir = settings.log_dir or Path(tempfile.mkdtemp(prefix="sloserve-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    children = _children(settings, log_dir)
    print(f"starting {settings.replicas} replica(s) and a gateway; logs in {log_dir}", flush=True)
    # Set both explicitly: a shell that starts this in the background ignores SIGINT.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for child in children:
            child.start()
        problem = _wait_ready(children, settings.startup_timeout_s)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        _print_endpoints(settings, children)
        while True:
            for child in children:
                exit_code = child.exited()
                if exit_code is not None:
                    print(f"error: {child.name} exited with code {exit_code}", file=sys.stderr)
                    return 1
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping (the gateway drains first) ...", flush=True)
    finally:
        # The gateway first: it stops taking requests and lets the replicas finish its own.
        for child in reversed(children):
            child.stop()
        print("stopped", flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C and SIGTERM stop the stack the same way."""
    raise KeyboardInterrupt


def _print_endpoints(settings: StackSettings, children: Sequence[_Child]) -> None:
    host, http = settings.host, f"http://{settings.host}:{settings.http_port}"
    replicas = ", ".join(c.endpoint for c in children if c.name != "gateway")
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

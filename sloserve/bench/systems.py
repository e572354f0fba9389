"""Systems that `sloserve bench compare` starts itself, each on the same model and settings.

Stock vLLM is served by its own OpenAI-compatible server, in the variants the methodology
names (docs/slo.md §5): default settings, token budget 512 and 2048, priority scheduling.
sloserve is a replica started with `sloserve replica`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

GiB = 1 << 30
START_TIMEOUT_S = 300


@dataclass(frozen=True)
class SystemSpec:
    name: str
    kind: str  # "openai" (stock vLLM server) or "sloserve"
    extra_args: tuple[str, ...] = ()
    use_priority: bool = False  # send each request's class as a vLLM priority
    description: str = ""


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
    )
}
BASELINE = "vllm-default"
VLLM_VARIANTS = ("vllm-default", "vllm-budget-512", "vllm-budget-2048", "vllm-priority")


@dataclass(frozen=True)
class EngineShape:
    """What every system is started with, so they differ only in scheduling."""

    model: Path
    max_model_len: int
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(spec: SystemSpec, shape: EngineShape, port: int) -> list[str]:
    common = ["--max-model-len", str(shape.max_model_len)]
    if shape.enforce_eager:
        common.append("--enforce-eager")
    if spec.kind == "openai":
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(shape.model), "--host", "127.0.0.1", "--port", str(port),
            "--kv-cache-memory-bytes", str(int(shape.kv_cache_gib * GiB)),
            "--no-enable-log-requests",
            *common, *spec.extra_args,
        ]  # fmt: skip
    return [
        sys.executable, "-m", "sloserve", "replica",
        "--model", str(shape.model), "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", "-1", "--kv-cache-gib", str(shape.kv_cache_gib),
        "--max-waiting", "100000",
        *common, *spec.extra_args,
    ]  # fmt: skip


def _ready(spec: SystemSpec, port: int) -> bool:
    if spec.kind == "openai":
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return True
        except OSError:
            return False
    from sloserve.client import serving

    return serving(f"127.0.0.1:{port}")


@contextmanager
def running(spec: SystemSpec, shape: EngineShape, log_path: Path) -> Iterator[str]:
    """Starts the system, waits until it serves, yields its target spec, then stops it."""
    port = _free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            _command(spec, shape, port), stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(spec, port):
            if process.poll() is not None:
                raise RuntimeError(f"{spec.name} exited while starting; see {log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{spec.name} not ready after {START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield (
            f"openai:http://127.0.0.1:{port}"
            if spec.kind == "openai"
            else f"sloserve:127.0.0.1:{port}"
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

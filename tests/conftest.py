"""Shared fixtures: the tiny model, and real replica processes (vLLM on CPU, real gRPC).

A replica costs about 20 s to start, so the main one is started once per test session.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sloserve.client import serving

pytest_plugins = ["kube"]  # real Kubernetes API server fixtures: tests/kube.py

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / ".models" / "tiny"
CLASSES = Path(__file__).with_name("classes.yaml")
STARTUP_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Replica:
    """A `sloserve replica` subprocess on the tiny model."""

    workdir: Path
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def trace_path(self) -> Path:
        return self.workdir / "scheduler-trace.jsonl"

    @property
    def log_path(self) -> Path:
        return self.workdir / "replica.log"

    def start(self) -> None:
        env = dict(os.environ, SLOSERVE_SCHEDULER_TRACE=str(self.trace_path))
        command = [
            sys.executable, "-m", "sloserve", "replica",
            "--model", str(TINY_MODEL),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--metrics-port", str(self.metrics_port),
            "--classes", str(CLASSES),
            "--kv-cache-gib", "0.25",
            "--enforce-eager",
            *self.args,
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            # A process group of its own: kill() ends its engine-core process with it, as a
            # container's death would (SIGKILL to the replica alone orphans the engine core).
            # Not a session of its own: the kernel's autogroup scheduling would then give it
            # a CPU share apart from the tests', and change their timing.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0
            )

    def health(self) -> str:
        """SERVING, NOT_SERVING, or UNREACHABLE while the gRPC server is not up."""
        with grpc.insecure_channel(self.endpoint) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
            except grpc.RpcError:
                return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status.status))

    def wait_until(self, status: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while self.health() != status:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"replica exited:\n{self.log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica not {status} after {timeout_s} s")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return self.kill()
        finally:
            self._kill_group()  # whatever the replica left behind

    def kill(self) -> int:
        """SIGKILL to the replica and its engine core: no drain, connections just drop."""
        assert self.process is not None
        self._kill_group()
        return self.process.wait()

    def _kill_group(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    if not (TINY_MODEL / "config.json").exists():
        from sloserve.tiny_model import build_model

        build_model(TINY_MODEL)
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_profile(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A step-time profile of the tiny model, measured by `sloserve profile --quick`."""
    out = tmp_path_factory.mktemp("profile") / "tiny-profile.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "sloserve", "profile", "--model", str(tiny_model),
            "--quick", "--enforce-eager", "--kv-cache-gib", "0.25", "--out", str(out),
        ],
        capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "held-out R^2" in run.stdout
    return out


@pytest.fixture(scope="session")
def replica(
    tiny_model: Path, tiny_profile: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    """The shared replica, ready to serve, reporting its steps against the tiny profile."""
    server = Replica(
        workdir=tmp_path_factory.mktemp("replica"), args=["--profile", str(tiny_profile)]
    )
    server.start()
    try:
        server.wait_until("SERVING")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def other_replica(
    tiny_profile: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    """A second replica like the shared one, for routing across replicas (started once)."""
    server = start_replica(tmp_path_factory.mktemp("replica-b"), ["--profile", str(tiny_profile)])
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Gateway:
    """A `sloserve gateway` subprocess in front of the given replica endpoints."""

    workdir: Path
    replicas: list[str]
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API's base URL."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        return self.workdir / "gateway.log"

    def start(self) -> None:
        command = [
            sys.executable, "-m", "sloserve", "gateway",
            *(a for endpoint in self.replicas for a in ("--replica", endpoint)),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--http-port", str(self.http_port),
            "--metrics-port", str(self.metrics_port),
            "--classes", str(CLASSES),
            "--model-name", "tiny",
            *self.args,
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def wait_serving(self, timeout_s: float = 60) -> None:
        """Until health says SERVING and every replica given is in rotation. A gateway says
        SERVING with one replica in rotation; the others join at their first load report,
        and a test that routes before then (round robin above all) finds one replica only."""
        deadline = time.monotonic() + timeout_s
        while not self.serving():
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not SERVING after {timeout_s} s")
            time.sleep(0.2)
        for endpoint in self.replicas:
            wait_for_rotation(self, endpoint)

    def serving(self) -> bool:
        return serving(self.endpoint)

    def stop(self, timeout_s: float = 60) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_replica(workdir: Path, args: list[str]) -> Replica:
    """Starts a replica like the shared one and waits until it serves."""
    server = Replica(workdir=workdir, args=args)
    server.start()
    try:
        server.wait_until("SERVING")
    except BaseException:
        server.stop()
        raise
    return server


def wait_for_rotation(gateway: Gateway, endpoint: str, in_rotation: bool = True) -> None:
    """Until the gateway's /slo/summary shows `endpoint` in rotation (or out of it). A
    gateway says SERVING with one replica in rotation; the others join at their first load
    report, a moment later."""
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(f"{gateway.base_url}/slo/summary", timeout=5) as response:
            summary: dict[str, Any] = json.load(response)
        states = {r["endpoint"]: r["in_rotation"] for r in summary["replicas"]}
        if states[endpoint] == in_rotation:
            return
        assert time.monotonic() < deadline, f"{endpoint} in rotation is not {in_rotation}"
        time.sleep(0.1)


def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples that carry `labels`, read from `url`."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `host` (as an IP address SAN) and its key, as PEM files:
    (cert path, key path). Clients trust it by passing the cert as their root."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path

"""`sloserve gateway` and `sloserve up`: bad arguments refused with a clear message (no engine);
`up` on a model with no profile measures one, plans with it and serves."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port

from sloserve.client import Client
from sloserve.machine import cpu_description


def sloserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sloserve", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_malformed_replica_endpoint_is_named() -> None:
    run = sloserve("gateway", "--replica", "no-port-here", "--port", str(free_port()))
    assert run.returncode == 2
    assert "--replica: 'no-port-here' is not HOST:PORT" in run.stderr


def test_an_unknown_routing_policy_is_refused() -> None:
    run = sloserve("gateway", "--replica", "localhost:1", "--routing", "fastest")
    assert run.returncode == 2
    assert "--routing" in run.stderr and "least-outstanding" in run.stderr


def test_up_needs_a_model_that_exists() -> None:
    run = sloserve("up", "--model", "/nonexistent/model")
    assert run.returncode == 2
    assert "--model: no model at /nonexistent/model" in run.stderr


@pytest.mark.engine
def test_up_starts_the_stack_serves_and_stops_cleanly_on_ctrl_c(
    tiny_model: Path, tmp_path: Path
) -> None:
    # A model with no profile beside it: `up` measures one on this machine and plans with it.
    model = tmp_path / "tiny"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("step-profile.json"))
    ports = {name: free_port() for name in ("port", "http", "metrics", "replica")}
    command = [
        sys.executable, "-m", "sloserve", "up", "--replicas", "1", "--model", str(model),
        "--port", str(ports["port"]), "--http-port", str(ports["http"]),
        "--metrics-port", str(ports["metrics"]), "--first-replica-port", str(ports["replica"]),
        "--log-dir", str(tmp_path / "logs"),
    ]  # fmt: skip
    up = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        printed: list[str] = []
        deadline = time.monotonic() + 300
        while not any("Ctrl-C stops everything" in line for line in printed):
            assert time.monotonic() < deadline and up.poll() is None, "".join(printed)
            printed.append(up.stdout.readline())
        assert f"127.0.0.1:{ports['port']}" in "".join(printed)
        profile = model / "step-profile.json"
        said = f"replicas plan with {profile}: tiny, measured on {cpu_description()}"
        assert any(line.startswith(said) for line in printed), "".join(printed)
        assert not any(line.startswith("warning:") for line in printed), "".join(printed)
        assert json.loads(profile.read_text())["model"] == str(model.resolve())
        with Client(f"127.0.0.1:{ports['port']}", timeout_s=60) as client:
            result = client.generate("Hello", slo_class="chat", max_tokens=4, ignore_eos=True)
        assert result.completion_tokens == 4
        up.send_signal(signal.SIGINT)
        assert up.wait(120) == 0
        assert "stopped" in up.stdout.read()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    # Nothing is left listening.
    for port in (ports["port"], ports["http"], ports["replica"]):
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
            pass

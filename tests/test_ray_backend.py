"""`sloserve up --backend ray` (gateway/ray_backend.py): two real replicas on the tiny model
placed as Ray actors on a local Ray bound to loopback, a generation through the gateway over
gRPC and HTTP, and a clean shutdown: no replica, engine or Ray process left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLASSES, free_port
from openai import OpenAI

from sloserve.client import Client
from sloserve.cpu_cores import split_cores

pytest.importorskip("ray", reason="the Ray backend needs `pip install ray`")

STARTUP_TIMEOUT_S = 300


def _processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every live process whose command line contains `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _parent_command(pid: int) -> str:
    return Path(f"/proc/{_parent(pid)}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _parent(int(entry.name)) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class UpProcess:
    def __init__(self, log_dir: Path, ray_dir: Path) -> None:
        self.port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_dir, self.ray_dir = log_dir, ray_dir
        self.output = log_dir / "up.out"
        command = [
            sys.executable, "-m", "sloserve", "up", "--backend", "ray", "--replicas", "2",
            "--model", str(Path(__file__).resolve().parent.parent / ".models" / "tiny"),
            "--port", str(self.port), "--http-port", str(self.http_port),
            "--metrics-port", str(self.metrics_port), "--classes", str(CLASSES),
            "--kv-cache-gib", "0.25", "--log-dir", str(log_dir),
        ]  # fmt: skip
        # RAY_TMPDIR: this Ray's session folder, which every Ray process names on its command
        # line, so the test can tell its processes from anyone else's.
        env = dict(os.environ, RAY_TMPDIR=str(ray_dir))
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_up(self) -> list[str]:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "sloserve is up" not in self.text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sloserve up did not come up:\n{self.text()[-4000:]}")
            time.sleep(0.5)
        match = re.search(r"replicas\s+(.+?)\s+\(Ray actors", self.text())
        assert match, self.text()
        return match.group(1).split(", ")

    def interrupt(self, timeout_s: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture
def ray_dir() -> Iterator[Path]:
    # Short: Ray puts unix sockets under it (107-byte limit).
    folder = Path(tempfile.mkdtemp(prefix="sloray-"))
    try:
        yield folder
    finally:
        for pid in _processes_mentioning(str(folder)):  # only if the test failed midway
            os.kill(pid, signal.SIGKILL)


@pytest.mark.engine
def test_up_with_the_ray_backend_serves_through_the_gateway_and_stops_cleanly(
    tmp_path: Path, ray_dir: Path
) -> None:
    up = UpProcess(tmp_path, ray_dir)
    replica_processes: list[int] = []
    try:
        endpoints = up.wait_up()
        assert len(endpoints) == 2 and all(e.startswith("127.0.0.2:") for e in endpoints)
        # The local Ray advertises loopback only: its GCS, raylet and agents name 127.0.0.2.
        ray_processes = _processes_mentioning(str(ray_dir)).values()
        named = [re.search(r"--node[-_]ip[-_]address=(\S+)", c) for c in ray_processes]
        assert {m.group(1) for m in named if m} == {"127.0.0.2"}
        # Each replica process is a child of a Ray actor's worker, not of `sloserve up`, and
        # computes on cores of its own (this machine holds both).
        cores = []
        for endpoint in endpoints:
            port = endpoint.rpartition(":")[2]
            ((pid, command),) = _processes_mentioning(f"--port {port} --metrics-port -1").items()
            assert _parent_command(pid).startswith("ray::ReplicaHost")
            replica_processes += [pid, *_children(pid)]  # the engine core among them
            bound = re.search(r"--cpu-cores (\S+)", command)
            assert bound, command
            cores.append(bound.group(1))
        assert sorted(cores) == sorted(c for c in split_cores(2) if c is not None)
        assert _processes_mentioning(str(ray_dir)), "no Ray process uses the given RAY_TMPDIR"

        with Client(f"127.0.0.1:{up.port}") as client:
            result = client.generate("Hello", slo_class="chat", max_tokens=8)
        assert result.text and result.slo_outcome is not None
        openai = OpenAI(base_url=f"http://127.0.0.1:{up.http_port}/v1", api_key="unused")
        stream = openai.completions.create(model="tiny", prompt="Hi", max_tokens=4, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    finally:
        code = up.interrupt()
    assert code == 0, up.text()[-4000:]
    assert "stopped" in up.text()
    assert not _processes_mentioning(str(ray_dir)), "Ray processes outlived `sloserve up`"
    assert len(replica_processes) >= 4, "each replica has its engine core process"
    assert not [pid for pid in replica_processes if _alive(pid)], "replica processes outlived it"

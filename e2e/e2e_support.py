"""Helpers of the end-to-end suite (a module of its own: `conftest` is tests/'s name)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sloserve.devcluster.process_kubelet import ProcessKubelet
from sloserve.devcluster.sync_api import SyncKubeApi

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
HELM = BIN / "helm"

Json = dict[str, Any]
T = TypeVar("T")


@dataclass(frozen=True)
class E2ECluster:
    api: SyncKubeApi
    kubelet: ProcessKubelet
    kubeconfig: Path
    workdir: Path

    def pods(self, namespace: str, selector: str) -> list[Json]:
        return self.api.items(f"/api/v1/namespaces/{namespace}/pods", selector)

    def ready_pods(self, namespace: str, selector: str) -> list[Json]:
        return [p for p in self.pods(namespace, selector) if ready(p)]

    def logs(self, namespace: str, selector: str) -> str:
        """The end of each matching pod's process logs, for failure messages."""
        parts = []
        for pod in self.pods(namespace, selector):
            name = pod["metadata"]["name"]
            folder = self.kubelet.pod_folder(namespace, name)
            for log in sorted(folder.glob("*.log")) if folder else []:
                parts.append(f"--- {name}/{log.name}\n{log.read_text(errors='replace')[-2500:]}")
        return "\n".join(parts) or f"(no pod process logs for {selector})"


def ready(pod: Json) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def eventually(
    probe: Callable[[], T | None], timeout_s: float, what: str, explain: Callable[[], str] = str
) -> T:
    """Polls `probe` until it returns something other than None/False; fails naming `what`
    (and what `explain` says) on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what}\n{explain()}"
            )
        time.sleep(0.5)


def run(
    command: Sequence[str | Path],
    timeout_s: float = 300,
    allow_failure: bool = False,
    **kwargs: Any,
) -> str:
    """Runs kubectl or helm; fails with its output unless `allow_failure`."""
    done = subprocess.run(
        [str(c) for c in command],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ),
        **kwargs,
    )
    assert allow_failure or done.returncode == 0, (
        f"{command}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    return str(done.stdout)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"

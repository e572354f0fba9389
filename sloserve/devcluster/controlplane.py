"""etcd, kube-apiserver, kube-controller-manager and kube-scheduler as local processes.

What each flag is for (see also ../shared/reference/k8s-control-plane.md in the workspace):
- etcd on loopback ports with --unsafe-no-fsync: a test cluster needs no durability.
- The API server makes its own self-signed certificate in --cert-dir; the kubeconfig trusts
  that file. Clients authenticate with a static admin token (system:masters); everything
  else (service accounts) goes through RBAC, as in a real cluster.
- The ServiceAccount admission plugin is off: it rejects pods until the namespace's
  `default` account exists, which races with tests that create a namespace and a pod at once;
  and no pod here mounts a token anyway. Service-account tokens themselves (token controller,
  Secrets) work as usual.
- The controllers that need a cloud or a real node network are off (node IPAM and lifecycle,
  CSR signing, service load balancers, routes); the rest (deployments, replica sets, garbage
  collector, endpoints, namespaces, service accounts, ...) run.
- Every port is picked free, and the controller-manager and scheduler serve no health ports, so
  several clusters (two engineers' test runs) can share a machine.
"""

from __future__ import annotations

import json
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from sloserve.devcluster.binaries import ControlPlaneBinaries
from sloserve.devcluster.credentials import Credentials
from sloserve.devcluster.kubeconfig import write_kubeconfig
from sloserve.devcluster.processes import ManagedProcess, free_port

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Controllers that need a cloud provider or a node network this machine does not have.
CONTROLLERS = "*,-nodeipam,-nodelifecycle,-csrsigning,-service,-route,-cloud-node-lifecycle"
STOP_TIMEOUT_S = 5.0


class ControlPlaneError(RuntimeError):
    """A control-plane process did not start or exited; the message carries its log's end."""


@dataclass(frozen=True)
class ClusterAccess:
    """How to reach the API server as its admin."""

    server: str  # https://127.0.0.1:PORT
    token: str
    ca_file: Path  # the API server's self-signed certificate
    kubeconfig: Path


class ControlPlane:
    """Starts the four processes in `workdir` (a temporary folder if None) and stops them.

    Use as a context manager, or call start() and then stop() in a finally block. Start it
    from a thread that outlives it: its processes are killed when the starting thread ends.
    """

    def __init__(
        self, workdir: Path | None = None, binaries: ControlPlaneBinaries | None = None
    ) -> None:
        self._binaries = binaries or ControlPlaneBinaries.find()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="sloserve-devcluster-"))
        self._processes: list[ManagedProcess] = []  # in start order
        self._access: ClusterAccess | None = None

    @property
    def access(self) -> ClusterAccess:
        if self._access is None:
            raise ControlPlaneError("the control plane is not started")
        return self._access

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def start(self, timeout_s: float = 60.0) -> ClusterAccess:
        """Starts everything and returns once the API server is ready."""
        # Each start is a fresh cluster, also in a reused folder: the old data was made with
        # other credentials. The old logs are appended to.
        for stale in ("etcd", "apiserver-certs", "credentials"):
            shutil.rmtree(self.workdir / stale, ignore_errors=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            credentials = Credentials.create(self.workdir / "credentials")
            etcd_url = self._start_etcd(timeout_s)
            server, ca_file = self._start_apiserver(etcd_url, credentials)
            self._wait_ready(server, credentials.admin_token, ca_file, timeout_s)
            kubeconfig = write_kubeconfig(
                self.workdir / "kubeconfig", server, credentials.admin_token, ca_file
            )
            self._start_controllers(kubeconfig, credentials, ca_file)
        except BaseException:
            self.stop()
            raise
        self._access = ClusterAccess(server, credentials.admin_token, ca_file, kubeconfig)
        return self._access

    def stop(self) -> None:
        """Stops the processes in reverse start order: clients, then the API server, then etcd
        (an API server whose etcd is gone retries instead of exiting)."""
        for process in reversed(self._processes):
            process.stop(STOP_TIMEOUT_S)
        self._processes.clear()
        self._access = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ClusterAccess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def check_running(self) -> None:
        """Raises ControlPlaneError if any process has exited."""
        for process in self._processes:
            self._check_alive(process)

    def _launch(self, name: str, command: list[str]) -> ManagedProcess:
        process = ManagedProcess(name, command, self.log_dir / f"{name}.log")
        process.start()
        self._processes.append(process)
        return process

    @staticmethod
    def _check_alive(process: ManagedProcess) -> None:
        code = process.exit_code()
        if code is not None:
            raise ControlPlaneError(
                f"{process.name} exited with {code}; end of {process.log_path}:\n"
                f"{process.log_tail()}"
            )

    def _start_etcd(self, timeout_s: float) -> str:
        client_url = f"http://127.0.0.1:{free_port()}"
        peer_url = f"http://127.0.0.1:{free_port()}"
        etcd = self._launch(
            "etcd",
            [
                str(self._binaries.etcd),
                "--name=sloserve-dev",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=sloserve-dev={peer_url}",
                "--unsafe-no-fsync",
            ],
        )
        deadline = time.monotonic() + timeout_s
        while not _etcd_healthy(client_url):
            self._check_alive(etcd)
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"etcd not healthy after {timeout_s} s")
            time.sleep(0.1)
        return client_url

    def _start_apiserver(self, etcd_url: str, credentials: Credentials) -> tuple[str, Path]:
        port = free_port()
        cert_dir = self.workdir / "apiserver-certs"
        key = credentials.service_account_key
        self._launch(
            "kube-apiserver",
            [
                str(self._binaries.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                "--insecure-port=0",
                f"--cert-dir={cert_dir}",
                f"--token-auth-file={credentials.token_file}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={key}",
                f"--service-account-signing-key-file={key}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--disable-admission-plugins=ServiceAccount",
            ],
        )
        # The API server writes its self-signed certificate here before it serves.
        return f"https://127.0.0.1:{port}", cert_dir / "apiserver.crt"

    def _wait_ready(self, server: str, token: str, ca_file: Path, timeout_s: float) -> None:
        apiserver = self._processes[-1]
        deadline = time.monotonic() + timeout_s
        while not _apiserver_ready(server, token, ca_file):
            self._check_alive(apiserver)
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"kube-apiserver not ready after {timeout_s} s; end of its log:\n"
                    f"{apiserver.log_tail()}"
                )
            time.sleep(0.2)

    def _start_controllers(self, kubeconfig: Path, credentials: Credentials, ca_file: Path) -> None:
        # Port 0 turns off their health endpoints (insecure and secure): fixed default ports
        # would clash between clusters on one machine.
        no_serving = ["--port=0", "--secure-port=0"]
        self._launch(
            "kube-controller-manager",
            [
                str(self._binaries.kube_controller_manager),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                f"--controllers={CONTROLLERS}",
                f"--service-account-private-key-file={credentials.service_account_key}",
                f"--root-ca-file={ca_file}",  # becomes ca.crt in service-account Secrets
                *no_serving,
            ],
        )
        self._launch(
            "kube-scheduler",
            [
                str(self._binaries.kube_scheduler),
                f"--kubeconfig={kubeconfig}",
                "--leader-elect=false",
                *no_serving,
            ],
        )


def _etcd_healthy(client_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=2) as response:
            return bool(json.load(response).get("health") == "true")
    except (OSError, ValueError):
        return False


def _apiserver_ready(server: str, token: str, ca_file: Path) -> bool:
    if not ca_file.exists():
        return False
    request = urllib.request.Request(
        f"{server}/readyz", headers={"Authorization": f"Bearer {token}"}
    )
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (OSError, ssl.SSLError, urllib.error.URLError):
        return False

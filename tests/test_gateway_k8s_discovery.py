"""The gateway's Kubernetes discovery (gateway/k8s_discovery.py) against a real API server:
a Service's EndpointSlices, written by hand or by the real endpointslice controller, become
the replica set; a dropped connection is resumed; `sloserve gateway --k8s-service` routes to
what it finds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, free_port
from kube import KubeCluster, deployment
from kubernetes import client

from sloserve.errors import FieldError
from sloserve.gateway.k8s_discovery import KubernetesDiscovery, parse_service, ready_endpoints
from sloserve.kubeclient import MERGE_PATCH, ApiAccess, KubeApi

# The tests' API server is 1.20: EndpointSlices are discovery.k8s.io/v1beta1 there.
SLICES_API = "/apis/discovery.k8s.io/v1beta1"


def endpoint_slice(
    service: str, name: str, ready: Sequence[str], not_ready: Sequence[str] = ()
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1beta1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "sloserve-tests",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ready]
        + [{"addresses": [ip], "conditions": {"ready": False}} for ip in not_ready],
        "ports": [{"name": "grpc", "port": 50051, "protocol": "TCP"}],
    }


def headless_service(name: str, selector: dict[str, str] | None = None) -> client.V1Service:
    return client.V1Service(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1ServiceSpec(
            cluster_ip="None",
            selector=selector,
            ports=[client.V1ServicePort(name="grpc", port=50051, target_port="grpc")],
        ),
    )


class Watcher:
    """Runs a discovery's watch in the background and keeps the latest set it yielded."""

    def __init__(self, discovery: KubernetesDiscovery) -> None:
        self.sets: list[frozenset[str]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._follow(discovery.watch()))

    async def _follow(self, sets: AsyncIterator[frozenset[str]]) -> None:
        async for endpoints in sets:
            self.sets.append(endpoints)
            self._changed.set()

    async def until(self, expected: set[str], timeout_s: float = 20.0) -> None:
        async def arrived() -> None:
            while not self.sets or self.sets[-1] != expected:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(arrived(), timeout_s)
        except TimeoutError:
            raise AssertionError(f"expected {expected}, saw {self.sets}") from None

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def admin_api(cluster: KubeCluster) -> KubeApi:
    return KubeApi(ApiAccess(cluster.server, cluster.token, cluster.ca_file))


def in_cluster_access(
    cluster: KubeCluster, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> ApiAccess:
    """What a pod sees: the service host and port in its environment, and a token and CA in
    its service-account folder."""
    directory.mkdir()
    (directory / "token").write_text(cluster.token)
    shutil.copy(cluster.ca_file, directory / "ca.crt")
    host, port = cluster.server.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    access = ApiAccess.in_cluster(directory)
    assert access is not None
    return access


def test_ready_endpoints_take_the_named_or_numbered_port_and_skip_unready_ones() -> None:
    item = endpoint_slice("s", "s-1", ready=["10.0.0.1", "10.0.0.2"], not_ready=["10.0.0.3"])
    assert ready_endpoints(item, "grpc") == {"10.0.0.1:50051", "10.0.0.2:50051"}
    assert ready_endpoints(item, "7000") == {"10.0.0.1:7000", "10.0.0.2:7000"}
    assert ready_endpoints(item, "http") == frozenset()  # no such port name
    del item["endpoints"][0]["conditions"]  # unknown readiness counts as ready
    assert "10.0.0.1:50051" in ready_endpoints(item, "grpc")


def test_the_service_is_namespace_slash_name() -> None:
    assert parse_service("prod/llama") == ("prod", "llama")
    for bad in ("llama", "/llama", "prod/", "a/b/c"):
        with pytest.raises(FieldError, match="NAMESPACE/NAME"):
            parse_service(bad)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_discovery_follows_a_services_endpoint_slices_in_cluster(
    kube_cluster: KubeCluster,
    kube_api: client.ApiClient,
    kube_namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client.CoreV1Api(kube_api).create_namespaced_service(kube_namespace, headless_service("llm"))
    access = in_cluster_access(kube_cluster, tmp_path / "serviceaccount", monkeypatch)
    slices = f"{SLICES_API}/namespaces/{kube_namespace}/endpointslices"

    async def scenario() -> None:
        async with admin_api(kube_cluster) as api:
            watcher = Watcher(KubernetesDiscovery(f"{kube_namespace}/llm", "grpc", access))
            try:
                await watcher.until(set())  # nothing yet, said at once
                # Loopback addresses, as the process kubelet will give its pods, are allowed
                # in EndpointSlices.
                await api.request(
                    "POST", slices, endpoint_slice("llm", "llm-a", ["127.0.0.11"], ["127.0.0.12"])
                )
                await watcher.until({"127.0.0.11:50051"})
                await api.request("POST", slices, endpoint_slice("llm", "llm-b", ["10.1.0.5"]))
                await api.request("POST", slices, endpoint_slice("other", "other-a", ["10.9.9.9"]))
                await watcher.until({"127.0.0.11:50051", "10.1.0.5:50051"})
                patch = {
                    "endpoints": [{"addresses": ["127.0.0.12"], "conditions": {"ready": True}}]
                }
                await api.request("PATCH", f"{slices}/llm-a", patch, content_type=MERGE_PATCH)
                await watcher.until({"127.0.0.12:50051", "10.1.0.5:50051"})
                await api.request("DELETE", f"{slices}/llm-a")
                await watcher.until({"10.1.0.5:50051"})
                await api.request("DELETE", f"{slices}/llm-b")
                await watcher.until(set())
            finally:
                await watcher.stop()

    run(scenario)


def test_discovery_sees_a_deployments_pods_through_the_endpointslice_controller(
    kube_api: client.ApiClient, kube_namespace: str
) -> None:
    apps = client.AppsV1Api(kube_api)
    apps.create_namespaced_deployment(kube_namespace, deployment("replica", 2))
    client.CoreV1Api(kube_api).create_namespaced_service(
        kube_namespace, headless_service("replicas", {"app": "replica"})
    )

    def pod_endpoints() -> set[str]:
        pods = client.CoreV1Api(kube_api).list_namespaced_pod(kube_namespace).items
        return {f"{p.status.pod_ip}:50051" for p in pods if p.status and p.status.pod_ip}

    async def scenario() -> None:
        # $KUBECONFIG (set by the kube_cluster fixture) is how the gateway finds the API.
        watcher = Watcher(KubernetesDiscovery(f"{kube_namespace}/replicas"))
        try:
            deadline = time.monotonic() + 30
            while len(pod_endpoints()) < 2:
                assert time.monotonic() < deadline, "pods got no IPs"
                await asyncio.sleep(0.2)
            await watcher.until(pod_endpoints())
            apps.patch_namespaced_deployment_scale(
                "replica", kube_namespace, {"spec": {"replicas": 3}}
            )
            deadline = time.monotonic() + 30
            while len(pod_endpoints()) < 3:
                assert time.monotonic() < deadline, "the third pod got no IP"
                await asyncio.sleep(0.2)
            await watcher.until(pod_endpoints())
        finally:
            await watcher.stop()

    run(scenario)


class CuttableProxy:
    """A TCP proxy to the API server whose open connections can be cut at will, as a network
    blip or an API server restart would cut them."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("https://").rsplit(":", 1)
        self._target = (host, int(port))
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"https://127.0.0.1:{port}"

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        finally:
            sink.transport.abort()


def test_discovery_resumes_after_its_connection_is_cut(
    kube_cluster: KubeCluster, kube_api: client.ApiClient, kube_namespace: str
) -> None:
    slices = f"{SLICES_API}/namespaces/{kube_namespace}/endpointslices"

    async def scenario() -> None:
        proxy = CuttableProxy(kube_cluster.server)
        access = ApiAccess(
            server=await proxy.start(),
            token=lambda: kube_cluster.token,
            ca_file=str(kube_cluster.ca_file),
        )
        async with admin_api(kube_cluster) as api:
            watcher = Watcher(KubernetesDiscovery(f"{kube_namespace}/llm", "grpc", access))
            try:
                await api.request("POST", slices, endpoint_slice("llm", "llm-a", ["10.1.0.1"]))
                await watcher.until({"10.1.0.1:50051"})
                proxy.cut()
                # Changed while the watch is down: seen once it has listed again.
                patch = {"endpoints": [{"addresses": ["10.1.0.2"], "conditions": {"ready": True}}]}
                await api.request("PATCH", f"{slices}/llm-a", patch, content_type=MERGE_PATCH)
                await watcher.until({"10.1.0.2:50051"})
            finally:
                await watcher.stop()
                await proxy.close()

    run(scenario)


def gateway_replicas(http_port: int) -> set[str] | None:
    """The replica endpoints in the gateway's SLO summary; None while it does not answer."""
    url = f"http://127.0.0.1:{http_port}/v1/slo/summary"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            summary = json.load(response)
    except OSError:
        return None
    return {replica["endpoint"] for replica in summary["replicas"]}


def test_the_gateway_takes_its_replicas_from_a_kubernetes_service(
    kube_cluster: KubeCluster, kube_namespace: str, tmp_path: Path
) -> None:
    http_port = free_port()
    command = [
        sys.executable, "-m", "sloserve", "gateway",
        "--k8s-service", f"{kube_namespace}/llm", "--k8s-port", "grpc",
        "--host", "127.0.0.1", "--port", str(free_port()), "--http-port", str(http_port),
        "--metrics-port", "-1",
    ]  # fmt: skip
    slices = f"{SLICES_API}/namespaces/{kube_namespace}/endpointslices"
    log_path = tmp_path / "gateway.log"

    def replicas_become(expected: set[str]) -> None:
        deadline = time.monotonic() + 30
        while gateway_replicas(http_port) != expected:
            assert gateway.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)

    async def write(method: str, path: str, body: dict[str, Any] | None = None) -> None:
        async with admin_api(kube_cluster) as api:
            await api.request(method, path, body)

    # Its environment has $KUBECONFIG, pointing at the test cluster (kube_cluster fixture).
    with log_path.open("wb") as log:
        gateway = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        replicas_become(set())
        # Nothing listens on these ports: the replicas are known but out of rotation.
        asyncio.run(
            write("POST", slices, endpoint_slice("llm", "llm-a", ["127.0.0.21", "127.0.0.22"]))
        )
        replicas_become({"127.0.0.21:50051", "127.0.0.22:50051"})
        asyncio.run(write("DELETE", f"{slices}/llm-a"))
        replicas_become(set())
        gateway.send_signal(signal.SIGTERM)
        assert gateway.wait(30) == 0
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()


def sloserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sloserve", *args], cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def test_the_gateway_takes_replicas_or_a_service_not_both() -> None:
    both = sloserve("gateway", "--replica", "localhost:1", "--k8s-service", "ns/llm")
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr
    neither = sloserve("gateway")
    assert neither.returncode == 2 and "--k8s-service" in neither.stderr


def test_the_gateway_names_a_malformed_service() -> None:
    bad = sloserve("gateway", "--k8s-service", "llm", "--port", str(free_port()))
    assert bad.returncode == 2
    assert "--k8s-service: 'llm' is not NAMESPACE/NAME" in bad.stderr

"""Fixtures on a real Kubernetes API server (sloserve/devcluster): etcd, kube-apiserver
1.20.2, kube-controller-manager, kube-scheduler and a fake kubelet, as local processes.

- `kube_cluster`: one cluster per test session (about 5 s to start); $KUBECONFIG points at it
  meanwhile, for clients that read it (kopf, kubectl, helm, `kubernetes.config`).
- `kube_api`: a `kubernetes` client as the cluster's admin.
- `kube_namespace`: a fresh namespace per test, deleted afterwards.
And helpers: `eventually` (poll until true), `deployment` (a GPU Deployment to schedule).

Tests that use `kube_cluster` (directly or through the others) are marked `kube`. The
binaries come from `make control-plane`; without them the fixture fails saying so.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import kubernetes.config
import kubernetes.config.kube_config
import pytest
from kubernetes import client

from sloserve.devcluster.binaries import MissingBinariesError
from sloserve.devcluster.cluster import DevCluster
from sloserve.devcluster.kubelet import NodeSpec


@dataclass(frozen=True)
class KubeCluster:
    kubeconfig: Path
    server: str
    token: str  # the admin's (system:masters)
    ca_file: Path  # the API server's certificate
    node: NodeSpec  # the fake kubelet's node
    log_dir: Path  # one log per control-plane process

    def api_client(self, token: str | None = None) -> client.ApiClient:
        """A client as the admin, or as whoever `token` belongs to."""
        configuration = client.Configuration(
            host=self.server,
            api_key={"BearerToken": f"Bearer {token or self.token}"},
            ssl_ca_cert=str(self.ca_file),
        )
        return client.ApiClient(configuration)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "kube_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kube)


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    try:
        cluster = DevCluster(tmp_path_factory.mktemp("devcluster"))
    except MissingBinariesError as missing:
        pytest.fail(str(missing), pytrace=False)
    access = cluster.start()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("KUBECONFIG", str(access.kubeconfig))
            # The `kubernetes` client read $KUBECONFIG once, when first imported (before this
            # fixture ran); its default-file callers (kopf's login among them) look here.
            for module in (kubernetes.config, kubernetes.config.kube_config):
                patch.setattr(module, "KUBE_CONFIG_DEFAULT_LOCATION", str(access.kubeconfig))
            yield KubeCluster(
                kubeconfig=access.kubeconfig,
                server=access.server,
                token=access.token,
                ca_file=access.ca_file,
                node=cluster.node,
                log_dir=cluster.control_plane.log_dir,
            )
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kube_api(kube_cluster: KubeCluster) -> Iterator[client.ApiClient]:
    with kube_cluster.api_client() as api:
        yield api


@pytest.fixture
def kube_namespace(kube_api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{secrets.token_hex(3)}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        yield name
    finally:
        # Not waited for: the namespace controller and the kubelet finish it in the background.
        core.delete_namespace(name)


T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout_s: float = 30.0, what: str = "") -> T:
    """Polls `probe` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.2)


def deployment(name: str, replicas: int) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[
                        client.V1Container(
                            name="main",
                            image="sloserve:dev",
                            ports=[client.V1ContainerPort(name="grpc", container_port=50051)],
                            resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}),
                        )
                    ]
                ),
            ),
        ),
    )

"""The end-to-end suite's cluster: the dev cluster with the process kubelet, so the chart's
operator, and the gateways and replicas it makes, run as real local processes.

`e2e_cluster` (one per session): the cluster, $KUBECONFIG pointing at it for helm and kubectl,
and a check afterwards that no pod process outlived it. Tests here are marked `e2e`, `kube`
and `engine` (they start vLLM engines).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import E2ECluster

from sloserve.devcluster.binaries import MissingBinariesError
from sloserve.devcluster.process_kubelet import ProcessDevCluster, ProcessKubeletSettings
from sloserve.devcluster.sync_api import SyncKubeApi


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end to end on the dev cluster's process kubelet")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            for mark in ("e2e", "kube", "engine"):
                item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(scope="session")
def e2e_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ECluster]:
    workdir = tmp_path_factory.mktemp("e2e")
    settings = ProcessKubeletSettings(workdir=workdir / "pods", max_grace_s=20)
    try:
        cluster = ProcessDevCluster(workdir / "cluster", settings=settings)
    except MissingBinariesError as missing:
        pytest.fail(str(missing), pytrace=False)
    access = cluster.start()
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(access.kubeconfig)  # for helm and kubectl
    try:
        assert cluster.kubelet is not None
        yield E2ECluster(
            api=SyncKubeApi(access.server, access.token, access.ca_file),
            kubelet=cluster.kubelet,
            kubeconfig=access.kubeconfig,
            workdir=workdir,
        )
    finally:
        kubelet = cluster.kubelet
        cluster.stop()
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        assert kubelet is None or not kubelet.running_processes(), "pod processes outlived it"

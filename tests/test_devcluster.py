"""The dev cluster (sloserve/devcluster) behaves as a real one: the API server, the real
controllers and scheduler, the fake kubelet's node and pods, garbage collection, RBAC."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import kubernetes.config
import pytest
from conftest import REPO
from kube import KubeCluster, deployment, eventually
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from sloserve.devcluster.binaries import ControlPlaneBinaries, MissingBinariesError

KUBECTL = REPO / ".venv" / "bin" / "kubectl"


def test_missing_binaries_are_named_with_the_command_that_builds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLOSERVE_CACHE", str(tmp_path))
    with pytest.raises(MissingBinariesError, match="make control-plane") as missing:
        ControlPlaneBinaries.find()
    assert str(tmp_path / "kubernetes" / "v1.20.2" / "bin" / "kube-apiserver") in str(missing.value)


def test_the_api_server_serves_1_20_with_a_ready_schedulable_gpu_node(
    kube_api: client.ApiClient, kube_cluster: KubeCluster
) -> None:
    assert client.VersionApi(kube_api).get_code().git_version == "v1.20.2"
    node = client.CoreV1Api(kube_api).read_node(kube_cluster.node.name)
    assert node.status is not None and node.spec is not None
    conditions = {c.type: c.status for c in node.status.conditions or []}
    assert conditions["Ready"] == "True"
    assert (node.status.capacity or {})["nvidia.com/gpu"] == "8"
    assert not [t for t in node.spec.taints or [] if t.key == "node.kubernetes.io/not-ready"]


def test_clients_reading_the_default_kubeconfig_reach_the_test_cluster(
    kube_cluster: KubeCluster,
) -> None:
    # As kopf's login does: no file named, so $KUBECONFIG as the client saw it at import.
    configuration = client.Configuration()
    kubernetes.config.load_kube_config(client_configuration=configuration)
    assert configuration.host == kube_cluster.server
    with client.ApiClient(configuration) as api:
        assert client.VersionApi(api).get_code().git_version == "v1.20.2"


def test_a_deployment_becomes_available_with_running_ready_pods(
    kube_api: client.ApiClient, kube_namespace: str, kube_cluster: KubeCluster
) -> None:
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(kube_namespace, deployment("web", 3))

    def available() -> bool:
        status = apps.read_namespaced_deployment_status("web", kube_namespace).status
        return status is not None and status.available_replicas == 3

    eventually(available, what="3 available replicas")
    pods = core.list_namespaced_pod(kube_namespace, label_selector="app=web").items
    assert len(pods) == 3
    ips = set()
    for pod in pods:
        assert pod.spec is not None and pod.status is not None
        assert pod.spec.node_name == kube_cluster.node.name  # bound by the real scheduler
        assert pod.status.phase == "Running"
        assert {c.type: c.status for c in pod.status.conditions or []}["Ready"] == "True"
        assert pod.status.pod_ip
        ips.add(pod.status.pod_ip)
    assert len(ips) == 3


def test_deleting_a_deployment_removes_its_replica_sets_and_pods(
    kube_api: client.ApiClient, kube_namespace: str
) -> None:
    apps, core = client.AppsV1Api(kube_api), client.CoreV1Api(kube_api)
    apps.create_namespaced_deployment(kube_namespace, deployment("gone", 2))
    eventually(lambda: len(core.list_namespaced_pod(kube_namespace).items) == 2, what="2 pods")
    apps.delete_namespaced_deployment("gone", kube_namespace)
    # The garbage collector deletes the ReplicaSet and its pods; the kubelet then confirms
    # each pod's deletion, or the pods would stay Terminating.
    eventually(
        lambda: (
            not apps.list_namespaced_replica_set(kube_namespace).items
            and not core.list_namespaced_pod(kube_namespace).items
        ),
        what="the ReplicaSet and pods to go",
    )


def test_deleting_an_owner_garbage_collects_its_child(
    kube_api: client.ApiClient, kube_namespace: str
) -> None:
    core = client.CoreV1Api(kube_api)
    owner = core.create_namespaced_config_map(
        kube_namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    assert owner.metadata is not None and owner.metadata.uid
    reference = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    core.create_namespaced_config_map(
        kube_namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="child", owner_references=[reference])
        ),
    )
    core.delete_namespaced_config_map("owner", kube_namespace)

    def child_gone() -> bool:
        try:
            core.read_namespaced_config_map("child", kube_namespace)
        except ApiException as error:
            return bool(error.status == 404)
        return False

    eventually(child_gone, timeout_s=40, what="the child to be garbage collected")


def test_rbac_lets_a_service_account_do_its_job_and_nothing_else(
    kube_api: client.ApiClient, kube_namespace: str, kube_cluster: KubeCluster
) -> None:
    core, rbac = client.CoreV1Api(kube_api), client.RbacAuthorizationV1Api(kube_api)
    core.create_namespaced_service_account(
        kube_namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    rbac.create_namespaced_role(
        kube_namespace,
        client.V1Role(
            metadata=client.V1ObjectMeta(name="read-config-maps"),
            rules=[
                client.V1PolicyRule(
                    api_groups=[""], resources=["configmaps"], verbs=["get", "list"]
                )
            ],
        ),
    )
    rbac.create_namespaced_role_binding(
        kube_namespace,
        client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="reader"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io", kind="Role", name="read-config-maps"
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=kube_namespace)
            ],
        ),
    )

    # 1.20's token controller still writes each account's token into a Secret.
    def token() -> str | None:
        account = core.read_namespaced_service_account("reader", kube_namespace)
        if not account.secrets or not account.secrets[0].name:
            return None
        secret = core.read_namespaced_secret(account.secrets[0].name, kube_namespace)
        encoded = (secret.data or {}).get("token")
        return None if encoded is None else base64.b64decode(encoded).decode()

    with kube_cluster.api_client(eventually(token, what="the account's token")) as as_reader:
        reader = client.CoreV1Api(as_reader)
        assert reader.list_namespaced_config_map(kube_namespace).items is not None
        forbidden: list[Callable[[], object]] = [
            lambda: reader.create_namespaced_config_map(
                kube_namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="x"))
            ),
            lambda: reader.list_namespaced_secret(kube_namespace),
            lambda: reader.list_namespaced_config_map("default"),
        ]
        for attempt in forbidden:
            with pytest.raises(ApiException) as denied:
                attempt()
            assert denied.value.status == 403


@pytest.mark.kube  # starts a cluster of its own, not through the fixture
def test_devcluster_up_serves_kubectl_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    try:
        ControlPlaneBinaries.find()
    except MissingBinariesError as missing:
        pytest.fail(str(missing), pytrace=False)
    command = [sys.executable, "-m", "sloserve", "devcluster", "up", "--dir", str(tmp_path)]
    up = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        printed: list[str] = []
        deadline = time.monotonic() + 60
        while not any("Ctrl-C stops it" in line for line in printed):
            assert time.monotonic() < deadline and up.poll() is None, "".join(printed)
            printed.append(up.stdout.readline())
        kubeconfig = tmp_path / "kubeconfig"
        assert f"kubeconfig: {kubeconfig}" in "".join(printed)
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        nodes = subprocess.run(
            [str(KUBECTL), "get", "nodes"], env=env, capture_output=True, text=True, timeout=30
        )
        assert nodes.returncode == 0, nodes.stderr
        assert "sloserve-dev-node" in nodes.stdout and "Ready" in nodes.stdout
        # Its node runs pods as processes: a web server, reached at its pod IP.
        kubectl = [str(KUBECTL), "--request-timeout=30s"]
        subprocess.run([*kubectl, "apply", "-f", "-"], input=WEB_POD, env=env, check=True,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
        subprocess.run([*kubectl, "wait", "pod/web", "--for=condition=Ready", "--timeout=60s"],
                       env=env, check=True, capture_output=True, timeout=90)  # fmt: skip
        pod_ip = subprocess.run(
            [*kubectl, "get", "pod/web", "-o", "jsonpath={.status.podIP}"],
            env=env, check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        with urllib.request.urlopen(f"http://{pod_ip}:8080/", timeout=10) as page:
            assert page.status == 200
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        assert "stopped" in up.stdout.read()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    # Everything it started has gone: the control plane's processes named the folder in their
    # arguments, and the pod's process no longer answers at its pod IP.
    assert not processes_naming(tmp_path)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{pod_ip}:8080/", timeout=5)


WEB_POD = """
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  containers:
    - name: web
      image: python
      command: [python, -m, http.server, "8080", --bind, 0.0.0.0]
      readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
"""


def processes_naming(path: Path) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            arguments = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # ended meanwhile
            continue
        if str(path) in arguments:
            found.append(arguments)
    return found

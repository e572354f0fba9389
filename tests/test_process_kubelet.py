"""The process kubelet (sloserve/devcluster/process_kubelet.py): pods on the dev cluster run as
local processes, each on its own loopback address, with their env, volumes, probes, restarts,
ServiceAccount access, and SIGTERM on deletion; a plain Deployment of `sloserve replica` on
the tiny model becomes Ready and serves, and a gateway pod finds it through EndpointSlices."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CLASSES, TINY_MODEL
from kube import eventually

from sloserve.client import Client, serving
from sloserve.devcluster.binaries import MissingBinariesError
from sloserve.devcluster.pod_launch import (
    LaunchError,
    PodSources,
    build_launch,
    expand,
    resolve_command,
    rewrite,
)
from sloserve.devcluster.process_kubelet import (
    ProcessDevCluster,
    ProcessKubelet,
    ProcessKubeletSettings,
)
from sloserve.devcluster.sync_api import SyncKubeApi

Pod = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Launching, without a cluster.


def test_only_the_installed_package_runs_and_resolves_to_this_environment() -> None:
    assert resolve_command(["sloserve", "health"])[1:] == ["health"]
    assert Path(resolve_command(["sloserve"])[0]).parent == Path(sys.executable).parent
    assert resolve_command(["python3", "-m", "sloserve"]) == [sys.executable, "-m", "sloserve"]
    with pytest.raises(LaunchError, match=r"only `sloserve \.\.\.` and `python \.\.\.`") as refused:
        resolve_command(["/docker-entrypoint.sh", "nginx"])
    assert refused.value.reason == "CreateContainerError"
    with pytest.raises(LaunchError, match="entrypoint"):
        resolve_command([])


def test_mount_paths_and_own_hosts_are_rewritten_as_whole_words(tmp_path: Path) -> None:
    mounts = [("/etc/sloserve", tmp_path / "config")]
    ip = "127.99.0.7"
    assert rewrite("--classes=/etc/sloserve/classes.yaml", mounts, ip) == (
        f"--classes={tmp_path}/config/classes.yaml"
    )
    assert rewrite("/etc/sloserve", mounts, ip) == str(tmp_path / "config")
    assert rewrite("/etc/sloserve-api-keys", mounts, ip) == "/etc/sloserve-api-keys"
    assert rewrite("0.0.0.0", mounts, ip) == ip
    assert rewrite("localhost:50051", mounts, ip) == f"{ip}:50051"
    assert rewrite("10.0.0.0/24 127.0.0.10", mounts, ip) == "10.0.0.0/24 127.0.0.10"


def test_variables_expand_as_kubernetes_does() -> None:
    env = {"POD_IP": "127.1.2.3"}
    assert expand("--host=$(POD_IP)", env) == "--host=127.1.2.3"
    assert expand("$(MISSING) $$(POD_IP)", env) == "$(MISSING) $(POD_IP)"


def test_a_launch_carries_the_pods_env_fields_and_secret_values(tmp_path: Path) -> None:
    pod: Pod = {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "x"}},
        "spec": {"nodeName": "n"},
    }
    container: Pod = {
        "name": "main",
        "command": ["python", "-c", "pass"],
        "args": ["--bind", "$(POD_IP):80"],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "t"}}},
            {"name": "URL", "value": "http://$(POD_IP):80"},
        ],
    }
    sources = PodSources(secrets={"s": {"t": b"sekrit"}})
    launch = build_launch(pod, container, sources, "127.9.9.9", tmp_path, {})
    assert launch.argv[1:] == ["-c", "pass", "--bind", "127.9.9.9:80"]
    assert launch.env["APP"] == "x" and launch.env["TOKEN"] == "sekrit"
    assert launch.env["URL"] == "http://127.9.9.9:80" and launch.env["HOSTNAME"] == "p"
    assert "KUBECONFIG" not in launch.env


# ---------------------------------------------------------------------------------------------
# On a dev cluster whose node runs pods as processes.


def core(namespace: str, kind: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/{kind}" + (f"/{name}" if name else "")


def apps(namespace: str, kind: str, name: str = "") -> str:
    return f"/apis/apps/v1/namespaces/{namespace}/{kind}" + (f"/{name}" if name else "")


def rbac(namespace: str, kind: str) -> str:
    return f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/{kind}"


class ProcessCluster:
    def __init__(self, cluster: ProcessDevCluster, api: SyncKubeApi) -> None:
        self.cluster = cluster
        self.api = api

    @property
    def kubelet(self) -> ProcessKubelet:
        assert self.cluster.kubelet is not None
        return self.cluster.kubelet

    def pod(self, namespace: str, name: str) -> Pod:
        pod = self.api.get(core(namespace, "pods", name))
        assert pod is not None, f"no pod {namespace}/{name}"
        return pod

    def pods(self, namespace: str, selector: str) -> list[Pod]:
        return self.api.items(core(namespace, "pods"), selector)

    def ready_pods(self, namespace: str, selector: str, count: int) -> list[Pod] | None:
        pods = [p for p in self.pods(namespace, selector) if _ready(p)]
        return pods if len(pods) == count else None

    def log(self, namespace: str, name: str, container: str = "main") -> str:
        folder = self.kubelet.pod_folder(namespace, name)
        path = None if folder is None else folder / f"{container}.log"
        return path.read_text(errors="replace")[-4000:] if path and path.exists() else ""


def _ready(pod: Pod) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessCluster]:
    workdir = tmp_path_factory.mktemp("process-cluster")
    try:
        cluster = ProcessDevCluster(workdir, settings=ProcessKubeletSettings(workdir / "pods"))
    except MissingBinariesError as missing:
        pytest.fail(str(missing), pytrace=False)
    access = cluster.start()
    try:
        yield ProcessCluster(cluster, SyncKubeApi(access.server, access.token, access.ca_file))
    finally:
        kubelet = cluster.kubelet
        cluster.stop()
        assert kubelet is None or not kubelet.running_processes(), "pods outlived the cluster"


@pytest.fixture
def namespace(procs: ProcessCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"pk-{request.node.name[5:30].replace('_', '-').strip('-')}-{os.getpid() % 1000}"
    procs.api.create("/api/v1/namespaces", {"metadata": {"name": name}})
    try:
        yield name
    finally:
        procs.api.delete(f"/api/v1/namespaces/{name}")


def _deployment(name: str, replicas: int, pod_spec: Pod) -> Pod:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }


# A tiny HTTP file server, the way an image's program would be given its config: a fixed
# port, the wildcard address, a mounted folder.
FILE_SERVER: Pod = {
    "terminationGracePeriodSeconds": 5,
    "containers": [
        {
            "name": "main",
            "image": "python:3.11",
            "command": ["python", "-m", "http.server", "8080"],
            "args": ["--bind", "0.0.0.0", "--directory", "/srv/files"],
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {
                "httpGet": {"path": "/greeting", "port": "http"},
                "periodSeconds": 1,
            },
            "volumeMounts": [{"name": "files", "mountPath": "/srv/files"}],
        }
    ],
    "volumes": [{"name": "files", "configMap": {"name": "files"}}],
}


@pytest.mark.kube
def test_pods_with_one_fixed_port_serve_side_by_side_on_their_own_addresses(
    procs: ProcessCluster, namespace: str
) -> None:
    procs.api.create(
        core(namespace, "configmaps"),
        {"metadata": {"name": "files"}, "data": {"greeting": "hello from a volume"}},
    )
    procs.api.create(apps(namespace, "deployments"), _deployment("files", 2, FILE_SERVER))
    pods = eventually(lambda: procs.ready_pods(namespace, "app=files", 2), 60, "2 ready pods")
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    for ip in ips:
        with urllib.request.urlopen(f"http://{ip}:8080/greeting", timeout=5) as response:
            assert response.read() == b"hello from a volume"

    # The deployment controller counts the ready pods in its status a little after they are
    # ready (later still on a loaded machine).
    def available() -> bool:
        deployment = procs.api.get(apps(namespace, "deployments", "files"))
        return deployment is not None and deployment["status"].get("availableReplicas") == 2

    eventually(available, 60, "2 available replicas in the deployment's status")


@pytest.mark.kube
def test_deleting_a_pod_stops_its_process_and_frees_its_address(
    procs: ProcessCluster, namespace: str
) -> None:
    procs.api.create(
        core(namespace, "configmaps"), {"metadata": {"name": "files"}, "data": {"greeting": "hi"}}
    )
    procs.api.create(apps(namespace, "deployments"), _deployment("files", 1, FILE_SERVER))
    (pod,) = eventually(lambda: procs.ready_pods(namespace, "app=files", 1), 60, "a ready pod")
    name = pod["metadata"]["name"]
    pid = procs.kubelet.process_id(namespace, name)
    assert pid is not None
    procs.api.delete(apps(namespace, "deployments", "files"))

    def gone() -> bool:
        return procs.api.get(core(namespace, "pods", name)) is None

    eventually(gone, 60, "the pod object to go")
    assert not _pid_alive(pid), "the pod is gone but its process is not"
    assert pod["status"]["podIP"] not in procs.kubelet.addresses._by_pod.values()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead: only its parent has not read its exit status yet.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


ENV_DUMP = textwrap.dedent(
    """
    import json, os, sys, time
    names = ["POD_IP", "POD_NAME", "POD_NAMESPACE", "FROM_CONFIG", "FROM_SECRET"]
    with open(sys.argv[1], "w") as out:
        json.dump({name: os.environ.get(name) for name in names}, out)
    time.sleep(600)
    """
)


@pytest.mark.kube
def test_a_process_gets_downward_api_values_config_and_secret_refs_and_mounted_paths(
    procs: ProcessCluster, namespace: str
) -> None:
    procs.api.create(
        core(namespace, "configmaps"), {"metadata": {"name": "settings"}, "data": {"mode": "fast"}}
    )
    procs.api.create(
        core(namespace, "secrets"),
        {"metadata": {"name": "creds"}, "stringData": {"password": "pw"}},
    )
    field = {"POD_IP": "status.podIP", "POD_NAME": "metadata.name"}
    field["POD_NAMESPACE"] = "metadata.namespace"
    env: list[Pod] = [
        {"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in field.items()
    ]
    env += [
        {"name": "FROM_CONFIG", "valueFrom": {"configMapKeyRef": _ref("settings", "mode")}},
        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": _ref("creds", "password")}},
    ]
    pod = {
        "metadata": {"name": "env-dump"},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": "python:3.11",
                    "command": ["python", "-c", ENV_DUMP, "/data/env.json"],
                    "env": env,
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    # Ready once the file exists: an exec probe sees the same mount.
                    "readinessProbe": {
                        "exec": {"command": ["python", "-c", _EXISTS, "/data/env.json"]},
                        "periodSeconds": 1,
                        "timeoutSeconds": 20,
                    },
                }
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }
    procs.api.create(core(namespace, "pods"), pod)
    ready = eventually(lambda: _ready(procs.pod(namespace, "env-dump")), 60, "the pod Ready")
    assert ready
    running = procs.pod(namespace, "env-dump")
    folder = procs.kubelet.pod_folder(namespace, "env-dump")
    assert folder is not None
    dumped = json.loads((folder / "volumes" / "data" / "env.json").read_text())
    assert dumped == {
        "POD_IP": running["status"]["podIP"],
        "POD_NAME": "env-dump",
        "POD_NAMESPACE": namespace,
        "FROM_CONFIG": "fast",
        "FROM_SECRET": "pw",
    }


def _ref(name: str, key: str) -> dict[str, str]:
    return {"name": name, "key": key}


_EXISTS = "import os, sys; sys.exit(0 if os.path.exists(sys.argv[1]) else 1)"


@pytest.mark.kube
def test_a_killed_process_is_restarted_and_counted(procs: ProcessCluster, namespace: str) -> None:
    procs.api.create(
        core(namespace, "configmaps"), {"metadata": {"name": "files"}, "data": {"greeting": "hi"}}
    )
    procs.api.create(apps(namespace, "deployments"), _deployment("files", 1, FILE_SERVER))
    (pod,) = eventually(lambda: procs.ready_pods(namespace, "app=files", 1), 60, "a ready pod")
    name = pod["metadata"]["name"]
    first = procs.kubelet.process_id(namespace, name)
    assert first is not None
    os.kill(first, signal.SIGKILL)

    def restarted() -> Pod | None:
        current = procs.pod(namespace, name)
        statuses = current["status"].get("containerStatuses") or []
        return (
            current if statuses and statuses[0]["restartCount"] == 1 and _ready(current) else None
        )

    current = eventually(restarted, 60, "the container restarted and Ready")
    status = current["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] == 128 + signal.SIGKILL
    assert procs.kubelet.process_id(namespace, name) not in (None, first)
    assert current["status"]["podIP"] == pod["status"]["podIP"]  # the same pod keeps its address


@pytest.mark.kube
def test_restart_policy_never_leaves_a_failed_pod_with_its_exit_code(
    procs: ProcessCluster, namespace: str
) -> None:
    pod = {
        "metadata": {"name": "fails"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "x", "command": ["python", "-c", "raise SystemExit(3)"]}
            ],
        },
    }
    procs.api.create(core(namespace, "pods"), pod)
    failed = eventually(
        lambda: (p := procs.pod(namespace, "fails"))["status"].get("phase") == "Failed" and p,
        60,
        "Failed",
    )
    (status,) = failed["status"]["containerStatuses"]
    assert status["state"]["terminated"]["exitCode"] == 3 and status["restartCount"] == 0


@pytest.mark.kube
def test_an_image_only_container_is_reported_as_not_runnable_here(
    procs: ProcessCluster, namespace: str
) -> None:
    pod = {
        "metadata": {"name": "nginx"},
        "spec": {"containers": [{"name": "main", "image": "nginx"}]},
    }
    procs.api.create(core(namespace, "pods"), pod)

    def waiting() -> Pod | None:
        statuses = procs.pod(namespace, "nginx")["status"].get("containerStatuses") or []
        state: Pod | None = statuses[0]["state"].get("waiting") if statuses else None
        return state if state and state["reason"] == "CreateContainerError" else None

    state = eventually(waiting, 30, "CreateContainerError")
    assert "entrypoint" in state["message"]


API_CHECK = textwrap.dedent(
    """
    import json, sys, time
    import kubernetes
    from kubernetes.client.exceptions import ApiException
    kubernetes.config.load_kube_config()
    core = kubernetes.client.CoreV1Api()
    result = {"pods": len(core.list_namespaced_pod(sys.argv[2]).items)}
    try:
        core.list_namespaced_secret(sys.argv[2])
        result["secrets"] = 200
    except ApiException as error:
        result["secrets"] = error.status
    with open(sys.argv[1], "w") as out:
        json.dump(result, out)
    time.sleep(600)
    """
)


@pytest.mark.kube
def test_a_pod_reaches_the_api_as_its_service_account_under_rbac(
    procs: ProcessCluster, namespace: str
) -> None:
    procs.api.create(core(namespace, "serviceaccounts"), {"metadata": {"name": "reader"}})
    procs.api.create(
        rbac(namespace, "roles"),
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        },
    )
    procs.api.create(
        rbac(namespace, "rolebindings"),
        {
            "metadata": {"name": "pod-reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "pod-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    pod = {
        "metadata": {"name": "api-check"},
        "spec": {
            "serviceAccountName": "reader",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": "x",
                    "command": ["python", "-c", API_CHECK, "/out/result.json", namespace],
                    "volumeMounts": [{"name": "out", "mountPath": "/out"}],
                }
            ],
            "volumes": [{"name": "out", "emptyDir": {}}],
        },
    }
    procs.api.create(core(namespace, "pods"), pod)

    def result() -> Pod | None:
        folder = procs.kubelet.pod_folder(namespace, "api-check")
        path = None if folder is None else folder / "volumes" / "out" / "result.json"
        return (
            json.loads(path.read_text()) if path and path.exists() and path.stat().st_size else None
        )

    found = eventually(result, 90, f"the pod's API check; log: {procs.log(namespace, 'api-check')}")
    assert found == {"pods": 1, "secrets": 403}


# ---------------------------------------------------------------------------------------------
# sloserve itself: a replica Deployment as the operator would write it, and a gateway pod.


def _replica_pod_spec() -> Pod:
    probe = {"exec": {"command": ["sloserve", "health", "--endpoint", "127.0.0.1:50051"]}}
    return {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 10,
        "containers": [
            {
                "name": "replica",
                "image": "sloserve:dev",
                "command": ["sloserve"],
                "args": [
                    "replica",
                    "--model",
                    str(TINY_MODEL),
                    "--host",
                    "0.0.0.0",
                    "--port",
                    "50051",
                    "--metrics-port",
                    "9400",
                    "--classes",
                    "/etc/sloserve/classes.yaml",
                    "--kv-cache-gib",
                    "0.25",
                    "--enforce-eager",
                ],
                "ports": [
                    {"name": "grpc", "containerPort": 50051},
                    {"name": "metrics", "containerPort": 9400},
                ],
                "readinessProbe": {**probe, "periodSeconds": 2, "timeoutSeconds": 5},
                "livenessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 10},
                "volumeMounts": [{"name": "config", "mountPath": "/etc/sloserve"}],
            }
        ],
        "volumes": [{"name": "config", "configMap": {"name": "replica-config"}}],
    }


def _gateway_pod_spec(namespace: str) -> Pod:
    return {
        "serviceAccountName": "gateway",
        "terminationGracePeriodSeconds": 5,
        "containers": [
            {
                "name": "gateway",
                "image": "sloserve:dev",
                "command": ["sloserve"],
                "args": [
                    "gateway",
                    "--k8s-service",
                    f"{namespace}/replicas",
                    "--k8s-port",
                    "grpc",
                    "--host",
                    "0.0.0.0",
                    "--port",
                    "50050",
                    "--http-port",
                    "8000",
                    "--metrics-port",
                    "9500",
                    "--classes",
                    "/etc/sloserve/classes.yaml",
                    "--model-name",
                    "tiny",
                ],
                "ports": [
                    {"name": "grpc", "containerPort": 50050},
                    {"name": "http", "containerPort": 8000},
                ],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": "http"},
                    "periodSeconds": 1,
                },
                "volumeMounts": [{"name": "config", "mountPath": "/etc/sloserve"}],
            }
        ],
        "volumes": [{"name": "config", "configMap": {"name": "replica-config"}}],
    }


@pytest.mark.kube
@pytest.mark.engine
def test_a_replica_deployment_serves_and_a_gateway_pod_finds_it_through_endpoint_slices(
    procs: ProcessCluster, namespace: str
) -> None:
    procs.api.create(
        core(namespace, "configmaps"),
        {"metadata": {"name": "replica-config"}, "data": {"classes.yaml": CLASSES.read_text()}},
    )
    procs.api.create(
        core(namespace, "services"),
        {
            "metadata": {"name": "replicas"},
            "spec": {
                "clusterIP": "None",
                "selector": {"app": "replica"},
                "ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc"}],
            },
        },
    )
    _gateway_rbac(procs, namespace)
    procs.api.create(apps(namespace, "deployments"), _deployment("replica", 1, _replica_pod_spec()))
    procs.api.create(
        apps(namespace, "deployments"), _deployment("gateway", 1, _gateway_pod_spec(namespace))
    )
    try:
        (replica,) = eventually(
            lambda: procs.ready_pods(namespace, "app=replica", 1), 240, "the replica Ready"
        )
    except AssertionError:
        pods = procs.pods(namespace, "app=replica")
        raise AssertionError(procs.log(namespace, pods[0]["metadata"]["name"], "replica")) from None
    endpoint = f"{replica['status']['podIP']}:50051"
    assert serving(endpoint)
    with Client(endpoint) as direct:
        assert direct.generate("Hello", slo_class="chat", max_tokens=4).text

    (gateway,) = eventually(
        lambda: procs.ready_pods(namespace, "app=gateway", 1), 90, "the gateway Ready"
    )
    with Client(f"{gateway['status']['podIP']}:50050") as through_gateway:
        result = through_gateway.generate("Hello", slo_class="chat", max_tokens=4)
    assert result.text and result.slo_outcome is not None
    procs.api.delete(apps(namespace, "deployments", "replica"))
    procs.api.delete(apps(namespace, "deployments", "gateway"))
    eventually(lambda: not procs.pods(namespace, "app in (replica,gateway)"), 60, "pods gone")
    time.sleep(0.5)
    assert not [key for key in procs.kubelet.running_processes() if key.startswith(f"{namespace}/")]


def _gateway_rbac(procs: ProcessCluster, namespace: str) -> None:
    procs.api.create(core(namespace, "serviceaccounts"), {"metadata": {"name": "gateway"}})
    procs.api.create(
        rbac(namespace, "roles"),
        {
            "metadata": {"name": "slices"},
            "rules": [
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
    )
    procs.api.create(
        rbac(namespace, "rolebindings"),
        {
            "metadata": {"name": "slices"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "slices"},
            "subjects": [{"kind": "ServiceAccount", "name": "gateway", "namespace": namespace}],
        },
    )

"""The operator against a real kube-apiserver 1.20.2 (tests/kube.py's session cluster), with
kopf's runner.

Covers: children built and owned, status and printer columns, drift repair, `kubectl scale`
(kept while the operator runs) and an HPA reading the scale subresource, semantic errors that
build nothing, schema errors answered 422, garbage collection on delete, and the chart's
RBAC: the operator works with its ServiceAccount's token and nothing more.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO
from kopf.testing import KopfRunner
from kube import KubeCluster, eventually
from sloservice_manifests import (
    CHILDREN,
    CRD_PATH,
    NAME,
    SpecChange,
    condition,
    sloservice,
    slower_chat,
)

from sloserve.devcluster.sync_api import SyncKubeApi
from sloserve.operator.runtime import OperatorConfig, configure

KUBECTL = REPO / ".venv" / "bin" / "kubectl"
HELM = REPO / ".venv" / "bin" / "helm"
OPERATOR = ["run", "--standalone", "-m", "sloserve.operator.handlers"]
SLOS = "/apis/sloserve.io/v1alpha1/namespaces/{ns}/sloservices"
# The child kinds' collections, and how `kubectl get -o name` names their objects.
CHILD_KINDS = {
    "/api/v1/namespaces/{ns}/serviceaccounts": "serviceaccount",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles": "role",
    "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings": "rolebinding",
    "/api/v1/namespaces/{ns}/configmaps": "configmap",
    "/api/v1/namespaces/{ns}/services": "service",
    "/apis/apps/v1/namespaces/{ns}/deployments": "deployment",
    "/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets": "poddisruptionbudget",
}


def kubectl(
    *args: str, check: bool = True, text: str | None = None, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl on the session cluster ($KUBECONFIG), or with another kubeconfig."""
    env = dict(os.environ, KUBECONFIG=str(config)) if config else None
    done = subprocess.run([str(KUBECTL), *args], input=text, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if check and done.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {done.stderr}")
    return done


@pytest.fixture(scope="session")
def sloservice_crd(kube_cluster: KubeCluster) -> None:
    # CRDs first: a just-created CRD's objects may wait for GC's next resync otherwise.
    kubectl("apply", "-f", str(CRD_PATH))
    kubectl("wait", "--for=condition=Established", "crd/sloservices.sloserve.io")


@pytest.fixture(scope="session")
def api(kube_cluster: KubeCluster) -> SyncKubeApi:
    return SyncKubeApi(kube_cluster.server, kube_cluster.token, kube_cluster.ca_file)


@pytest.fixture
def namespace(kube_namespace: str, sloservice_crd: None) -> Iterator[str]:
    configure(OperatorConfig(resync_s=2, namespaces=(kube_namespace,), retry_delay_s=1))
    yield kube_namespace
    configure(OperatorConfig())


def operator(namespace: str) -> KopfRunner:
    return KopfRunner([*OPERATOR, "-n", namespace], timeout=60)


def apply(namespace: str, change: SpecChange | None = None, config: Path | None = None) -> None:
    manifest = yaml.safe_dump(sloservice(change))
    kubectl("apply", "-n", namespace, "-f", "-", text=manifest, config=config)


def slo(api: SyncKubeApi, namespace: str) -> dict[str, Any] | None:
    return api.get(f"{SLOS.format(ns=namespace)}/{NAME}")


def children(api: SyncKubeApi, namespace: str) -> set[str]:
    return {
        f"{kind}/{item['metadata']['name']}"
        for path, kind in CHILD_KINDS.items()
        for item in api.items(path.format(ns=namespace), f"sloserve.io/sloservice={NAME}")
    }


def replicas_of(api: SyncKubeApi, namespace: str, deployment: str) -> int | None:
    body = api.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}")
    return None if body is None else int(body["spec"]["replicas"])


def with_condition(
    api: SyncKubeApi, namespace: str, kind: str, status: str
) -> Callable[[], dict[str, Any] | None]:
    def probe() -> dict[str, Any] | None:
        body = slo(api, namespace)
        return body if condition(body, kind).get("status") == status else None

    return probe


def phase_ready(api: SyncKubeApi, namespace: str) -> dict[str, Any] | None:
    body = slo(api, namespace)
    return body if (body or {}).get("status", {}).get("phase") == "Ready" else None


def hpa(target: str) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": target},
        "spec": {
            "scaleTargetRef": {"apiVersion": "sloserve.io/v1alpha1", "kind": "SLOService",
                               "name": target},
            "minReplicas": 1,
            "maxReplicas": 6,  # around the replicas `kubectl scale` sets: nothing to change
            "targetCPUUtilizationPercentage": 80,
        },
    }  # fmt: skip


def test_lifecycle_status_drift_scale_and_gc(api: SyncKubeApi, namespace: str) -> None:
    with operator(namespace) as runner:
        apply(namespace)
        eventually(lambda: children(api, namespace) == CHILDREN, 60, "children")
        # Ready (some of each ready) comes before the rollout is complete: wait for the phase.
        body = eventually(lambda: phase_ready(api, namespace), 60, "phase Ready")
        status = body["status"]
        assert condition(body, "Ready")["status"] == "True"
        assert status["phase"] == "Ready" and status["readyReplicas"] == 2
        assert (
            status["selector"] == "app.kubernetes.io/component=replica,sloserve.io/sloservice=demo"
        )
        assert condition(body, "SLOMet")["reason"] == "GatewayUnreachable"
        assert all(c["observedGeneration"] == body["metadata"]["generation"]
                   for c in status["conditions"])  # fmt: skip
        assert body["spec"]["replicas"]["desired"] == 2  # initial, written through /scale
        assert "finalizers" not in body["metadata"]

        table = kubectl("get", "slos", "-n", namespace).stdout.splitlines()
        assert table[0].split() == [
            "NAME", "MODEL", "CLASSES", "REPLICAS", "READY", "ATTAINMENT", "PHASE", "AGE"
        ]  # fmt: skip
        assert table[1].split()[:6] == ["demo", "llama-3-8b-instruct", "chat,coding", "2", "2",
                                        "unknown"]  # fmt: skip

        # Drift: a deleted ConfigMap and a hand-scaled Deployment are put back.
        kubectl("delete", "-n", namespace, "configmap/demo-config")
        kubectl("scale", "-n", namespace, "deployment/demo-replica", "--replicas=5")
        configmaps = f"/api/v1/namespaces/{namespace}/configmaps"
        eventually(lambda: api.get(f"{configmaps}/demo-config"), 30, "ConfigMap back")
        eventually(lambda: replicas_of(api, namespace, "demo-replica") == 2, 30, "replicas 2")

        # `kubectl scale` on the SLOService goes through /scale to the replica Deployment.
        kubectl("scale", "-n", namespace, "slos/demo", "--replicas=3")
        eventually(lambda: replicas_of(api, namespace, "demo-replica") == 3, 30, "scaled to 3")
        eventually(
            lambda: (slo(api, namespace) or {}).get("status", {}).get("readyReplicas") == 3,
            30,
            "status replicas 3",
        )
        # An HPA on the SLOService reads /scale: its replicas and selector.
        hpas = f"/apis/autoscaling/v1/namespaces/{namespace}/horizontalpodautoscalers"
        api.create(hpas, hpa(NAME))
        v2 = f"/apis/autoscaling/v2beta2/namespaces/{namespace}/horizontalpodautoscalers/{NAME}"

        def scale_read() -> dict[str, Any] | None:
            conditions = ((api.get(v2) or {}).get("status") or {}).get("conditions") or []
            able = [c for c in conditions if c["type"] == "AbleToScale"]
            return able[0] if able else None

        able = eventually(scale_read, 30, "the HPA's AbleToScale condition")
        assert able["status"] == "True" and able["reason"] == "SucceededGetScale", able
        assert (api.get(v2) or {})["status"]["currentReplicas"] == 3
        # Two resyncs later the operator has not undone the scale.
        time.sleep(2 * 2 + 0.5)
        assert (slo(api, namespace) or {})["spec"]["replicas"]["desired"] == 3
        assert replicas_of(api, namespace, "demo-replica") == 3

        # A spec update reaches the ConfigMap (and rolls the pods through the config hash).
        apply(namespace, slower_chat)
        eventually(
            lambda: (
                "tpot_ms: 150"
                in ((api.get(f"{configmaps}/demo-config") or {}).get("data") or {})["classes.yaml"]
            ),
            30,
            "classes updated",
        )

        # Delete: no finalizer to wait for; the garbage collector removes the children.
        kubectl("delete", "-n", namespace, "slos/demo", "--wait=true")
        eventually(lambda: not children(api, namespace), 60, "children gone")
    assert runner.exception is None


def test_semantic_error_builds_nothing(api: SyncKubeApi, namespace: str) -> None:
    def impossible(spec: dict[str, Any]) -> None:
        spec["classes"][0]["ttftMs"] = 50  # an 8192-token prompt takes ~123 ms alone

    with operator(namespace) as runner:
        apply(namespace, impossible)
        body = eventually(with_condition(api, namespace, "Degraded", "True"), 60, "Degraded")
        degraded = condition(body, "Degraded")
        assert degraded["reason"] == "TTFTBelowZeroLoad"
        assert "ttftMs 50 is below the zero-load TTFT" in degraded["message"]
        assert body["status"]["phase"] == "Invalid"
        time.sleep(2.5)  # a resync (2 s) later, still nothing built
        assert children(api, namespace) == set()
        assert condition(slo(api, namespace), "Degraded")["reason"] == "TTFTBelowZeroLoad"
    assert runner.exception is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["model"].update(maxModelLen=4), "spec.model.maxModelLen: Invalid value: 4"),
        (
            lambda s: s["gateway"].update(serviceType="Ingress"),
            'spec.gateway.serviceType: Unsupported value: "Ingress"',
        ),
        (lambda s: s["model"].pop("profile"), "spec.model.profile: Required value"),
    ],
)
def test_schema_rejects_bad_manifests_with_422(
    api: SyncKubeApi, namespace: str, change: SpecChange, message: str
) -> None:
    # -v=6 logs each response's status: the server's answer, not a client-side check.
    # --validate=false: kubectl's own schema check would answer before the server.
    done = kubectl("create", "-n", namespace, "-f", "-", "-v=6", "--validate=false",
                   text=yaml.safe_dump(sloservice(change)), check=False)  # fmt: skip
    assert done.returncode != 0
    assert "422 Unprocessable Entity" in done.stderr, done.stderr
    assert "is invalid" in done.stderr and message in done.stderr, done.stderr
    assert slo(api, namespace) is None


def test_chart_rbac_is_enough_and_no_more(
    api: SyncKubeApi, namespace: str, kube_cluster: KubeCluster,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:  # fmt: skip
    helm = [str(HELM), "--namespace", namespace]
    chart = str(REPO / "charts" / "sloserve")
    subprocess.run([*helm, "install", "sloserve", chart, "--skip-crds"], check=True,
                   capture_output=True)  # fmt: skip
    account = f"/api/v1/namespaces/{namespace}/serviceaccounts/sloserve-operator"
    secret = eventually(
        lambda: ((api.get(account) or {}).get("secrets") or [{}])[0].get("name"),
        30,
        "SA token",
    )
    token_b64 = (api.get(f"/api/v1/namespaces/{namespace}/secrets/{secret}") or {})["data"]
    token = base64.b64decode(token_b64["token"]).decode()
    config = yaml.safe_load(kube_cluster.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    sa_config = tmp_path / "operator-kubeconfig"
    sa_config.write_text(yaml.safe_dump(config))

    monkeypatch.setenv("KUBECONFIG", str(sa_config))  # the operator's
    with operator(namespace) as runner:
        apply(namespace, config=kube_cluster.kubeconfig)  # as the admin
        eventually(lambda: children(api, namespace) == CHILDREN, 60, "children")
        eventually(with_condition(api, namespace, "Ready", "True"), 60, "Ready")
    assert runner.exception is None
    monkeypatch.setenv("KUBECONFIG", str(kube_cluster.kubeconfig))
    for forbidden in (
        ["delete", "-n", namespace, "deployment/demo-replica"],
        ["get", "-n", namespace, "secrets"],
        ["get", "-n", "default", "deployments"],
    ):
        done = kubectl(*forbidden, check=False, config=sa_config)
        assert done.returncode != 0 and "Forbidden" in done.stderr, (forbidden, done.stderr)
    upgrade = ["upgrade", "sloserve", chart, "--skip-crds", "--set", "operator.resyncSeconds=30"]
    subprocess.run([*helm, *upgrade], check=True, capture_output=True)
    subprocess.run([*helm, "uninstall", "sloserve"], check=True, capture_output=True)
    assert api.get(account) is None

"""The SLOService the operator tests create (the example, made to fit a test cluster), and the
children it becomes; shared by tests/test_operator_kube.py and tests/test_operator_faults.py."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import yaml
from conftest import REPO

CRD_PATH = REPO / "crds" / "sloservices.sloserve.io.yaml"
EXAMPLE = yaml.safe_load((REPO / "examples" / "sloservice-chat-coding.yaml").read_text())
NAME = "demo"
# kind/name, as `kubectl get -o name` says them without the API group.
CHILDREN = {
    "serviceaccount/demo-gateway",
    "role/demo-gateway-endpoints",
    "rolebinding/demo-gateway-endpoints",
    "configmap/demo-config",
    "service/demo-replicas",
    "deployment/demo-replica",
    "poddisruptionbudget/demo-replica",
    "service/demo-gateway",
    "deployment/demo-gateway",
}

SpecChange = Callable[[dict[str, Any]], Any]


def sloservice(change: SpecChange | None = None) -> dict[str, Any]:
    manifest: dict[str, Any] = copy.deepcopy(EXAMPLE)
    manifest["metadata"] = {"name": NAME}
    manifest["spec"]["autoscaling"]["enabled"] = False
    # Small enough for the dev cluster's one node (GPUs it has), and a model in the image: the
    # example's PersistentVolumeClaim does not exist here, so its pods would stay Pending.
    manifest["spec"]["engine"]["resources"] = {"requests": {"cpu": "100m", "memory": "128Mi"}}
    manifest["spec"]["model"]["source"] = "/models/llama-3-8b-instruct"
    if change:
        change(manifest["spec"])
    return manifest


def slower_chat(spec: dict[str, Any]) -> None:
    """A spec update that reaches the ConfigMap (`tpot_ms: 150` in classes.yaml)."""
    spec["classes"][0]["tpotMs"] = 150


def condition(body: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for c in ((body or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return dict(c)
    return {}

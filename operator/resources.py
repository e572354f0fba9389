"""The kinds of object the operator reads and writes, as REST resources (their paths).

API calls go through the shared client (sloserve/kubeclient.py), on kopf's event loop and with
the credentials kopf logged in with (handlers.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sloserve.kubeclient import Resource

SLOSERVICES = Resource("sloserve.io/v1alpha1", "sloservices")

# The kinds the operator creates, by (apiVersion, kind).
KINDS: dict[tuple[str, str], Resource] = {
    ("v1", "ConfigMap"): Resource("v1", "configmaps"),
    ("v1", "Service"): Resource("v1", "services"),
    ("v1", "ServiceAccount"): Resource("v1", "serviceaccounts"),
    ("apps/v1", "Deployment"): Resource("apps/v1", "deployments"),
    ("rbac.authorization.k8s.io/v1", "Role"): Resource("rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): Resource(
        "rbac.authorization.k8s.io/v1", "rolebindings"
    ),
    ("policy/v1", "PodDisruptionBudget"): Resource("policy/v1", "poddisruptionbudgets"),
    ("policy/v1beta1", "PodDisruptionBudget"): Resource("policy/v1beta1", "poddisruptionbudgets"),
}


def resource_of(manifest: Mapping[str, Any]) -> Resource:
    return KINDS[(str(manifest["apiVersion"]), str(manifest["kind"]))]

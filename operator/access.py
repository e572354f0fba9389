"""The gateway's identity: a ServiceAccount allowed to read and watch Endpoints, nothing more.

The operator may create this Role only because it holds the same permissions itself (RBAC
refuses to grant what the granter lacks): the chart's operator Role lists them.
"""

from __future__ import annotations

from typing import Any

from sloserve.operator.naming import Owner

COMPONENT = "gateway"

# What the gateway's Kubernetes discovery reads: Endpoints of the replicas' headless Service,
# and EndpointSlices for when it moves to them.
GATEWAY_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get", "list", "watch"]},
    {
        "apiGroups": ["discovery.k8s.io"],
        "resources": ["endpointslices"],
        "verbs": ["get", "list", "watch"],
    },
]


def service_account(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": owner.metadata(owner.gateway, COMPONENT),
    }


def role(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": owner.metadata(owner.endpoints_reader, COMPONENT),
        "rules": GATEWAY_RULES,
    }


def role_binding(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": owner.metadata(owner.endpoints_reader, COMPONENT),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": owner.endpoints_reader,
        },
        "subjects": [
            {"kind": "ServiceAccount", "name": owner.gateway, "namespace": owner.namespace}
        ],
    }

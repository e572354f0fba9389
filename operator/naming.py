"""Names, labels and owner references of an SLOService's children.

Every child is named after its SLOService, carries the same identifying labels, and is owned
by it (controller owner reference), so deleting the SLOService lets the garbage collector
delete the children: the operator keeps no finalizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sloserve.operator.crd import GROUP, KIND, VERSION

MANAGED_BY = "sloserve-operator"
OWNER_LABEL = f"{GROUP}/sloservice"
COMPONENT_LABEL = "app.kubernetes.io/component"
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"

# Longest SLOService name whose children's names stay valid DNS labels (a Service name is at
# most 63 characters; the longest suffix is "-replicas").
MAX_NAME_LENGTH = 63 - len("-replicas")

REPLICA_GRPC_PORT = 50051
REPLICA_METRICS_PORT = 9400
CONFIG_DIR = "/etc/sloserve"
CLASSES_FILE = "classes.yaml"
PROFILE_FILE = "step-profile.json"
API_KEYS_DIR = "/etc/sloserve-api-keys"
MODELS_DIR = "/models"


@dataclass(frozen=True)
class Owner:
    """The SLOService that children belong to."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(name=str(meta["name"]), namespace=str(meta["namespace"]), uid=str(meta["uid"]))

    # -- child names -------------------------------------------------------------------------

    @property
    def replica_deployment(self) -> str:
        return f"{self.name}-replica"

    @property
    def replica_service(self) -> str:
        return f"{self.name}-replicas"

    @property
    def gateway(self) -> str:
        """The gateway's Deployment, Service and ServiceAccount."""
        return f"{self.name}-gateway"

    @property
    def config_map(self) -> str:
        return f"{self.name}-config"

    @property
    def endpoints_reader(self) -> str:
        """The gateway's Role and RoleBinding."""
        return f"{self.name}-gateway-endpoints"

    @property
    def disruption_budget(self) -> str:
        return f"{self.name}-replica"

    # -- labels --------------------------------------------------------------------------

    def labels(self, component: str) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "sloserve",
            "app.kubernetes.io/instance": self.name,
            COMPONENT_LABEL: component,
            "app.kubernetes.io/managed-by": MANAGED_BY,
            OWNER_LABEL: self.name,
        }

    def selector(self, component: str) -> dict[str, str]:
        """Pod selector of a component: stable labels only (selectors are immutable)."""
        return {OWNER_LABEL: self.name, COMPONENT_LABEL: component}

    def selector_string(self, component: str) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.selector(component).items()))

    def metadata(self, name: str, component: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": self.labels(component),
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": KIND,
                    "name": self.name,
                    "uid": self.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        }


def owned_by(child: Mapping[str, Any], uid: str) -> bool:
    refs = child.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def owner_name(child: Mapping[str, Any]) -> str | None:
    """Name of the SLOService controlling `child`, if any."""
    for ref in child.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            return str(ref.get("name"))
    return None

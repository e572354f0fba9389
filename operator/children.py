"""Every child of an SLOService, in the order they are applied.

Identity and configuration come first (the ServiceAccount and its Role before the gateway that
uses them, the ConfigMap before the pods that mount it), Services before the Deployments whose
pods they select, the PodDisruptionBudget after the Deployment it protects.
"""

from __future__ import annotations

from typing import Any

from sloserve.operator import access, config_map, gateway_workload, replica_workload
from sloserve.operator.naming import Owner
from sloserve.operator.semantics import Checked


def build(
    owner: Owner, checked: Checked, image: str, replicas: int, pdb_api_version: str
) -> list[dict[str, Any]]:
    spec = checked.spec
    config = config_map.data(checked)
    config_hash = config_map.content_hash(config)
    return [
        access.service_account(owner),
        access.role(owner),
        access.role_binding(owner),
        config_map.config_map(owner, config),
        replica_workload.headless_service(owner),
        replica_workload.deployment(owner, spec, image, replicas, config_hash),
        replica_workload.disruption_budget(owner, pdb_api_version),
        gateway_workload.service(owner, spec),
        gateway_workload.deployment(owner, spec, image, config_hash),
    ]

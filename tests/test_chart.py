"""The Helm chart: strict lint, valid renders for 1.20 and 1.29-1.33, least privilege."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from conftest import REPO

from sloserve.operator import access

CHART = REPO / "charts" / "sloserve"
HELM = REPO / ".venv" / "bin" / "helm"
VALUES = [None, *sorted((CHART / "ci").glob("*.yaml"))]

pytestmark = pytest.mark.skipif(not HELM.exists(), reason="helm is not installed in .venv")


def _ids(values: Path | None) -> str:
    return values.stem if values else "defaults"


def render(values: Path | None, kube_version: str, *extra: str) -> list[dict[str, Any]]:
    command = [str(HELM), "template", "sloserve", str(CHART), "--namespace", "serving",
               "--kube-version", kube_version, "--include-crds", *extra]  # fmt: skip
    if values:
        command += ["-f", str(values)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.parametrize("values", VALUES, ids=_ids)
def test_lint_strict(values: Path | None) -> None:
    command = [str(HELM), "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("values", VALUES, ids=_ids)
@pytest.mark.parametrize("kube_version", ["1.29.0", "1.33.0"])
def test_renders_valid_manifests(values: Path | None, kube_version: str) -> None:
    docs = render(values, kube_version)
    assert {d["kind"] for d in docs} >= {"CustomResourceDefinition", "Deployment"}
    for doc in docs:
        kubernetes_validate.validate(doc, kube_version, strict=True)


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


def test_namespaced_by_default() -> None:
    docs = _by_kind(render(None, "1.20.2"))
    assert "ClusterRole" not in docs and "ClusterRoleBinding" not in docs
    assert docs["Role"]["metadata"]["namespace"] == "serving"
    args = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=serving" in args and "--all-namespaces" not in args
    assert "--default-image=sloserve:0.1.0" in args


def test_cluster_wide_by_a_value() -> None:
    docs = _by_kind(render(CHART / "ci" / "cluster-wide-values.yaml", "1.20.2"))
    assert "Role" not in docs and docs["ClusterRole"]["rules"]
    assert docs["ClusterRoleBinding"]["roleRef"]["kind"] == "ClusterRole"
    args = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--all-namespaces" in args


def test_operator_role_is_least_privilege() -> None:
    rules = _by_kind(render(None, "1.20.2"))["Role"]["rules"]
    verbs = {(g, r): set(rule["verbs"]) for rule in rules for g in rule["apiGroups"]
             for r in rule["resources"]}  # fmt: skip
    # Nothing deletes: owner references let the garbage collector remove children.
    assert not any("delete" in v or "*" in v for v in verbs.values())
    assert ("", "secrets") not in verbs and ("", "pods") not in verbs
    assert verbs[("sloserve.io", "sloservices/scale")] == {"get", "patch"}
    # It can grant the gateway's Role only because it holds those rules itself.
    for rule in access.GATEWAY_RULES:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert set(rule["verbs"]) <= verbs[(group, resource)]


def test_crd_in_chart_is_the_generated_one() -> None:
    crds = [d for d in render(None, "1.20.2") if d["kind"] == "CustomResourceDefinition"]
    assert [d["metadata"]["name"] for d in crds] == ["sloservices.sloserve.io"]
    assert yaml.safe_load((REPO / "crds" / "sloservices.sloserve.io.yaml").read_text()) == crds[0]

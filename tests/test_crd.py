"""The SLOService CRD: one generated source, both copies current, a schema that refuses."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from conftest import REPO

from sloserve.operator import crd

EXAMPLE = REPO / "examples" / "sloservice-chat-coding.yaml"
EXAMPLES = sorted((REPO / "examples").glob("sloservice-*.yaml"))


def _schema() -> dict[str, Any]:
    version = crd.definition()["spec"]["versions"][0]
    return dict(version["schema"]["openAPIV3Schema"])


def _errors(manifest: dict[str, Any]) -> list[str]:
    # apiextensions v1 schemas are OpenAPI 3.0: draft 4's boolean exclusiveMinimum.
    validator = jsonschema.Draft4Validator(_schema())
    return sorted(
        "/".join(map(str, e.absolute_path)) + ": " + e.message
        for e in validator.iter_errors(manifest)
    )


@pytest.mark.parametrize("relative", crd.OUTPUTS, ids=str)
def test_crd_files_equal_the_generated_definition(relative: Path) -> None:
    assert (REPO / relative).read_text() == crd.render(), "run `python -m sloserve.operator.crd`"


def test_generator_check_mode_agrees(tmp_path: Path) -> None:
    check = [sys.executable, "-m", "sloserve.operator.crd", "--repo", str(tmp_path), "--check"]
    assert subprocess.run(check, capture_output=True).returncode == 1  # nothing written yet
    write = [sys.executable, "-m", "sloserve.operator.crd", "--repo", str(tmp_path)]
    subprocess.run(write, check=True, capture_output=True)
    assert subprocess.run(check, capture_output=True).returncode == 0
    assert (tmp_path / crd.OUTPUTS[0]).read_text() == (REPO / crd.OUTPUTS[1]).read_text()


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_crd_is_a_valid_manifest(version: str) -> None:
    kubernetes_validate.validate(crd.definition(), version, strict=True)


def test_crd_names_subresources_and_columns() -> None:
    spec = crd.definition()["spec"]
    assert spec["names"]["shortNames"] == ["slos"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas.desired",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["MODEL", "CLASSES", "REPLICAS", "READY", "ATTAINMENT", "PHASE", "AGE"]
    # Kubernetes 1.20's kubectl rejects CEL rules: none may be in the served CRD.
    assert "x-kubernetes-validations" not in crd.render()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_the_schema(example: Path) -> None:
    assert _errors(yaml.safe_load(example.read_text())) == []


@pytest.mark.parametrize(
    "source", ["/opt/models/x", "pvc://models/llama", "pvc://models", "builtin://tiny"]
)
def test_model_sources_the_schema_takes(source: str) -> None:
    assert _errors(_bad("spec.model.source", source)) == []


def _bad(path: str, value: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    *parents, leaf = path.split(".")
    node = manifest
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    return dict(manifest)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("spec.model.maxModelLen", 8, "spec/model/maxModelLen: 8 is less than the minimum of 16"),
        ("spec.model.source", "models/x", "spec/model/source: 'models/x' does not match"),
        ("spec.model.source", "builtin://gpt", "spec/model/source: 'builtin://gpt' does not"),
        ("spec.model.profile", None, "spec/model: 'profile' is a required property"),
        ("spec.engine.gpusPerReplica", -1, "spec/engine/gpusPerReplica: -1 is less than"),
        ("spec.gateway.serviceType", "Ingress", "spec/gateway/serviceType: 'Ingress' is not one"),
        ("spec.classes.0.name", "Chat", "spec/classes/0/name: 'Chat' does not match"),
        ("spec.classes.0.tpotMs", 0, "spec/classes/0/tpotMs: 0 is less than or equal to"),
        ("spec.classes.0.attainmentTarget", 1.5, "spec/classes/0/attainmentTarget: 1.5 is greater"),
        ("spec.classes.0.ttftZeroLoadMultiple", 3, "spec/classes/0: {"),  # both TTFT forms
        ("spec.classes.1.ttftZeroLoadMultiple", None, "spec/classes/1: {"),  # neither
        ("spec.replicas.max", 0, "spec/replicas/max: 0 is less than the minimum of 1"),
        ("spec.autoscaling.hysteresis", 0.9, "spec/autoscaling/hysteresis: 0.9 is greater"),
        ("spec.classes", [], "spec/classes: [] should be non-empty"),
    ],
)
def test_schema_refuses_with_the_field_named(path: str, value: Any, expected: str) -> None:
    errors = _errors(_bad(path, value))
    assert any(e.startswith(expected) for e in errors), errors

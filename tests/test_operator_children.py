"""The children an SLOService becomes: valid manifests, wired to each other."""

from __future__ import annotations

from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from conftest import REPO

from sloserve.operator import children
from sloserve.operator.naming import CONFIG_HASH_ANNOTATION, Owner
from sloserve.operator.semantics import Checked, check
from sloserve.operator.spec import parse_spec

EXAMPLE = yaml.safe_load((REPO / "examples" / "sloservice-chat-coding.yaml").read_text())
OWNER = Owner("llama3-8b", "serving", "0b7c-uid")


def _checked(spec: dict[str, Any] | None = None) -> Checked:
    checked = check(parse_spec(spec or EXAMPLE["spec"]))
    assert isinstance(checked, Checked)
    return checked


def _by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{m['kind']}/{m['metadata']['name']}": m for m in manifests}


@pytest.fixture
def built() -> dict[str, dict[str, Any]]:
    return _by_kind(children.build(OWNER, _checked(), "reg/sloserve:1", 3, "policy/v1"))


@pytest.mark.parametrize("version", ["1.29.0", "1.33.0"])
def test_children_are_valid_manifests(version: str) -> None:
    for manifest in children.build(OWNER, _checked(), "reg/sloserve:1", 3, "policy/v1"):
        kubernetes_validate.validate(manifest, version, strict=True)


def test_every_child_is_owned_and_labelled(built: dict[str, dict[str, Any]]) -> None:
    assert len(built) == 9
    for manifest in built.values():
        meta = manifest["metadata"]
        assert meta["namespace"] == "serving"
        (ref,) = meta["ownerReferences"]
        assert ref["uid"] == "0b7c-uid" and ref["controller"] and ref["kind"] == "SLOService"
        assert meta["labels"]["sloserve.io/sloservice"] == "llama3-8b"


def test_replica_deployment(built: dict[str, dict[str, Any]]) -> None:
    deployment = built["Deployment/llama3-8b-replica"]
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "reg/sloserve:1"
    args = container["args"]
    assert args[:3] == ["replica", "--model", "/models/models/meta-llama-3-8b-instruct"]
    assert args[-2:] == ["--max-num-seqs", "128"]  # engineArgs come last, as given
    assert args[args.index("--max-model-len") + 1] == "8192"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["exec"]["command"][:2] == ["sloserve", "health"]
    assert {"name": "model", "mountPath": "/models/models", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert {
        "name": "model",
        "persistentVolumeClaim": {"claimName": "models", "readOnly": True},
    } in (pod["volumes"])
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_gateway_discovers_replicas_through_the_headless_service(
    built: dict[str, dict[str, Any]],
) -> None:
    headless = built["Service/llama3-8b-replicas"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"][0]["name"] == "grpc"
    gateway = built["Deployment/llama3-8b-gateway"]
    pod = gateway["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--k8s-service") + 1] == "serving/llama3-8b-replicas"
    assert args[args.index("--k8s-port") + 1] == "grpc"
    assert args[args.index("--model-name") + 1] == "llama-3-8b-instruct"
    assert args[args.index("--queue-capacity") + 1] == "128"
    # A rolling update fails no request: after SIGTERM the gateway serves on while the
    # Service stops sending to it, then drains (300 s), all within the grace period.
    delay = float(args[args.index("--shutdown-delay") + 1])
    assert delay >= 5 and pod["terminationGracePeriodSeconds"] >= delay + 300
    assert pod["serviceAccountName"] == "llama3-8b-gateway"
    binding = built["RoleBinding/llama3-8b-gateway-endpoints"]
    assert binding["subjects"][0]["name"] == "llama3-8b-gateway"
    rules = built["Role/llama3-8b-gateway-endpoints"]["rules"]
    assert {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get", "list", "watch"]} in (
        rules
    )
    ports = {p["name"]: p["port"] for p in built["Service/llama3-8b-gateway"]["spec"]["ports"]}
    assert ports == {"grpc": 50050, "http": 8000, "metrics": 9500}


def test_config_change_rolls_both_deployments() -> None:
    spec = yaml.safe_load(yaml.safe_dump(EXAMPLE["spec"]))
    before = _by_kind(children.build(OWNER, _checked(spec), "i", 1, "policy/v1"))
    spec["classes"][0]["tpotMs"] = 120
    after = _by_kind(children.build(OWNER, _checked(spec), "i", 1, "policy/v1"))
    for name in ("Deployment/llama3-8b-replica", "Deployment/llama3-8b-gateway"):
        old = before[name]["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        new = after[name]["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        assert old != new


def test_api_keys_secret_is_mounted_when_named() -> None:
    spec = yaml.safe_load(yaml.safe_dump(EXAMPLE["spec"]))
    spec["gateway"]["authSecret"] = "llama-keys"
    built = _by_kind(children.build(OWNER, _checked(spec), "i", 1, "policy/v1beta1"))
    pod = built["Deployment/llama3-8b-gateway"]["spec"]["template"]["spec"]
    assert {"name": "api-keys", "secret": {"secretName": "llama-keys"}} in pod["volumes"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--api-keys") + 1] == "/etc/sloserve-api-keys"
    assert built["PodDisruptionBudget/llama3-8b-replica"]["apiVersion"] == "policy/v1beta1"


def test_cpu_replicas_request_no_gpu() -> None:
    spec = yaml.safe_load(yaml.safe_dump(EXAMPLE["spec"]))
    spec["engine"] = {"gpusPerReplica": 0}
    spec["model"]["source"] = "/opt/models/tiny"
    built = _by_kind(children.build(OWNER, _checked(spec), "i", 1, "policy/v1"))
    pod = built["Deployment/llama3-8b-replica"]["spec"]["template"]["spec"]
    assert "tolerations" not in pod
    assert pod["containers"][0]["resources"] == {}
    assert pod["containers"][0]["args"][2] == "/opt/models/tiny"


def test_builtin_model_is_built_by_the_replica_into_an_empty_dir() -> None:
    tiny = yaml.safe_load((REPO / "examples" / "sloservice-tiny.yaml").read_text())
    owner = Owner("tiny", "default", "1d2e-uid")
    built = _by_kind(children.build(owner, _checked(tiny["spec"]), "i", 2, "policy/v1"))
    pod = built["Deployment/tiny-replica"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[args.index("--model") + 1] == "/models/builtin/tiny"
    assert args[args.index("--build-model") + 1] == "tiny"
    assert {"name": "model", "emptyDir": {}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models/builtin"} in container["volumeMounts"]
    for manifest in built.values():
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)

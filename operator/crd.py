"""The SLOService CustomResourceDefinition: the one source of truth for its schema.

`crds/sloservices.sloserve.io.yaml` and `charts/sloserve/crds/` hold this module's output;
`python -m sloserve.operator.crd` (or `sloserve crd --write`) rewrites both and a test checks
that they match. Defaults live in `DEFAULTS` and are used by the schema and by the operator's
own parser (`spec.py`) alike, so an object read from a server that defaulted it and one that
was not (a test fake) mean the same.

Cross-field rules (min <= initial <= max, a known default class, ...) are not written as CEL:
Kubernetes 1.20 has no CEL, and its kubectl rejects the `x-kubernetes-validations` field. The
operator checks them (`semantics.py`) and reports a violation in the Degraded condition.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

GROUP = "sloserve.io"
VERSION = "v1alpha1"
KIND = "SLOService"
PLURAL = "sloservices"
SINGULAR = "sloservice"
SHORT_NAME = "slos"
NAME = f"{PLURAL}.{GROUP}"
FILE_NAME = f"{NAME}.yaml"

# Where the generated CRD lives, relative to the repository root.
OUTPUTS = (Path("crds") / FILE_NAME, Path("charts") / "sloserve" / "crds" / FILE_NAME)

# The field `kubectl scale`, an HPA and the operator's autoscaler all write through /scale.
SPEC_REPLICAS_PATH = ".spec.replicas.desired"

# Same pattern as sloserve.slo's class names (a DNS label).
CLASS_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ROUTING_POLICIES = ("slack", "packing", "round-robin", "least-outstanding")
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

DEFAULTS: dict[str, Any] = {
    "model.engineArgs": [],
    "engine.imagePullPolicy": "IfNotPresent",
    "engine.gpusPerReplica": 1,
    "engine.tensorParallelSize": 1,
    "replicas.initial": 1,
    "replicas.min": 1,
    "class.attainmentTarget": 0.95,
    "class.priority": 0,
    "class.spillToBestEffort": True,
    "gateway.replicas": 1,
    "gateway.serviceType": "ClusterIP",
    "gateway.routing": "slack",
    "gateway.ports.grpc": 50050,
    "gateway.ports.http": 8000,
    "gateway.ports.metrics": 9500,
    "bestEffortQueue.capacity": 64,
    "bestEffortQueue.ttlSeconds": 30,
    "autoscaling.enabled": False,
    "autoscaling.windowSeconds": 60,
    "autoscaling.hysteresis": 0.02,
    "autoscaling.targetInFlightPerReplica": 8,
}


def _obj(
    description: str,
    properties: dict[str, Any],
    required: list[str] | None = None,
    default: Any = None,
) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "description": description,
        "properties": properties,
    }
    if required:
        schema["required"] = required
    if default is not None:
        schema["default"] = default
    return schema


def _int(description: str, minimum: int, maximum: int, default_key: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "integer",
        "description": description,
        "minimum": minimum,
        "maximum": maximum,
    }
    if default_key:
        schema["default"] = DEFAULTS[default_key]
    return schema


def _positive(description: str, maximum: float, default_key: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "number",
        "description": description,
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": maximum,
    }
    if default_key:
        schema["default"] = DEFAULTS[default_key]
    return schema


def _str(description: str, **rules: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **rules}


def _port(name: str) -> dict[str, Any]:
    return _int(f"{name} port of the gateway", 1, 65535, f"gateway.ports.{name}")


def _quantities(description: str) -> dict[str, Any]:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
        },
    }


def _model() -> dict[str, Any]:
    return _obj(
        "The model every replica serves.",
        {
            "source": _str(
                "Model directory in the image (an absolute path), on a PersistentVolumeClaim "
                "(pvc://CLAIM/path/in/volume, mounted read-only), or a random-weight model "
                "each replica builds at start (builtin://tiny or builtin://bench: trials, "
                "tests, CPU-only clusters).",
                minLength=2,
                pattern=r"^(/|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?$|builtin://(tiny|bench)$)",
            ),
            "servedName": _str(
                "Model name of the OpenAI HTTP API (`model` in requests).",
                minLength=1,
                maxLength=256,
            ),
            "engineArgs": {
                "type": "array",
                "description": "Extra `sloserve replica` flags, appended as given.",
                "maxItems": 64,
                "items": {"type": "string"},
                "default": DEFAULTS["model.engineArgs"],
            },
            "maxModelLen": _int(
                "Context length in tokens: the longest prompt a replica accepts.", 16, 1 << 20
            ),
            "profile": _str(
                "Step-time profile the SLO scheduler plans with: the name of a profile shipped "
                "in sloserve/profiles (cpu-bench, gpu-llama-3-8b-a100-vidur, ...). It also "
                "gives the zero-load prefill time the TTFT budgets are checked against.",
                minLength=1,
                maxLength=128,
                pattern=r"^[a-z0-9][a-z0-9.-]*$",
            ),
        },
        required=["source", "servedName", "maxModelLen", "profile"],
    )


def _engine() -> dict[str, Any]:
    return _obj(
        "The replica pods: image, accelerators, resources.",
        {
            "image": _str(
                "Container image holding sloserve (default: the operator's own image).",
                minLength=1,
            ),
            "imagePullPolicy": _str(
                "Image pull policy.",
                enum=list(PULL_POLICIES),
                default=DEFAULTS["engine.imagePullPolicy"],
            ),
            "gpusPerReplica": _int(
                "nvidia.com/gpu requested (and limited) per replica; 0 runs on CPU.",
                0,
                16,
                "engine.gpusPerReplica",
            ),
            "tensorParallelSize": _int(
                "GPUs one engine shards the model over; must divide gpusPerReplica.",
                1,
                16,
                "engine.tensorParallelSize",
            ),
            "resources": _obj(
                "CPU and memory of a replica container (GPUs come from gpusPerReplica).",
                {
                    "requests": _quantities("Resource requests, e.g. cpu: '4', memory: 32Gi."),
                    "limits": _quantities("Resource limits."),
                },
            ),
        },
        default={},
    )


def _replicas() -> dict[str, Any]:
    return _obj(
        "Replica counts. `desired` is the scale subresource's field: `kubectl scale`, an HPA "
        "and the operator's autoscaler all write it through /scale; the operator sets it to "
        "`initial` when it is unset.",
        {
            "initial": _int("Replicas at creation.", 0, 1000, "replicas.initial"),
            "min": _int("Fewest replicas.", 0, 1000, "replicas.min"),
            "max": _int("Most replicas (default: the larger of initial and min).", 1, 1000),
            "desired": _int("Replicas wanted now (written through /scale).", 0, 1000),
        },
        default={},
    )


def _slo_class() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "One SLO class. Give exactly one of ttftMs and ttftZeroLoadMultiple.",
        "required": ["name", "tpotMs"],
        "oneOf": [{"required": ["ttftMs"]}, {"required": ["ttftZeroLoadMultiple"]}],
        "properties": {
            "name": _str(
                "Class name requests use (x-sloserve-slo-class).",
                maxLength=63,
                pattern=CLASS_NAME_PATTERN,
            ),
            "description": _str("What the class is for.", maxLength=256),
            "ttftMs": _positive("Time-to-first-token budget in milliseconds.", 600_000),
            "ttftZeroLoadMultiple": {
                "type": "number",
                "description": "TTFT budget as a multiple (at least 1) of the zero-load TTFT "
                "of the longest allowed prompt (maxModelLen tokens) on the profile.",
                "minimum": 1,
                "maximum": 1000,
            },
            "tpotMs": _positive("Time-per-output-token budget in milliseconds.", 60_000),
            "thinkingTpotMs": _positive(
                "TPOT of a thinking stage before the answer, in milliseconds.", 60_000
            ),
            "attainmentTarget": {
                "type": "number",
                "description": "Fraction of the class's requests that must meet their SLO.",
                "minimum": 0,
                "exclusiveMinimum": True,
                "maximum": 1,
                "default": DEFAULTS["class.attainmentTarget"],
            },
            "priority": _int(
                "Relative importance, higher first (recorded in the classes file).",
                0,
                100,
                "class.priority",
            ),
            "spillToBestEffort": {
                "type": "boolean",
                "description": "Whether the class's requests may be served as best effort "
                "(admitted as such, demoted when late, spilled by the gateway). false: they are "
                "rejected, or ended with DEADLINE_EXCEEDED, instead.",
                "default": DEFAULTS["class.spillToBestEffort"],
            },
        },
    }


def _gateway() -> dict[str, Any]:
    return _obj(
        "The gateway in front of the replicas.",
        {
            "replicas": _int("Gateway pods.", 1, 100, "gateway.replicas"),
            "serviceType": _str(
                "Type of the gateway's Service.",
                enum=list(SERVICE_TYPES),
                default=DEFAULTS["gateway.serviceType"],
            ),
            "routing": _str(
                "Routing policy.", enum=list(ROUTING_POLICIES), default=DEFAULTS["gateway.routing"]
            ),
            "ports": _obj(
                "Ports of the gateway.",
                {"grpc": _port("grpc"), "http": _port("http"), "metrics": _port("metrics")},
                default={},
            ),
            "authSecret": _str(
                "Secret holding API keys (gateway --api-keys format: keys.yaml, or one file "
                "per key); unset: no API keys.",
                maxLength=253,
                pattern=DNS_SUBDOMAIN_PATTERN,
            ),
        },
        default={},
    )


def _best_effort_queue() -> dict[str, Any]:
    return _obj(
        "The gateway's best-effort (spillover) queue.",
        {
            "capacity": _int(
                "Requests queued per SLO class.", 1, 100_000, "bestEffortQueue.capacity"
            ),
            "ttlSeconds": _positive(
                "Seconds a request may wait in the queue.", 3600, "bestEffortQueue.ttlSeconds"
            ),
        },
        default={},
    )


def _autoscaling() -> dict[str, Any]:
    return _obj(
        "Autoscaling by SLO attainment and load, within replicas.min and replicas.max.",
        {
            "enabled": {
                "type": "boolean",
                "description": "Whether the operator writes replicas.desired itself.",
                "default": DEFAULTS["autoscaling.enabled"],
            },
            "windowSeconds": _int(
                "Attainment is measured over this window; a scale-down waits this long after "
                "the last change.",
                10,
                3600,
                "autoscaling.windowSeconds",
            ),
            "hysteresis": {
                "type": "number",
                "description": "A scale-down needs attainment above target + hysteresis and "
                "load below (1 - hysteresis) of what one replica fewer can carry.",
                "minimum": 0,
                "maximum": 0.5,
                "default": DEFAULTS["autoscaling.hysteresis"],
            },
            "targetInFlightPerReplica": _int(
                "Requests in flight one replica is sized for.",
                1,
                10_000,
                "autoscaling.targetInFlightPerReplica",
            ),
        },
        default={},
    )


def _spec() -> dict[str, Any]:
    return _obj(
        "What to serve and the SLOs to keep.",
        {
            "model": _model(),
            "engine": _engine(),
            "replicas": _replicas(),
            "classes": {
                "type": "array",
                "description": "SLO classes served.",
                "minItems": 1,
                "maxItems": 32,
                "items": _slo_class(),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            },
            "defaultClass": _str(
                "Class of requests that name none (default: the first class).",
                pattern=CLASS_NAME_PATTERN,
            ),
            "gateway": _gateway(),
            "bestEffortQueue": _best_effort_queue(),
            "autoscaling": _autoscaling(),
        },
        required=["model", "classes"],
    )


def _condition() -> dict[str, Any]:
    return _obj(
        "A condition (Ready, Progressing, Degraded, SLOMet).",
        {
            "type": _str("Condition type."),
            "status": _str("True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "reason": _str("A reason from a fixed set (see docs/operator.md)."),
            "message": _str("Human-readable details."),
            "observedGeneration": {"type": "integer", "format": "int64"},
            "lastTransitionTime": _str("When status last changed.", format="date-time"),
        },
        required=["type", "status"],
    )


def _class_status() -> dict[str, Any]:
    return _obj(
        "One class's attainment as the gateway measured it.",
        {
            "name": _str("Class name."),
            "target": {"type": "number"},
            "attainment": {
                "type": "number",
                "description": "Over the autoscaling window (absent without traffic).",
            },
            "lifetimeAttainment": {
                "type": "number",
                "description": "Since the gateway started.",
            },
            "arrived": {"type": "integer", "description": "Requests counted in the window."},
            "met": {"type": "boolean", "description": "attainment >= target."},
        },
        required=["name"],
    )


def _status() -> dict[str, Any]:
    return _obj(
        "Observed state, written by the operator.",
        {
            "observedGeneration": {"type": "integer", "format": "int64"},
            "phase": _str(
                "Summary: Pending, Progressing, Ready, Degraded or Invalid.",
                enum=["Pending", "Progressing", "Ready", "Degraded", "Invalid"],
            ),
            "replicas": {"type": "integer", "description": "Replica pods (scale status)."},
            "readyReplicas": {"type": "integer"},
            "selector": _str("Label selector of the replica pods (scale subresource)."),
            "gatewayReadyReplicas": {"type": "integer"},
            "classNames": _str("The classes served, comma-separated."),
            "attainment": _str(
                "Windowed attainment of the class with the least margin over its target, "
                "e.g. 'coding 97.5%'."
            ),
            "classes": {"type": "array", "items": _class_status()},
            "lastScaleTime": _str(
                "When the autoscaler last changed the replicas.", format="date-time"
            ),
            "lastScaleReason": _str("Why it did."),
            "conditions": {"type": "array", "items": _condition()},
        },
    )


PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.servedName"},
    {"name": "Classes", "type": "string", "jsonPath": ".status.classNames"},
    {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Attainment", "type": "string", "jsonPath": ".status.attainment"},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def definition() -> dict[str, Any]:
    """The CRD as a manifest (apiextensions.k8s.io/v1, served by Kubernetes 1.16+)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": NAME,
            "labels": {"app.kubernetes.io/name": "sloserve"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": ["sloserve"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": _obj(
                            "An LLM served with per-class latency SLOs: replicas, a gateway, "
                            "their wiring, and SLO-driven autoscaling.",
                            {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": _spec(),
                                "status": _status(),
                            },
                            required=["spec"],
                        )
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": SPEC_REPLICAS_PATH,
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


HEADER = (
    "# Generated by `python -m sloserve.operator.crd` from operator/crd.py: do not edit.\n"
    "# The same file lives in crds/ and charts/sloserve/crds/; tests check both.\n"
)


def render() -> str:
    return HEADER + yaml.safe_dump(definition(), sort_keys=False, width=100)


def write(repo: Path) -> list[Path]:
    """Writes the CRD into every output under `repo`; returns the files that changed."""
    text, changed = render(), []
    for relative in OUTPUTS:
        path = repo / relative
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(path)
    return changed


def stale(repo: Path) -> list[Path]:
    """The outputs under `repo` that differ from the generated CRD."""
    text = render()
    return [repo / r for r in OUTPUTS if not (repo / r).exists() or (repo / r).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sloserve.operator.crd", description="write or check the SLOService CRD"
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root")
    parser.add_argument("--check", action="store_true", help="fail if a file is stale")
    parser.add_argument("--stdout", action="store_true", help="print the CRD instead")
    args = parser.parse_args(argv)
    if args.stdout:
        sys.stdout.write(render())
        return 0
    if args.check:
        bad = stale(args.repo)
        for path in bad:
            print(f"stale: {path}; run `python -m sloserve.operator.crd`", file=sys.stderr)
        return 1 if bad else 0
    for path in write(args.repo):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

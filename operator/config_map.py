"""The ConfigMap replicas and gateway mount: the classes file and the step-time profile.

Its content hash goes on both pod templates, so a change of classes or profile rolls the pods
(a mounted ConfigMap updates in place, but neither process re-reads its files).
"""

from __future__ import annotations

import hashlib
from typing import Any

import yaml

from sloserve.operator.naming import CLASSES_FILE, PROFILE_FILE, Owner
from sloserve.operator.semantics import Checked


def classes_yaml(checked: Checked) -> str:
    """The classes in sloserve's classes-file format (sloserve/default_classes.yaml)."""
    document = {
        "default_class": checked.spec.default_class,
        "classes": [c.to_classes_entry() for c in checked.classes],
    }
    header = "# Written by the sloserve operator from the SLOService's classes.\n"
    return header + yaml.safe_dump(document, sort_keys=False)


def data(checked: Checked) -> dict[str, str]:
    return {CLASSES_FILE: classes_yaml(checked), PROFILE_FILE: checked.profile_json()}


def content_hash(config: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for key in sorted(config):
        digest.update(key.encode() + b"\0" + config[key].encode() + b"\0")
    return digest.hexdigest()[:16]


def config_map(owner: Owner, config: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owner.metadata(owner.config_map, "config"),
        "data": config,
    }

"""A kubeconfig for the dev cluster's admin, read by kubectl, helm, kopf and the
`kubernetes` client alike."""

from __future__ import annotations

from pathlib import Path

import yaml

CONTEXT = "sloserve-dev"


def write_kubeconfig(path: Path, server: str, token: str, ca_file: Path) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": CONTEXT, "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": CONTEXT, "user": {"token": token}}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": CONTEXT}}],
        "current-context": CONTEXT,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path

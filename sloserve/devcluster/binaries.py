"""Where the control plane's programs are: the three Kubernetes binaries that
scripts/k8s/build-control-plane.sh caches per version, and Debian's etcd."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.20.2"
BUILD_HINT = "run `make control-plane` (scripts/k8s/build-control-plane.sh, about 4 minutes)"


class MissingBinariesError(RuntimeError):
    """The control plane cannot start: a program is not built or not installed."""


def cache_root() -> Path:
    configured = os.environ.get("SLOSERVE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "sloserve"


def kubernetes_bin_dir(version: str = KUBERNETES_VERSION) -> Path:
    return cache_root() / "kubernetes" / version / "bin"


@dataclass(frozen=True)
class ControlPlaneBinaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path

    @classmethod
    def find(cls, version: str = KUBERNETES_VERSION) -> ControlPlaneBinaries:
        """The installed binaries; MissingBinariesError names what is missing and the fix."""
        bin_dir = kubernetes_bin_dir(version)
        kube = {name: bin_dir / name for name in ("kube-apiserver", "kube-controller-manager",
                                                    "kube-scheduler")}  # fmt: skip
        missing = [str(path) for path in kube.values() if not os.access(path, os.X_OK)]
        etcd = shutil.which("etcd")
        if etcd is None:
            missing.append("etcd (Debian package etcd-server)")
        if missing:
            raise MissingBinariesError(
                f"Kubernetes {version} control plane not installed; missing: "
                f"{', '.join(missing)}. To build it, {BUILD_HINT}."
            )
        assert etcd is not None
        return cls(
            etcd=Path(etcd),
            kube_apiserver=kube["kube-apiserver"],
            kube_controller_manager=kube["kube-controller-manager"],
            kube_scheduler=kube["kube-scheduler"],
        )

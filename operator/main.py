"""`sloserve operator`: runs the kopf operator; `sloserve crd`: writes or checks the CRD."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from sloserve.operator.runtime import OperatorConfig

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("operator", help="run the Kubernetes operator for SLOService resources")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        action="append",
        metavar="NS",
        help="namespace to watch; repeatable (default: the pod's own namespace)",
    )
    scope.add_argument("--all-namespaces", action="store_true", help="watch the whole cluster")
    p.add_argument(
        "--default-image",
        default=OperatorConfig.default_image,
        help="image of replicas and gateways whose SLOService names none "
        f"(default: {OperatorConfig.default_image})",
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=OperatorConfig.resync_s,
        help="reconcile every SLOService this often: status, attainment, autoscaling "
        f"(default: {OperatorConfig.resync_s:g})",
    )
    p.add_argument(
        "--liveness-port",
        type=int,
        default=8080,
        help="serve kopf's /healthz on this port; -1 turns it off (default: 8080)",
    )
    c = sub.add_parser("crd", help="print, write or check the SLOService CRD files")
    c.add_argument("--write", action="store_true", help="rewrite crds/ and charts/sloserve/crds/")
    c.add_argument("--check", action="store_true", help="fail if those files are stale")
    c.add_argument("--repo", type=Path, default=Path("."), help="repository root (default: .)")


def _own_namespace() -> str:
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if SA_NAMESPACE_FILE.exists():
        return SA_NAMESPACE_FILE.read_text().strip()
    return "default"


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    from sloserve.operator import handlers
    from sloserve.operator.runtime import configure

    namespaces: tuple[str, ...] = (
        () if args.all_namespaces else tuple(args.namespace or (_own_namespace(),))
    )
    configure(
        OperatorConfig(
            default_image=args.default_image,
            resync_s=args.resync_seconds,
            namespaces=namespaces,
        )
    )
    del handlers  # imported for its registrations
    # The pod's own address where the chart passes it (the kubelet probes that address), so
    # the port does not clash with other pods that share a host network (the dev cluster's).
    host = os.environ.get("POD_IP") or "0.0.0.0"
    liveness = None if args.liveness_port < 0 else f"http://{host}:{args.liveness_port}/healthz"
    asyncio.run(
        kopf.operator(
            standalone=True,  # no peering objects: one operator per scope (the chart runs one)
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            liveness_endpoint=liveness,
        )
    )
    return 0


def run_crd(args: argparse.Namespace) -> int:
    from sloserve.operator import crd

    if args.check:
        return crd.main(["--repo", str(args.repo), "--check"])
    if args.write:
        return crd.main(["--repo", str(args.repo)])
    return crd.main(["--stdout"])

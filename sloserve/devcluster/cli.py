"""`sloserve devcluster up`: a dev cluster until Ctrl-C (kubectl and helm work against it)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "devcluster", help="a local Kubernetes 1.20 control plane with a fake node (dev, tests)"
    )
    actions = p.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start it and print its kubeconfig; Ctrl-C stops it")
    up.add_argument(
        "--dir",
        type=Path,
        help="working folder (kubeconfig, logs, etcd data), kept after stop "
        "(default: a temporary folder, removed)",
    )
    up.add_argument("--node-name", default="sloserve-dev-node", help="the fake node's name")
    up.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu the node offers")


def main(args: argparse.Namespace) -> int:
    from sloserve.devcluster.binaries import MissingBinariesError
    from sloserve.devcluster.cluster import DevCluster
    from sloserve.devcluster.controlplane import ControlPlaneError
    from sloserve.devcluster.kubelet import NodeSpec

    try:
        cluster = DevCluster(args.dir, NodeSpec(name=args.node_name, gpus=args.gpus))
    except MissingBinariesError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with cluster as access:
            print(f"API server: {access.server}")
            print(f"kubeconfig: {access.kubeconfig}")
            print(f"  export KUBECONFIG={access.kubeconfig}")
            print(f"logs: {cluster.control_plane.log_dir}")
            print("Ctrl-C stops it.", flush=True)
            while not stop.wait(1.0):
                cluster.check_running()
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("stopped")
    return 0

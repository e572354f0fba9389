"""`sloserve devcluster up`: a dev cluster until Ctrl-C (kubectl and helm work against it)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "devcluster",
        help="a local Kubernetes 1.20 control plane whose node runs pods as local processes",
    )
    actions = p.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start it and print its kubeconfig; Ctrl-C stops it")
    up.add_argument(
        "--dir",
        type=Path,
        help="working folder (kubeconfig, logs, etcd data), kept after stop "
        "(default: a temporary folder, removed)",
    )
    up.add_argument("--node-name", default="sloserve-dev-node", help="the node's name")
    up.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu the node offers")
    up.add_argument(
        "--kubelet",
        choices=("process", "fake"),
        default="process",
        help="process: each pod's containers run as local processes from the installed "
        "package, on a loopback address of their own (the pod IP); fake: pods are only "
        "reported running (default: process)",
    )


def main(args: argparse.Namespace) -> int:
    from sloserve.devcluster.binaries import MissingBinariesError
    from sloserve.devcluster.cluster import DevCluster
    from sloserve.devcluster.controlplane import ControlPlaneError
    from sloserve.devcluster.kubelet import NodeSpec
    from sloserve.devcluster.process_kubelet import ProcessDevCluster, ProcessKubeletSettings

    node = NodeSpec(name=args.node_name, gpus=args.gpus)
    try:
        if args.kubelet == "process":
            pods = ProcessKubeletSettings(workdir=args.dir / "pods" if args.dir else None)
            cluster: DevCluster = ProcessDevCluster(args.dir, node, settings=pods)
        else:
            cluster = DevCluster(args.dir, node)
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
            if isinstance(cluster, ProcessDevCluster) and cluster.kubelet is not None:
                print(f"pods run as processes; their folders and logs: {cluster.kubelet.workdir}")
            print("Ctrl-C stops it.", flush=True)
            while not stop.wait(1.0):
                cluster.check_running()
    except ControlPlaneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("stopped")
    return 0

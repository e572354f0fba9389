"""A fake kubelet: one Node that reports itself Ready, and the pods bound to it reported
Running and Ready, each with a pod IP, without running anything.

That is enough for the real controllers: Deployments become Available, the endpoints
controller publishes the pods' IPs, `helm install --wait` returns.

The seam for a kubelet that does run pods (issue 7: each pod's command as a local process on
its own 127.0.0.x address) is two methods, `start_pod` and `stop_pod`: a subclass overrides
them, and reports what happens with `report_running` and `report_terminated`. The watch,
relist, node registration and deletion handshake stay here.

Mind, for such a subclass: the API server refuses loopback addresses (127.0.0.0/8) in
core/v1 Endpoints, so the endpoints controller cannot publish pods on 127.0.0.x; hence this
fake hands out addresses from 10.88.0.0/16 (never contacted).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sloserve.kubeclient import (
    MERGE_PATCH,
    STRATEGIC_MERGE_PATCH,
    ApiError,
    JsonObject,
    KubeApi,
)

log = logging.getLogger("sloserve.devcluster.kubelet")

NOT_READY_TAINT = "node.kubernetes.io/not-ready"
WATCH_TIMEOUT_S = 300  # the server ends each watch after this; we relist and watch again
MAX_BACKOFF_S = 10.0


@dataclass(frozen=True)
class NodeSpec:
    name: str = "sloserve-dev-node"
    address: str = "127.0.0.1"  # the node's InternalIP, the pods' hostIP
    cpu: str = "16"
    memory: str = "64Gi"
    pods: int = 110
    gpus: int = 8  # nvidia.com/gpu, so GPU pods schedule

    def capacity(self) -> dict[str, str]:
        return {
            "cpu": self.cpu,
            "memory": self.memory,
            "pods": str(self.pods),
            "ephemeral-storage": "100Gi",
            "nvidia.com/gpu": str(self.gpus),
        }


class PodAddresses:
    """Hands out one IP per pod from a network, and takes it back when the pod goes."""

    def __init__(self, network: str = "10.88.0.0/16") -> None:
        self._free = ipaddress.ip_network(network).hosts()
        self._returned: list[str] = []
        self._by_pod: dict[str, str] = {}

    def assign(self, pod_uid: str) -> str:
        if pod_uid not in self._by_pod:
            try:
                ip = self._returned.pop() if self._returned else str(next(self._free))
            except StopIteration:
                raise RuntimeError("no pod address left") from None
            self._by_pod[pod_uid] = ip
        return self._by_pod[pod_uid]

    def release(self, pod_uid: str) -> None:
        ip = self._by_pod.pop(pod_uid, None)
        if ip is not None:
            self._returned.append(ip)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _pod_path(pod: JsonObject) -> str:
    meta = pod["metadata"]
    return f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"


class FakeKubelet:
    def __init__(
        self, api: KubeApi, node: NodeSpec | None = None, addresses: PodAddresses | None = None
    ) -> None:
        self.api = api
        self.node = node or NodeSpec()
        self.addresses = addresses or PodAddresses()
        self._started: dict[str, JsonObject] = {}  # pod uid -> the pod when started

    # The seam: what to do with a pod. Both must return promptly (the pod watch waits for
    # them); long work belongs in tasks they start.

    async def start_pod(self, pod: JsonObject) -> None:
        """A pod was bound to this node. Here: nothing to run, it is Running and Ready."""
        await self.report_running(pod, self.addresses.assign(pod["metadata"]["uid"]))

    async def stop_pod(self, pod: JsonObject) -> None:
        """A started pod is being deleted (or is gone). Here: its address is freed."""
        self.addresses.release(pod["metadata"]["uid"])

    async def close(self) -> None:
        """The kubelet stops: every started pod is stopped."""
        for pod in list(self._started.values()):
            await self.stop_pod(pod)
        self._started.clear()

    # What the seam reports with.

    async def report_running(self, pod: JsonObject, ip: str, *, ready: bool = True) -> None:
        now, status = _now(), "True" if ready else "False"
        containers = pod["spec"]["containers"]
        await self._patch_pod_status(
            pod,
            {
                "phase": "Running",
                "hostIP": self.node.address,
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": now,
                "conditions": [
                    {"type": kind, "status": value, "lastTransitionTime": now}
                    for kind, value in (
                        ("Initialized", "True"),
                        ("PodScheduled", "True"),
                        ("ContainersReady", status),
                        ("Ready", status),
                    )
                ],
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "image": c.get("image", ""),
                        "imageID": "",
                        "ready": ready,
                        "started": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": now}},
                    }
                    for c in containers
                ],
            },
        )

    async def report_terminated(self, pod: JsonObject, exit_code: int) -> None:
        now = _now()
        await self._patch_pod_status(
            pod,
            {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": [
                    {"type": kind, "status": "False", "lastTransitionTime": now}
                    for kind in ("ContainersReady", "Ready")
                ],
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "image": c.get("image", ""),
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": {"exitCode": exit_code, "finishedAt": now}},
                    }
                    for c in pod["spec"]["containers"]
                ],
            },
        )

    async def _patch_pod_status(self, pod: JsonObject, status: JsonObject) -> None:
        # Strategic merge: conditions merge by type, as the real kubelet's do.
        await self.api.request(
            "PATCH",
            _pod_path(pod) + "/status",
            {"status": status},
            content_type=STRATEGIC_MERGE_PATCH,
        )

    # The node.

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Registers the node, then follows its pods until cancelled."""
        await self.register_node()
        if on_ready is not None:
            on_ready()
        await self._follow_pods()

    async def register_node(self) -> None:
        name = self.node.name
        try:
            await self.api.request(
                "POST",
                "/api/v1/nodes",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": {
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                        },
                    },
                },
            )
        except ApiError as error:
            if error.status != 409:  # already registered: take it over
                raise
        await self.api.request(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            {"status": self._node_status()},
            content_type=STRATEGIC_MERGE_PATCH,
        )
        await self._remove_not_ready_taint()

    def _node_status(self) -> JsonObject:
        now = _now()
        conditions = [
            {
                "type": kind,
                "status": "False",
                "reason": f"KubeletHasNo{kind}",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
            for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "sloserve fake kubelet",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        )
        return {
            "capacity": self.node.capacity(),
            "allocatable": self.node.capacity(),
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": self.node.address},
                {"type": "Hostname", "address": self.node.name},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.20.2",
                "kubeProxyVersion": "v1.20.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "sloserve-fake://0",
                "osImage": "sloserve devcluster",
                "kernelVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    async def _remove_not_ready_taint(self) -> None:
        # Admission puts it on every new node; the node lifecycle controller, which would take
        # it off once Ready, does not run here.
        path = f"/api/v1/nodes/{self.node.name}"
        for _ in range(5):
            node = await self.api.request("GET", path)
            taints = node["spec"].get("taints", [])
            kept = [t for t in taints if t["key"] != NOT_READY_TAINT]
            if kept == taints:
                return
            patch = {
                "metadata": {"resourceVersion": node["metadata"]["resourceVersion"]},
                "spec": {"taints": kept},
            }
            try:
                await self.api.request("PATCH", path, patch, content_type=MERGE_PATCH)
                return
            except ApiError as error:
                if error.status != 409:  # someone else wrote the node meanwhile: read again
                    raise
        raise RuntimeError(f"could not remove the {NOT_READY_TAINT} taint")

    # The pods.

    async def _follow_pods(self) -> None:
        backoff = 0.5
        while True:
            try:
                version = await self._relist()
                params = {
                    "fieldSelector": f"spec.nodeName={self.node.name}",
                    "resourceVersion": version,
                }
                pods = self.api.watch("/api/v1/pods", params, timeout_s=WATCH_TIMEOUT_S)
                async for kind, pod in pods:
                    await self._on_pod(kind, pod)
                    backoff = 0.5
            except (ApiError, OSError) as error:  # OSError: from a subclass's start_pod
                if isinstance(error, ApiError) and error.status == 410:
                    continue  # Gone: our version is too old; relist now
                log.warning("pod watch failed (%s); retrying in %.1f s", error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _relist(self) -> str:
        """Brings our pods in line with the server's list; returns its resource version."""
        listing = await self.api.request(
            "GET", "/api/v1/pods", params={"fieldSelector": f"spec.nodeName={self.node.name}"}
        )
        present = {pod["metadata"]["uid"] for pod in listing["items"]}
        for uid, pod in list(self._started.items()):
            if uid not in present:
                await self._on_pod("DELETED", pod)
        for pod in listing["items"]:
            await self._on_pod("ADDED", pod)
        return str(listing["metadata"]["resourceVersion"])

    async def _on_pod(self, kind: str, pod: JsonObject) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        try:
            if kind == "DELETED" or meta.get("deletionTimestamp"):
                started = self._started.pop(uid, None)
                if started is not None:
                    await self.stop_pod(pod)
                if kind != "DELETED":
                    await self._confirm_deletion(pod)
            elif uid not in self._started and pod["status"].get("phase") not in (
                "Succeeded",
                "Failed",
            ):
                self._started[uid] = pod
                await self.start_pod(pod)
        except ApiError as error:  # the pod changed or went meanwhile; the next event tells
            log.info("pod %s/%s: %s", meta["namespace"], meta["name"], error)

    async def _confirm_deletion(self, pod: JsonObject) -> None:
        # A deleted pod stays (Terminating) until its kubelet says its containers are gone;
        # the real kubelet says so by deleting it with no grace period. The uid precondition
        # keeps us from deleting a new pod of the same name.
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": pod["metadata"]["uid"]},
        }
        try:
            await self.api.request("DELETE", _pod_path(pod), body)
        except ApiError as error:
            if error.status not in (404, 409):
                raise

"""Replicas from Kubernetes: the ready endpoints of a (headless) Service, watched.

What is watched: the Service's EndpointSlices (discovery.k8s.io/v1; v1beta1 on clusters
older than 1.21, such as the tests' 1.20 API server), not core/v1 Endpoints, because:
- the API server refuses loopback addresses in Endpoints but not in EndpointSlices, and the
  dev cluster's process pods (one 127.0.0.x address each) are only visible through slices;
- Endpoints are deprecated since Kubernetes 1.33 and cap at 1000 addresses.
A Service may have several slices; the gateway routes to the union of their ready
endpoints. RBAC: the gateway's account needs get, list and watch on
`endpointslices.discovery.k8s.io` in the Service's namespace.

How the API is reached: $KUBECONFIG when set (development, tests), else the pod's service
account (in cluster), else ~/.kube/config (sloserve/kubeclient.py: `ApiAccess.load`).

Failures: a dropped watch is resumed by listing again, after a backoff when the API server
cannot be reached; a 410 Gone (our resource version is too old) relists at once. While the
API server is unreachable the last set stands: the replica pool's own load watches decide
which of them are healthy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from sloserve.errors import FieldError
from sloserve.kubeclient import ApiAccess, ApiError, ConfigError, JsonObject, KubeApi, Resource

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Newest first: 1.20 (the tests' API server) serves EndpointSlices only as v1beta1.
ENDPOINT_SLICES = (
    Resource("discovery.k8s.io/v1", "endpointslices"),
    Resource("discovery.k8s.io/v1beta1", "endpointslices"),
)
WATCH_TIMEOUT_S = 300  # the server ends each watch after this; we list and watch again
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0


def parse_service(service: str) -> tuple[str, str]:
    """NAMESPACE/NAME -> (namespace, name)."""
    namespace, sep, name = service.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise FieldError("k8s_service", f"{service!r} is not NAMESPACE/NAME")
    return namespace, name


def ready_endpoints(endpoint_slice: JsonObject, port: str) -> frozenset[str]:
    """HOST:PORT of each ready address in one EndpointSlice (v1 or v1beta1).

    `port` is a port name, looked up in the slice, or a number, used as is (so a Service
    that names no ports still works).
    """
    if port.isdigit():
        number: int | None = int(port)
    else:
        number = next(
            (p.get("port") for p in endpoint_slice.get("ports") or [] if p.get("name") == port),
            None,
        )
    endpoints = endpoint_slice.get("endpoints") or []
    if number is None:
        if endpoints:
            name = endpoint_slice.get("metadata", {}).get("name")
            log.warning("EndpointSlice %s has no port named %r; its endpoints are left out",
                        name, port)  # fmt: skip
        return frozenset()
    found = set()
    for endpoint in endpoints:
        # Unknown readiness (no field) counts as ready, as the API documents.
        if (endpoint.get("conditions") or {}).get("ready") is False:
            continue
        for address in endpoint.get("addresses") or []:
            host = f"[{address}]" if ":" in address else address
            found.add(f"{host}:{number}")
    return frozenset(found)


async def list_endpoint_slices(
    api: KubeApi, namespace: str, service: str, versions: Sequence[Resource] = ENDPOINT_SLICES
) -> tuple[Resource, JsonObject]:
    """The Service's EndpointSlices as a list object, from the first of `versions` that the
    server serves (a version it lacks answers 404), with that version."""
    params = {"labelSelector": f"{SERVICE_NAME_LABEL}={service}"}
    for resource in versions[:-1]:
        try:
            return resource, await api.request("GET", resource.path(namespace), params=params)
        except ApiError as error:
            if error.status != 404:
                raise
    last = versions[-1]
    return last, await api.request("GET", last.path(namespace), params=params)


class KubernetesDiscovery:
    """The ready endpoints of Service `NAMESPACE/NAME` on port `port` (a name or number)."""

    def __init__(self, service: str, port: str = "grpc", access: ApiAccess | None = None) -> None:
        self.namespace, self.name = parse_service(service)
        if not port:
            raise FieldError("k8s_port", "give a port name or number")
        self.port = port
        try:
            self._access = access or ApiAccess.load()
        except ConfigError as error:
            raise FieldError("k8s_service", str(error)) from None
        # The EndpointSlice versions still to try, the one in use first: once a version is
        # found missing, it is not asked for again.
        self._versions: Sequence[Resource] = ENDPOINT_SLICES

    async def watch(self) -> AsyncIterator[frozenset[str]]:
        slices: dict[str, frozenset[str]] = {}  # slice name -> its ready endpoints
        last: frozenset[str] | None = None
        backoff = MIN_BACKOFF_S
        async with KubeApi(self._access) as api:
            while True:
                try:
                    version = await self._list(api, slices)
                    backoff = MIN_BACKOFF_S
                    if (current := _union(slices)) != last:
                        last = current
                        yield current
                    params = {
                        "labelSelector": f"{SERVICE_NAME_LABEL}={self.name}",
                        "resourceVersion": version,
                    }
                    path = self._versions[0].path(self.namespace)
                    async for kind, endpoint_slice in api.watch(
                        path, params, timeout_s=WATCH_TIMEOUT_S
                    ):
                        name = endpoint_slice["metadata"]["name"]
                        if kind == "DELETED":
                            slices.pop(name, None)
                        else:
                            slices[name] = ready_endpoints(endpoint_slice, self.port)
                        if (current := _union(slices)) != last:
                            last = current
                            yield current
                    continue  # the server ended the watch on time: list and watch again
                except ApiError as error:
                    if error.status == 410:  # our resource version is too old: list at once
                        continue
                    log.warning(
                        "watching Service %s/%s failed (%s); retrying in %.1f s",
                        self.namespace, self.name, error, backoff,
                    )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _list(self, api: KubeApi, slices: dict[str, frozenset[str]]) -> str:
        """Replaces `slices` with the server's; returns the list's resource version."""
        resource, listing = await list_endpoint_slices(
            api, self.namespace, self.name, self._versions
        )
        if resource != self._versions[0]:
            log.info("EndpointSlices: using %s", resource.api_version)
            self._versions = self._versions[self._versions.index(resource) :]
        slices.clear()
        for item in listing.get("items") or []:
            slices[item["metadata"]["name"]] = ready_endpoints(item, self.port)
        return str(listing["metadata"]["resourceVersion"])


def _union(slices: dict[str, frozenset[str]]) -> frozenset[str]:
    return frozenset[str]().union(*slices.values())

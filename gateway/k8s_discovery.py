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
account (in cluster), else ~/.kube/config. The in-cluster path needs nothing beyond aiohttp;
kubeconfig files are read with the `kubernetes` package (exec plugins, inline certificates,
contexts), imported only then.

Failures: a dropped watch is resumed by listing again, after a backoff when the API server
cannot be reached; a 410 Gone (our resource version is too old) relists at once. While the
API server is unreachable the last set stands: the replica pool's own load watches decide
which of them are healthy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sloserve.errors import FieldError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
API_VERSIONS = ("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1")  # newest first
WATCH_TIMEOUT_S = 300  # the server ends each watch after this; we list and watch again
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0

JsonObject = dict[str, Any]


class WatchExpired(Exception):
    """410 Gone: the resource version we watch from is no longer kept; list again."""


class ApiStatusError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(frozen=True)
class ApiAccess:
    """Where the API server is and how to authenticate to it."""

    server: str  # https://HOST:PORT
    token: Callable[[], str | None]  # called per connection: tokens rotate
    ca_file: str | None = None
    client_cert: tuple[str, str] | None = None  # certificate file, key file
    verify: bool = True

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None:
            context.load_cert_chain(*self.client_cert)
        return context

    def headers(self) -> dict[str, str]:
        token = self.token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    @classmethod
    def load(cls) -> ApiAccess:
        """$KUBECONFIG, else the in-cluster service account, else ~/.kube/config."""
        if kubeconfig := os.environ.get("KUBECONFIG"):
            # Only the first file of a KUBECONFIG list is read.
            return cls.from_kubeconfig(Path(kubeconfig.split(os.pathsep)[0]))
        in_cluster = cls.in_cluster()
        if in_cluster is not None:
            return in_cluster
        return cls.from_kubeconfig(Path.home() / ".kube" / "config")

    @classmethod
    def in_cluster(cls, directory: Path = SERVICE_ACCOUNT_DIR) -> ApiAccess | None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token_file = directory / "token"
        if not host or not token_file.exists():
            return None
        if ":" in host:  # IPv6
            host = f"[{host}]"
        # The kubelet rewrites the projected token before it expires: read it per connection.
        return cls(
            server=f"https://{host}:{port}",
            token=lambda: token_file.read_text().strip(),
            ca_file=str(directory / "ca.crt"),
        )

    @classmethod
    def from_kubeconfig(cls, path: Path) -> ApiAccess:
        try:
            from kubernetes import client, config
        except ImportError as missing:
            raise FieldError(
                "k8s_service",
                f"reading {path} needs the `kubernetes` package ({missing}); in a pod, the "
                "service account is used instead",
            ) from None
        configuration = client.Configuration()
        try:
            config.load_kube_config(
                config_file=str(path), client_configuration=configuration, persist_config=False
            )
        except (config.ConfigException, OSError) as error:
            raise FieldError(
                "k8s_service", f"no Kubernetes API access from {path}: {error}"
            ) from None

        def token() -> str | None:
            # Refreshes exec-plugin and OIDC tokens that have expired.
            if configuration.refresh_api_key_hook is not None:
                configuration.refresh_api_key_hook(configuration)
            bearer = configuration.api_key.get("BearerToken")
            return None if bearer is None else str(bearer).removeprefix("Bearer ")

        cert, key = configuration.cert_file, configuration.key_file
        return cls(
            server=str(configuration.host),
            token=token,
            ca_file=configuration.ssl_ca_cert,
            client_cert=(cert, key) if cert and key else None,
            verify=bool(configuration.verify_ssl),
        )


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


class KubernetesDiscovery:
    """The ready endpoints of Service `NAMESPACE/NAME` on port `port` (a name or number)."""

    def __init__(self, service: str, port: str = "grpc", access: ApiAccess | None = None) -> None:
        self.namespace, self.name = parse_service(service)
        if not port:
            raise FieldError("k8s_port", "give a port name or number")
        self.port = port
        self._access = access or ApiAccess.load()
        self._api_version = API_VERSIONS[0]

    def _path(self) -> str:
        return f"/apis/{self._api_version}/namespaces/{self.namespace}/endpointslices"

    async def watch(self) -> AsyncIterator[frozenset[str]]:
        slices: dict[str, frozenset[str]] = {}  # slice name -> its ready endpoints
        last: frozenset[str] | None = None
        backoff = MIN_BACKOFF_S
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    version = await self._list(session, slices)
                    backoff = MIN_BACKOFF_S
                    if (current := _union(slices)) != last:
                        last = current
                        yield current
                    async for kind, endpoint_slice in self._watch(session, version):
                        name = endpoint_slice["metadata"]["name"]
                        if kind == "DELETED":
                            slices.pop(name, None)
                        else:
                            slices[name] = ready_endpoints(endpoint_slice, self.port)
                        if (current := _union(slices)) != last:
                            last = current
                            yield current
                    continue  # the server ended the watch on time: list and watch again
                except WatchExpired:
                    continue
                except (aiohttp.ClientError, ApiStatusError, OSError, ValueError) as error:
                    log.warning(
                        "watching Service %s/%s failed (%s); retrying in %.1f s",
                        self.namespace, self.name, str(error) or type(error).__name__, backoff,
                    )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _request(
        self, session: aiohttp.ClientSession, params: dict[str, str], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        return await session.get(
            self._access.server.rstrip("/") + self._path(),
            params={"labelSelector": f"{SERVICE_NAME_LABEL}={self.name}", **params},
            headers={"Accept": "application/json", **self._access.headers()},
            ssl=self._access.ssl_context(),
            timeout=timeout,
        )

    async def _list(self, session: aiohttp.ClientSession, slices: dict[str, frozenset[str]]) -> str:
        """Replaces `slices` with the server's; returns the list's resource version."""
        timeout = aiohttp.ClientTimeout(total=30)
        while True:
            async with await self._request(session, {}, timeout) as response:
                if response.status == 404 and self._api_version != API_VERSIONS[-1]:
                    # An older cluster without discovery.k8s.io/v1: use the next version.
                    self._api_version = API_VERSIONS[API_VERSIONS.index(self._api_version) + 1]
                    log.info("EndpointSlices: using %s", self._api_version)
                    continue
                listing = await _json(response)
            break
        slices.clear()
        for item in listing.get("items") or []:
            slices[item["metadata"]["name"]] = ready_endpoints(item, self.port)
        return str(listing["metadata"]["resourceVersion"])

    async def _watch(
        self, session: aiohttp.ClientSession, version: str
    ) -> AsyncIterator[tuple[str, JsonObject]]:
        """Yields (ADDED|MODIFIED|DELETED, slice) until the server ends the watch."""
        params = {
            "watch": "true",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
        }
        # No total limit: a watch lasts minutes. Silence past the server's own timeout means
        # the connection is dead.
        timeout = aiohttp.ClientTimeout(total=None, sock_read=WATCH_TIMEOUT_S + 30)
        async with await self._request(session, params, timeout) as response:
            if response.status >= 400:
                await _json(response)  # raises with the server's message
            # One JSON event per line; split by hand, as aiohttp's line reader has a length
            # limit that a large slice could pass.
            pending = b""
            async for chunk in response.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            raise WatchExpired(obj.get("message", ""))
                        raise ApiStatusError(int(obj.get("code", 500)), obj.get("message", ""))
                    if kind != "BOOKMARK":  # a bookmark carries only a resource version
                        yield kind, obj


def _union(slices: dict[str, frozenset[str]]) -> frozenset[str]:
    return frozenset[str]().union(*slices.values())


async def _json(response: aiohttp.ClientResponse) -> JsonObject:
    text = await response.text()
    if response.status == 410:
        raise WatchExpired(text)
    if response.status >= 400:
        try:
            message = str(json.loads(text).get("message", text))
        except (ValueError, AttributeError):
            message = text
        raise ApiStatusError(response.status, message)
    result: JsonObject = json.loads(text)
    return result

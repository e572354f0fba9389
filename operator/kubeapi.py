"""A small asynchronous Kubernetes API client for the operator's own calls.

kopf watches and patches the SLOServices; children, /scale and /status go through this client,
on the same event loop and with the same credentials kopf logged in with (`from_connection`).
It speaks plain JSON and merge patches only, which every API server version here understands.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Resource:
    api_version: str  # "v1", "apps/v1", "sloserve.io/v1alpha1"
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [prefix]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if sub:
            parts.append(sub)
        return "/".join(parts)


SLOSERVICES = Resource("sloserve.io/v1alpha1", "sloservices")
# Newest first: 1.20 serves EndpointSlices only as v1beta1.
ENDPOINT_SLICES = (
    Resource("discovery.k8s.io/v1", "endpointslices"),
    Resource("discovery.k8s.io/v1beta1", "endpointslices"),
)

# The kinds the operator creates, by (apiVersion, kind).
KINDS: dict[tuple[str, str], Resource] = {
    ("v1", "ConfigMap"): Resource("v1", "configmaps"),
    ("v1", "Service"): Resource("v1", "services"),
    ("v1", "ServiceAccount"): Resource("v1", "serviceaccounts"),
    ("apps/v1", "Deployment"): Resource("apps/v1", "deployments"),
    ("rbac.authorization.k8s.io/v1", "Role"): Resource("rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): Resource(
        "rbac.authorization.k8s.io/v1", "rolebindings"
    ),
    ("policy/v1", "PodDisruptionBudget"): Resource("policy/v1", "poddisruptionbudgets"),
    ("policy/v1beta1", "PodDisruptionBudget"): Resource("policy/v1beta1", "poddisruptionbudgets"),
}


def resource_of(manifest: Mapping[str, Any]) -> Resource:
    return KINDS[(str(manifest["apiVersion"]), str(manifest["kind"]))]


class ApiError(Exception):
    """A non-2xx answer; `reason` is the Status reason (NotFound, Conflict, Forbidden...)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @property
    def retryable(self) -> bool:
        """Worth trying again later: conflicts, throttling and server-side failures."""
        return self.status in (409, 429) or self.status >= 500


@dataclass(frozen=True)
class Credentials:
    """What a connection needs; filled from kopf's ConnectionInfo (`from_connection`)."""

    server: str
    token: str | None = None
    insecure: bool = False
    ca_path: str | None = None
    ca_data: str | None = None  # base64 PEM, as kubeconfig's certificate-authority-data
    certificate_path: str | None = None
    private_key_path: str | None = None

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            return False  # aiohttp: skip verification
        context = ssl.create_default_context(cafile=self.ca_path)
        if self.ca_data:
            context.load_verify_locations(cadata=base64.b64decode(self.ca_data).decode())
        if self.certificate_path:
            context.load_cert_chain(self.certificate_path, self.private_key_path)
        return context


def credentials_of(info: Any) -> Credentials:
    """Credentials from a kopf ConnectionInfo (typed loosely: kopf is imported lazily)."""

    def text(value: Any) -> str | None:
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    return Credentials(
        server=str(info.server),
        token=info.token,
        insecure=bool(info.insecure),
        ca_path=text(info.ca_path),
        ca_data=text(info.ca_data),
        certificate_path=text(info.certificate_path),
        private_key_path=text(info.private_key_path),
    )


class KubeApi:
    def __init__(self, credentials: Credentials, timeout_s: float = 30.0) -> None:
        headers = {"Accept": "application/json"}
        if credentials.token:
            headers["Authorization"] = f"Bearer {credentials.token}"
        self.server = credentials.server.rstrip("/")
        self._ssl = credentials.ssl_context()
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
        )

    async def close(self) -> None:
        await self._session.close()

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        url = self.server + path + (f"?{urlencode(query)}" if query else "")
        kwargs: dict[str, Any] = {"ssl": self._ssl}
        if body is not None:
            kwargs["json"] = body
            kwargs["headers"] = {"Content-Type": content_type}
        try:
            async with self._session.request(method, url, **kwargs) as response:
                text = await response.text()
                data = _json_or_none(text)
                if response.status >= 400:
                    reason = str(data.get("reason", "")) if data else ""
                    message = str(data.get("message", text)) if data else text
                    raise ApiError(response.status, reason or response.reason or "", message)
                return data or {}
        except aiohttp.ClientError as error:
            raise ApiError(503, "Unreachable", f"{method} {path}: {error}") from error

    async def get(
        self, resource: Resource, namespace: str | None, name: str, sub: str = ""
    ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return await self._call("GET", resource.path(namespace, name, sub))
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def list(
        self, resource: Resource, namespace: str | None, label_selector: str = ""
    ) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        data = await self._call("GET", resource.path(namespace), query=query)
        return list(data.get("items") or [])

    async def create(
        self, resource: Resource, namespace: str | None, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        return await self._call("POST", resource.path(namespace), body=body)

    async def merge_patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        sub: str = "",
    ) -> dict[str, Any]:
        return await self._call(
            "PATCH", resource.path(namespace, name, sub), body=patch, content_type=MERGE_PATCH
        )

    async def serves(self, api_version: str) -> bool:
        """Whether the server serves a group version (policy/v1 only from 1.21)."""
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        try:
            await self._call("GET", path)
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True


def _json_or_none(text: str) -> dict[str, Any] | None:
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None

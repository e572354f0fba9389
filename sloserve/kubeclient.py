"""One small typed async client of the Kubernetes REST API (aiohttp), shared by the operator,
the gateway's Service discovery and the dev cluster's kubelets.

It speaks plain JSON objects (dicts), and JSON, merge and strategic-merge patches, which every
API server version here understands; the typed `kubernetes` models would be a burden where
objects are written as dicts. Every failure of a call, the server's or the network's, is an
ApiError carrying an HTTP status, so callers handle one exception type.

Where the API server is and how to authenticate to it is an ApiAccess: given directly (the
dev cluster, kopf's login), or loaded from $KUBECONFIG, the pod's service account, or
~/.kube/config (`ApiAccess.load`).
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

JsonObject = dict[str, Any]
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REQUEST_TIMEOUT_S = 30.0
# A watch with a server-side timeout that has been silent this long past it is a dead
# connection, not a quiet resource.
WATCH_GRACE_S = 30


class ApiError(Exception):
    """A failed call: the server's status code and Status reason (NotFound, Conflict,
    Gone...) and message; 503 "Unreachable" when the server could not be reached."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @property
    def retryable(self) -> bool:
        """Worth trying again later: conflicts, throttling and server-side failures."""
        return self.status in (409, 429) or self.status >= 500


class ConfigError(Exception):
    """No API access could be configured (a bad or missing kubeconfig)."""


@dataclass(frozen=True)
class Resource:
    """A kind of object by API version and plural, for building its REST paths."""

    api_version: str  # "v1", "apps/v1", "sloserve.io/v1alpha1"
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        parts = [group_version_path(self.api_version)]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if sub:
            parts.append(sub)
        return "/".join(parts)


def group_version_path(api_version: str) -> str:
    """The core group lives under /api, every other group under /apis."""
    return "/api/v1" if api_version == "v1" else f"/apis/{api_version}"


@dataclass(frozen=True)
class ApiAccess:
    """Where the API server is and how to authenticate to it."""

    server: str  # https://HOST:PORT (http:// for test servers)
    # A bearer token, or a function giving one: called per request, as tokens rotate.
    token: str | Callable[[], str | None] | None = None
    ca_file: str | Path | None = None
    ca_data: str | None = None  # PEM, where the CA comes inline
    client_cert: tuple[str, str | None] | None = None  # certificate file, key file
    verify: bool = True

    def bearer(self) -> str | None:
        return self.token() if callable(self.token) else self.token

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.ca_data:
            context.load_verify_locations(cadata=self.ca_data)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if self.client_cert is not None:
            context.load_cert_chain(*self.client_cert)
        return context

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
        """The pod's service account, or None outside a pod."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        token_file = directory / "token"
        if not host or not token_file.exists():
            return None
        if ":" in host:  # IPv6
            host = f"[{host}]"
        # The kubelet rewrites the projected token before it expires: read it per request.
        return cls(
            server=f"https://{host}:{port}",
            token=lambda: token_file.read_text().strip(),
            ca_file=str(directory / "ca.crt"),
        )

    @classmethod
    def from_kubeconfig(cls, path: Path) -> ApiAccess:
        """Read with the `kubernetes` package (exec plugins, inline certificates, contexts),
        imported only here: in a pod the service account needs nothing beyond aiohttp."""
        try:
            from kubernetes import client, config
        except ImportError as missing:
            raise ConfigError(
                f"reading {path} needs the `kubernetes` package ({missing}); in a pod, the "
                "service account is used instead"
            ) from None
        configuration = client.Configuration()
        try:
            config.load_kube_config(
                config_file=str(path), client_configuration=configuration, persist_config=False
            )
        except (config.ConfigException, OSError) as error:
            raise ConfigError(f"no Kubernetes API access from {path}: {error}") from None

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


class KubeApi:
    """One aiohttp session to the API server. Close it with `close()` or `async with`.

    The session and TLS context are made at the first call, so a KubeApi can be built
    anywhere (a session belongs to the event loop it was made on), and a missing CA file
    is a failed call (ApiError), retried like any other, rather than a crash at start.
    """

    def __init__(self, access: ApiAccess, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.access = access
        self._server = access.server.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None

    async def __aenter__(self) -> KubeApi:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _connect(self) -> tuple[aiohttp.ClientSession, ssl.SSLContext]:
        if self._ssl is None:
            self._ssl = self.access.ssl_context()
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session, self._ssl

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": JSON}
        if token := self.access.bearer():
            headers["Authorization"] = f"Bearer {token}"
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = JSON,
    ) -> JsonObject:
        """The answer's JSON object ({} when empty). `content_type` says what `body` is: a
        whole object, or one of the patch types."""
        try:
            session, context = self._connect()
            async with session.request(
                method,
                self._server + path,
                data=None if body is None else json.dumps(body),
                params=params,
                headers=self._headers(None if body is None else content_type),
                ssl=context,
            ) as response:
                status, reason, text = response.status, response.reason, await response.text()
        except (aiohttp.ClientError, OSError) as error:  # OSError: timeouts, TLS files
            raise _unreachable(method, path, error) from error
        if status >= 400:
            raise _status_error(status, reason, text)
        return _object(text) if text else {}

    async def get(self, path: str) -> JsonObject | None:
        """The object, or None when there is none (404)."""
        try:
            return await self.request("GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    async def list(self, path: str, label_selector: str = "") -> list[JsonObject]:
        params = {"labelSelector": label_selector} if label_selector else None
        return list((await self.request("GET", path, params=params)).get("items") or [])

    async def create(self, path: str, body: Mapping[str, Any]) -> JsonObject:
        return await self.request("POST", path, body)

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> JsonObject:
        return await self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    async def serves(self, api_version: str) -> bool:
        """Whether the server serves a group version (policy/v1 only from 1.21, say)."""
        return await self.get(group_version_path(api_version)) is not None

    async def watch(
        self, path: str, params: Mapping[str, str] | None = None, *, timeout_s: int | None = None
    ) -> AsyncIterator[tuple[str, JsonObject]]:
        """Yields (ADDED|MODIFIED|DELETED, object) until the server ends the watch (after
        `timeout_s`, when given). Pass the list's `resourceVersion` in `params` to miss
        nothing. An ERROR event raises ApiError with its code: 410 Gone says that version is
        no longer kept, so list again."""
        query = {**(params or {}), "watch": "true"}
        if timeout_s is not None:
            query["timeoutSeconds"] = str(timeout_s)
        # No total limit: a watch lasts minutes.
        read_s = None if timeout_s is None else timeout_s + WATCH_GRACE_S
        timeout = aiohttp.ClientTimeout(total=None, sock_read=read_s)
        try:
            session, context = self._connect()
            async with session.get(
                self._server + path,
                params=query,
                headers=self._headers(),
                ssl=context,
                timeout=timeout,
            ) as response:
                if response.status >= 400:
                    text = await response.text()
                    raise _status_error(response.status, response.reason, text)
                # One JSON event per line. Split lines ourselves: aiohttp's line reader has a
                # length limit that a large object (managed fields and all) can pass.
                pending = b""
                async for chunk in response.content.iter_any():
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.strip() and (event := _event(_object(line))) is not None:
                            yield event
        except (aiohttp.ClientError, OSError) as error:  # a dropped or silent connection
            raise _unreachable("WATCH", path, error) from error


def _event(event: JsonObject) -> tuple[str, JsonObject] | None:
    kind, obj = str(event.get("type")), event.get("object") or {}
    if kind == "ERROR":  # obj is a Status
        code = int(obj.get("code") or 500)
        raise ApiError(code, str(obj.get("reason", "")), str(obj.get("message", "")))
    if kind == "BOOKMARK":  # only a resource version (not asked for, but allowed to come)
        return None
    return kind, obj


def _object(text: str | bytes) -> JsonObject:
    """A JSON object, or ApiError 502: a proxy's HTML page is a server failure too."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ApiError(502, "BadResponse", f"not a JSON object: {text[:200]!r}")
    return value


def _status_error(status: int, reason: str | None, text: str) -> ApiError:
    """The server's Status (reason and message) when the answer is one, else its text."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return ApiError(status, reason or "", text)
    return ApiError(status, str(body.get("reason") or reason or ""), str(body.get("message", text)))


def _unreachable(method: str, path: str, error: BaseException) -> ApiError:
    return ApiError(503, "Unreachable", f"{method} {path}: {error or type(error).__name__}")

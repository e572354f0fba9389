"""A small typed async client of the Kubernetes REST API (aiohttp), enough for the fake
kubelet: requests on JSON objects, and watches as a stream of events."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

JsonObject = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class KubeApi:
    """One aiohttp session to the API server; use as an async context manager."""

    def __init__(self, server: str, token: str, ca_file: Path) -> None:
        self._server = server.rstrip("/")
        self._ca_file = ca_file
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KubeApi:
        self._session = aiohttp.ClientSession(headers=self._headers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def server(self) -> str:
        """https://HOST:PORT of the API server (for kubeconfigs handed to pods)."""
        return self._server

    @property
    def ca_file(self) -> Path:
        """The API server's certificate, which clients trust."""
        return self._ca_file

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("KubeApi is used outside its `async with`")
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JsonObject:
        data = None if body is None else json.dumps(body)
        headers = {} if body is None else {"Content-Type": content_type}
        async with self.session.request(
            method, self._server + path, data=data, headers=headers, params=params, ssl=self._ssl
        ) as response:
            text = await response.text()
            if response.status >= 400:
                raise ApiError(response.status, _message(text))
            result: JsonObject = json.loads(text) if text else {}
            return result

    async def watch(
        self, path: str, params: Mapping[str, str]
    ) -> AsyncIterator[tuple[str, JsonObject]]:
        """Yields (event type, object) until the server ends the watch. An ERROR event (410
        Gone when the resource version is too old) raises ApiError with its code."""
        query = {**params, "watch": "true", "allowWatchBookmarks": "true"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.session.get(
            self._server + path, params=query, ssl=self._ssl, timeout=timeout
        ) as response:
            if response.status >= 400:
                raise ApiError(response.status, _message(await response.text()))
            # One JSON event per line. Split lines ourselves: aiohttp's line reader has a
            # length limit that a large object (managed fields and all) can pass.
            pending = b""
            async for chunk in response.content.iter_any():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield _event(json.loads(line))


def _event(event: JsonObject) -> tuple[str, JsonObject]:
    kind, obj = str(event["type"]), event["object"]
    if kind == "ERROR":
        raise ApiError(int(obj.get("code", 500)), str(obj.get("message", "")))
    return kind, obj


def _message(text: str) -> str:
    try:
        return str(json.loads(text).get("message", text))
    except (ValueError, AttributeError):
        return text

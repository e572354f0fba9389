"""A synchronous front to the shared KubeApi (sloserve/kubeclient.py) for tests and scripts
that work on plain JSON objects (the typed `kubernetes` models are a burden where the objects
are written as dicts). Each call runs on an event loop, and a session, of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

from sloserve.kubeclient import JSON, ApiAccess, ApiError, JsonObject, KubeApi

__all__ = ["ApiError", "SyncKubeApi"]

T = TypeVar("T")


class SyncKubeApi:
    def __init__(self, server: str, token: str, ca_file: Path) -> None:
        self.server, self.token, self.ca_file = server, token, ca_file

    def _run(self, call: Callable[[KubeApi], Awaitable[T]]) -> T:
        async def run() -> T:
            async with KubeApi(ApiAccess(self.server, self.token, self.ca_file)) as api:
                return await call(api)

        return asyncio.run(run())

    def request(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = JSON,
    ) -> JsonObject:
        return self._run(
            lambda api: api.request(method, path, body, params=params, content_type=content_type)
        )

    def get(self, path: str) -> JsonObject | None:
        """The object, or None when there is none (404)."""
        return self._run(lambda api: api.get(path))

    def create(self, path: str, body: JsonObject) -> JsonObject:
        return self._run(lambda api: api.create(path, body))

    def delete(self, path: str) -> None:
        """Deletes the object; one already gone is fine."""
        try:
            self.request("DELETE", path)
        except ApiError as error:
            if error.status != 404:
                raise

    def items(self, path: str, selector: str | None = None) -> list[JsonObject]:
        return self._run(lambda api: api.list(path, selector or ""))

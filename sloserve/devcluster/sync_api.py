"""A synchronous front to KubeApi for tests and scripts that work on plain JSON objects (the
typed `kubernetes` models are a burden where the objects are written as dicts)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from sloserve.devcluster.kubeapi import ApiError, JsonObject, KubeApi

__all__ = ["ApiError", "SyncKubeApi"]


class SyncKubeApi:
    def __init__(self, server: str, token: str, ca_file: Path) -> None:
        self.server, self.token, self.ca_file = server, token, ca_file

    def request(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JsonObject:
        async def call() -> JsonObject:
            async with KubeApi(self.server, self.token, self.ca_file) as api:
                return await api.request(
                    method, path, body, params=params, content_type=content_type
                )

        return asyncio.run(call())

    def get(self, path: str) -> JsonObject | None:
        """The object, or None when there is none (404)."""
        try:
            return self.request("GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise

    def create(self, path: str, body: JsonObject) -> JsonObject:
        return self.request("POST", path, body)

    def delete(self, path: str) -> None:
        try:
            self.request("DELETE", path)
        except ApiError as error:
            if error.status != 404:
                raise

    def items(self, path: str, selector: str | None = None) -> list[JsonObject]:
        params = {"labelSelector": selector} if selector else None
        return list(self.request("GET", path, params=params).get("items") or [])

"""The shared Kubernetes client (sloserve/kubeclient.py) against a small aiohttp server that
answers as an API server would, for what the real one (tests/test_*_kube*.py) cannot be made
to do on demand: ERROR events, a very long event line, a silent watch, a rotated token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest
import pytest_asyncio

from sloserve import kubeclient
from sloserve.kubeclient import (
    MERGE_PATCH,
    ApiAccess,
    ApiError,
    ConfigError,
    KubeApi,
    Resource,
)

PODS = "/api/v1/namespaces/ns/pods"


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "status": "Failure", "code": code, "reason": reason,
            "message": message}  # fmt: skip


class FakeApiServer:
    """Records each request and answers by path; a watch streams `watch_lines`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.watch_lines: list[bytes] = []
        self.watch_silent = False
        self.closing = asyncio.Event()  # ends a silent watch
        self.app = aiohttp.web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        body = await request.text()
        self.requests.append({
            "method": request.method, "path": request.path, "query": dict(request.query),
            "content_type": request.headers.get("Content-Type"),
            "authorization": request.headers.get("Authorization"),
            "body": json.loads(body) if body else None,
        })  # fmt: skip
        if request.query.get("watch") == "true":
            return await self._watch(request)
        if request.path == f"{PODS}/missing":
            return aiohttp.web.json_response(status(404, "NotFound", "pods missing"), status=404)
        if request.path == f"{PODS}/proxy":
            return aiohttp.web.Response(status=502, text="<html>bad gateway</html>")
        if request.path == "/apis/policy/v1":
            return aiohttp.web.json_response(status(404, "NotFound", ""), status=404)
        return aiohttp.web.json_response({"kind": "Pod", "metadata": {"name": "a"}, "items": []})

    async def _watch(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        response = aiohttp.web.StreamResponse()
        await response.prepare(request)
        if self.watch_silent:
            await self.closing.wait()
        for line in self.watch_lines:
            # In small pieces, so events and lines straddle the chunks the client reads.
            for start in range(0, len(line), 50_000):
                await response.write(line[start : start + 50_000])
        await response.write_eof()
        return response


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[FakeApiServer, str]]:
    fake = FakeApiServer()
    runner = aiohttp.web.AppRunner(fake.app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        fake.closing.set()
        await runner.cleanup()


def event(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


@pytest.mark.asyncio
async def test_requests_carry_json_patches_params_and_the_token(
    server: tuple[FakeApiServer, str],
) -> None:
    fake, url = server
    async with KubeApi(ApiAccess(url, "secret")) as api:
        assert (await api.create(PODS, {"metadata": {"name": "a"}}))["kind"] == "Pod"
        await api.merge_patch(f"{PODS}/a", {"spec": {"x": None}})
        await api.list(PODS, "app=x")
    create, patch, listing = fake.requests
    assert create["method"] == "POST" and create["content_type"] == "application/json"
    assert create["body"] == {"metadata": {"name": "a"}}
    assert create["authorization"] == "Bearer secret"
    assert patch["content_type"] == MERGE_PATCH and patch["body"] == {"spec": {"x": None}}
    assert listing["query"] == {"labelSelector": "app=x"}


@pytest.mark.asyncio
async def test_failures_are_api_errors_with_the_servers_status(
    server: tuple[FakeApiServer, str],
) -> None:
    _, url = server
    async with KubeApi(ApiAccess(url)) as api:
        assert await api.get(f"{PODS}/missing") is None
        with pytest.raises(ApiError) as missing:
            await api.request("DELETE", f"{PODS}/missing")
        assert (missing.value.status, missing.value.reason) == (404, "NotFound")
        assert missing.value.message == "pods missing" and not missing.value.retryable
        with pytest.raises(ApiError) as proxy:
            await api.request("GET", f"{PODS}/proxy")
        assert proxy.value.status == 502 and "bad gateway" in proxy.value.message
        assert proxy.value.retryable
        assert not await api.serves("policy/v1") and await api.serves("policy/v1beta1")
    async with KubeApi(ApiAccess("http://127.0.0.1:1")) as api:  # nothing listens there
        with pytest.raises(ApiError) as unreachable:
            await api.get(PODS)
        assert (unreachable.value.status, unreachable.value.reason) == (503, "Unreachable")


@pytest.mark.asyncio
async def test_a_watch_yields_events_of_any_length_skips_bookmarks_and_raises_errors(
    server: tuple[FakeApiServer, str],
) -> None:
    fake, url = server
    huge = {"metadata": {"name": "huge", "annotations": {"a": "x" * 300_000}}}
    fake.watch_lines = [
        event("ADDED", {"metadata": {"name": "a"}}),
        event("BOOKMARK", {"metadata": {"resourceVersion": "7"}}),
        event("MODIFIED", huge),  # past aiohttp's line-reader limit (64 KiB)
        b"\n",
        event("ERROR", status(410, "Expired", "too old resource version: 1 (7)")),
        event("DELETED", {"metadata": {"name": "never seen"}}),
    ]
    seen: list[tuple[str, str]] = []
    async with KubeApi(ApiAccess(url)) as api:
        with pytest.raises(ApiError) as gone:
            async for kind, obj in api.watch(PODS, {"resourceVersion": "1"}, timeout_s=60):
                seen.append((kind, obj["metadata"]["name"]))
    assert seen == [("ADDED", "a"), ("MODIFIED", "huge")]
    assert (gone.value.status, gone.value.reason) == (410, "Expired")
    query = fake.requests[0]["query"]
    assert query == {"resourceVersion": "1", "watch": "true", "timeoutSeconds": "60"}


@pytest.mark.asyncio
async def test_a_silent_watch_past_its_timeout_is_a_dropped_connection(
    server: tuple[FakeApiServer, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, url = server
    fake.watch_silent = True
    monkeypatch.setattr(kubeclient, "WATCH_GRACE_S", 0)
    async with KubeApi(ApiAccess(url)) as api:
        with pytest.raises(ApiError) as dropped:
            async for _ in api.watch(PODS, timeout_s=1):
                pass
    assert dropped.value.status == 503


@pytest.mark.asyncio
async def test_in_cluster_access_reads_the_rotated_token_per_request(
    server: tuple[FakeApiServer, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, url = server
    (tmp_path / "token").write_text("first\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    access = ApiAccess.in_cluster(tmp_path)
    assert access is not None
    assert access.server == "https://10.0.0.1:6443"
    assert access.ca_file == str(tmp_path / "ca.crt")
    plain = ApiAccess(url, access.token)  # the same token source, over plain HTTP
    async with KubeApi(plain) as api:
        await api.get(PODS)
        (tmp_path / "token").write_text("second\n")
        await api.get(PODS)
    assert [r["authorization"] for r in fake.requests] == ["Bearer first", "Bearer second"]
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert ApiAccess.in_cluster(tmp_path) is None


def test_a_missing_kubeconfig_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="absent"):
        ApiAccess.load()


def test_resource_paths() -> None:
    deployments = Resource("apps/v1", "deployments")
    assert deployments.path("ns") == "/apis/apps/v1/namespaces/ns/deployments"
    assert deployments.path("ns", "d", "scale") == "/apis/apps/v1/namespaces/ns/deployments/d/scale"
    assert deployments.path() == "/apis/apps/v1/deployments"  # every namespace
    assert Resource("v1", "nodes", namespaced=False).path("ns", "n") == "/api/v1/nodes/n"

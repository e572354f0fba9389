"""kmock 0.8 as the API server of fault tests: what kopf and the operator need of a real one.

kmock's `KubernetesEmulator` stores objects and serves discovery, list, watch, get, create,
merge/JSON patch and delete. `ApiEmulator` adds what a real kube-apiserver does and kopf or
the operator rely on:

- every write gets a fresh `metadata.resourceVersion`; a create gets `uid`,
  `creationTimestamp` and `generation` 1, and a change of `spec` bumps `generation` (without
  these kopf's own patches fail and a create handler can run twice);
- optimistic locking: a patch that carries a `metadata.resourceVersion` other than the stored
  one is answered 409 Conflict, and a duplicate create 409 with reason `AlreadyExists` (kmock
  says "Object Already Exists"; clients match on the reason);
- `generateName`, and the scale subresource of a registered CRD (`register_crd`) as an
  autoscaling/v1 `Scale`, read from and written to the CRD's replicas paths.

And faults, answered before anything is stored (`fail`): kmock's own reactions answer only
after the emulator has applied the write, so an injected 409 or 500 would still have
written. `drop_watches` ends every open watch stream, as an API server restart does.

Still missing, so tested on the real API server instead (tests/test_operator_kube.py): label
and field selectors, garbage collection, controllers, schema validation, RBAC.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import re
import secrets
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp.web
import attrs
import kmock
import yaml

# The kinds the operator creates and kopf watches (besides the CRD's).
BUILTIN_KINDS = {
    "v1/configmaps": "ConfigMap",
    "v1/services": "Service",
    "v1/serviceaccounts": "ServiceAccount",
    "v1/endpoints": "Endpoints",
    "v1/events": "Event",
    "apps/v1/deployments": "Deployment",
    "rbac.authorization.k8s.io/v1/roles": "Role",
    "rbac.authorization.k8s.io/v1/rolebindings": "RoleBinding",
    "policy/v1/poddisruptionbudgets": "PodDisruptionBudget",
}
VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}


@dataclass
class Fault:
    """Answers up to `times` matching requests with an error, or only runs `before` first."""

    verb: str  # an HTTP method, or WATCH
    path: re.Pattern[str]
    status: int = 0  # 0: no error; `before` only
    reason: str = ""
    times: int = 1
    before: Callable[[], Awaitable[None]] | None = None
    hits: int = 0

    def matches(self, verb: str, path: str) -> bool:
        return self.hits < self.times and verb == self.verb and bool(self.path.search(path))


@dataclass(frozen=True)
class ScalePaths:
    spec_replicas: tuple[str, ...]
    status_replicas: tuple[str, ...]
    selector: tuple[str, ...]


def _path(json_path: str) -> tuple[str, ...]:
    return tuple(json_path.lstrip(".").split("."))


def _dig(body: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = body
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    nested: dict[str, Any] = {path[-1]: value}
    for key in reversed(path[:-1]):
        nested = {key: nested}
    return nested


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: what a merge patch makes of `target` (for deciding on `generation`)."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _status_error(status: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "code": status, "reason": reason, "message": message}  # fmt: skip
    return aiohttp.web.json_response(body, status=status)


@attrs.define(kw_only=True)
class ApiEmulator(kmock.KubernetesEmulator):
    namespaces: tuple[str, ...] = ()  # what kopf finds listing namespaces
    faults: list[Fault] = attrs.field(factory=list, init=False)
    _scales: dict[kmock.resource, ScalePaths] = attrs.field(factory=dict, init=False)
    _versions: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _writes: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _watches_open: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)

    # -- setting up ---------------------------------------------------------------------------

    def register(
        self, key: str, kind: str, subresources: set[str] | None = None, namespaced: bool = True
    ) -> None:
        self.resources[key] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs=VERBS, subresources=subresources or set()
        )

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        """Serves a CustomResourceDefinition's resource, with its subresources."""
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            resource = kmock.resource(spec["group"], version["name"], names["plural"])
            subresources = version.get("subresources") or {}
            self.resources[resource] = kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular"),
                shortnames=set(names.get("shortNames") or ()),
                namespaced=spec["scope"] == "Namespaced",
                verbs=VERBS,
                subresources=set(subresources),
            )
            if scale := subresources.get("scale"):
                self._scales[resource] = ScalePaths(
                    _path(scale["specReplicasPath"]),
                    _path(scale["statusReplicasPath"]),
                    _path(scale.get("labelSelectorPath", ".status.selector")),
                )

    def register_builtin_kinds(self) -> None:
        for key, kind in BUILTIN_KINDS.items():
            self.register(key, kind, {"status"} if kind == "Deployment" else set())
        self.register("v1/namespaces", "Namespace", namespaced=False)

    # -- faults -------------------------------------------------------------------------------

    def fail(self, verb: str, path: str, status: int, reason: str, times: int = 1) -> Fault:
        """The next `times` requests `verb` (a method or WATCH) to a path matching `path`
        are answered `status` with a Status of `reason`, and change nothing."""
        fault = Fault(verb.upper(), re.compile(path), status, reason, times)
        self.faults.append(fault)
        return fault

    def before(
        self, verb: str, path: str, action: Callable[[], Awaitable[None]], times: int = 1
    ) -> Fault:
        """Runs `action` (say, another client's write) before the next matching request."""
        fault = Fault(verb.upper(), re.compile(path), times=times, before=action)
        self.faults.append(fault)
        return fault

    def drop_watches(self) -> None:
        """Ends every watch stream open now; clients must reconnect."""
        self._watches_open.set()
        self._watches_open = asyncio.Event()

    # -- serving ------------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path.rstrip("/") == "/api/v1/namespaces":
            # kmock cannot parse this path (it takes "namespaces" for a namespace's name).
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    async def _serve_namespaces(
        self, raw_request: aiohttp.web.BaseRequest
    ) -> aiohttp.web.StreamResponse:
        if raw_request.query.get("watch") != "true":
            items = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
                     for name in self.namespaces]  # fmt: skip
            return aiohttp.web.json_response({"metadata": {"resourceVersion": "1"},
                                              "items": items})  # fmt: skip
        # A quiet watch, ended after a while (no handler is left open at shutdown).
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._watches_open.wait(), 1.0)
        await response.write_eof()
        return response

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        verb = "WATCH" if request.action == kmock.action.WATCH else str(request.method.value)
        for fault in self.faults:
            if fault.matches(verb, request.url.path):
                fault.hits += 1
                if fault.before is not None:
                    await fault.before()
                if fault.status:
                    return _status_error(fault.status, fault.reason, f"injected: {fault.reason}")
        if request.resource is None or (verb in ("GET", "WATCH") and request.subresource is None):
            return await super()._handle(request)
        async with self._writes:
            if request.subresource == "scale" and request.resource in self._scales:
                return await self._serve_scale(request)
            if request.action == kmock.action.CREATE:
                refused = self._prepare_create(request)
            elif request.action == kmock.action.UPDATE:
                refused = self._prepare_patch(request)
            else:
                refused = None
            return refused or await super()._handle(request)

    def _stored(self, request: kmock.Request, name: str | None = None) -> kmock.Object | None:
        name = name or request.name
        if request.resource is None or name is None:
            return None
        key = (request.resource, request.namespace, name)
        if key not in self.objects:
            return None
        stored = self.objects[key]
        return None if stored.deleted else stored

    def _prepare_create(self, request: kmock.Request) -> aiohttp.web.Response | None:
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if self._stored(request, meta.get("name")) is not None:
            return _status_error(409, "AlreadyExists", f"{meta.get('name')} already exists")
        if request.namespace:
            meta.setdefault("namespace", request.namespace)
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            generation=1,
            resourceVersion=str(next(self._versions)),
        )
        return None

    def _prepare_patch(self, request: kmock.Request) -> aiohttp.web.Response | None:
        stored = self._stored(request)
        if stored is None:
            return _status_error(404, "NotFound", f"{request.name} not found")
        old_meta = stored.raw.get("metadata") or {}
        version = str(next(self._versions))
        if isinstance(request.data, list):  # a JSON patch: no preconditions here
            request.data.append(
                {"op": "replace", "path": "/metadata/resourceVersion", "value": version}
            )
            return None
        meta = request.data.setdefault("metadata", {})
        wanted = meta.get("resourceVersion")
        if wanted is not None and wanted != old_meta.get("resourceVersion"):
            return _status_error(409, "Conflict", "the object has been modified; please apply "
                                 "your changes to the latest version and try again")  # fmt: skip
        if request.subresource == "status":  # only status (and the version) change there
            for key in list(request.data):
                if key not in ("metadata", "status"):
                    del request.data[key]
            request.data["metadata"] = meta = {}
        elif "spec" in request.data:
            old_spec = stored.raw.get("spec")
            if merge_patch(old_spec, request.data["spec"]) != old_spec:
                meta["generation"] = int(old_meta.get("generation", 1)) + 1
        meta["resourceVersion"] = version
        return None

    async def _serve_scale(self, request: kmock.Request) -> aiohttp.web.Response:
        assert request.resource is not None
        paths = self._scales[request.resource]
        stored = self._stored(request)
        if stored is None:
            return _status_error(404, "NotFound", f"{request.name} not found")
        if request.method == kmock.method.PATCH:
            patch = request.data if isinstance(request.data, Mapping) else {}
            meta = stored.raw.get("metadata") or {}
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != meta.get("resourceVersion"):
                return _status_error(409, "Conflict", "the object has been modified")
            replicas = (patch.get("spec") or {}).get("replicas")
            if replicas is not None:
                changes = _nest(paths.spec_replicas, replicas) | {
                    "metadata": {"resourceVersion": str(next(self._versions))}
                }
                if _dig(stored.raw, paths.spec_replicas) != replicas:
                    changes["metadata"]["generation"] = int(meta.get("generation", 1)) + 1
                stored.patch(changes)
                event = {"type": "MODIFIED", "object": stored.raw}
                await self._buses[request.resource].put(event)
        body = stored.raw
        return aiohttp.web.json_response({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {k: body["metadata"].get(k)
                         for k in ("name", "namespace", "uid", "resourceVersion")},
            "spec": {"replicas": _dig(body, paths.spec_replicas) or 0},
            "status": {"replicas": _dig(body, paths.status_replicas) or 0,
                       "selector": _dig(body, paths.selector) or ""},
        })  # fmt: skip

    async def _serve_watch(self, request: kmock.Request) -> Any:
        """kmock's watch stream, ended early by `drop_watches`."""
        dropped = asyncio.ensure_future(self._watches_open.wait())
        events = cast(AsyncGenerator[Any, None], super()._serve_watch(request))
        following: asyncio.Future[Any] | None = None
        try:
            while True:
                following = asyncio.ensure_future(anext(events))
                await asyncio.wait({following, dropped}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    return
                try:
                    event = following.result()
                except StopAsyncIteration:
                    return
                yield event
        finally:
            for task in (dropped, following):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await task
            await events.aclose()


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {"token": "kmock"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config))
    return path

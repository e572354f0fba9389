"""The operator under API faults: 500s, 409 conflicts and dropped watches, on kmock 0.8.

kopf's real loop (`kopf.operator`, the operator's handlers and resync loop, on the test's event
loop) runs against kmock's HTTP server, made API-server-like by tests/kmock_support.py. Faults
are answered before anything is stored, so a failed write really did not happen. The test
plays the Deployment controller (kmock has none): it reports each Deployment's pods ready.
Each test asserts the faults were hit and that children and status converged anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import kmock
import pytest
import pytest_asyncio
import yaml
from kmock_support import ApiEmulator, write_kubeconfig
from sloservice_manifests import CHILDREN, CRD_PATH, NAME, condition, sloservice, slower_chat

from sloserve.operator.runtime import OperatorConfig, configure

pytestmark = pytest.mark.asyncio

NS = "faults"
SLOS = kmock.resource("sloserve.io", "v1alpha1", "sloservices")
SLOS_PATH = f"/apis/sloserve.io/v1alpha1/namespaces/{NS}/sloservices"
MERGE = {"Content-Type": "application/merge-patch+json"}
T = TypeVar("T")


@pytest_asyncio.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ApiEmulator]:
    async with ApiEmulator(namespaces=(NS,)) as emulator, kmock.Server(emulator):
        emulator.register_crd(yaml.safe_load(CRD_PATH.read_text()))
        emulator.register_builtin_kinds()
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(emulator.url).rstrip("/"))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))  # kopf's login reads it
        yield emulator


@contextlib.asynccontextmanager
async def operator(resync_s: float = 600.0) -> AsyncIterator[None]:
    """kopf's loop with the operator's handlers, on this event loop, watching NS. A long
    resync by default: what converges does so through kopf's retries and watches."""
    import kopf

    import sloserve.operator.handlers  # noqa: F401  (registers the handlers)

    configure(OperatorConfig(namespaces=(NS,), resync_s=resync_s, retry_delay_s=0.5))
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(standalone=True, namespaces=[NS], stop_flag=stop, ready_flag=ready)
    )
    try:
        await asyncio.wait_for(ready.wait(), 15)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        configure(OperatorConfig())


async def call(api: ApiEmulator, method: str, path: str, body: dict[str, Any]) -> None:
    """The test's own requests (POST, or a merge PATCH), on a connection not kept alive: the
    server's end of a kept one would hold kopf's shutdown (it waits for tasks it did not
    know at its start)."""
    headers = MERGE if method == "PATCH" else {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(method, str(api.url.with_path(path)), json=body, headers=headers) as answer,
    ):
        answer.raise_for_status()


async def play_deployment_controller(api: ApiEmulator) -> None:
    """Reports every Deployment's pods as created, updated and ready, through /status."""
    while True:
        for (resource, namespace, name), stored in list(api.objects.items()):
            if resource.plural != "deployments" or stored.deleted:
                continue
            body = stored.raw
            want = int(body["spec"].get("replicas", 1))
            status = {"observedGeneration": body["metadata"]["generation"], "replicas": want}
            status |= {"updatedReplicas": want, "readyReplicas": want, "availableReplicas": want}
            if any((body.get("status") or {}).get(k) != v for k, v in status.items()):
                path = f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}/status"
                await call(api, "PATCH", path, {"status": status})
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def deployment_controller(api: ApiEmulator) -> AsyncIterator[None]:
    task = asyncio.create_task(play_deployment_controller(api))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(probe: Callable[[], T | None], what: str, timeout_s: float = 20.0) -> T:
    deadline = time.monotonic() + timeout_s
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.1)
    return value


def stored(api: ApiEmulator, plural: str, name: str, group_version: str = "v1") -> dict[str, Any]:
    key = (kmock.resource(f"{group_version}/{plural}"), NS, name)
    if key not in api.objects or api.objects[key].deleted:
        return {}
    return api.objects[key].raw


def slo(api: ApiEmulator) -> dict[str, Any]:
    return stored(api, "sloservices", NAME, "sloserve.io/v1alpha1")


def children(api: ApiEmulator) -> set[str]:
    found = set()
    for (_, namespace, name), obj in api.objects.items():
        if namespace == NS and not obj.deleted:
            labels = obj.raw.get("metadata", {}).get("labels") or {}
            if labels.get("sloserve.io/sloservice") == NAME:
                found.add(f"{obj.raw['kind'].lower()}/{name}")
    return found


def ready(api: ApiEmulator) -> dict[str, Any] | None:
    body = slo(api)
    return body if condition(body, "Ready").get("status") == "True" else None


def slo_history(api: ApiEmulator) -> list[dict[str, Any]]:
    versions = api.objects[SLOS, NS, NAME].history
    return [dict(v.raw) for v in versions if v is not None]


def last_handled(api: ApiEmulator) -> str:
    annotations = slo(api).get("metadata", {}).get("annotations") or {}
    return str(annotations.get("operator.sloserve.io/last-handled-configuration", ""))


async def create_sloservice(api: ApiEmulator) -> None:
    await call(api, "POST", SLOS_PATH, sloservice())


async def patch_spec(api: ApiEmulator, change: Callable[[dict[str, Any]], Any]) -> None:
    await call(api, "PATCH", f"{SLOS_PATH}/{NAME}", {"spec": sloservice(change)["spec"]})


def config_has_slower_chat(api: ApiEmulator) -> bool:
    data = stored(api, "configmaps", f"{NAME}-config").get("data") or {}
    return "tpot_ms: 150" in data.get("classes.yaml", "")


async def test_server_errors_are_retried_until_children_and_status_converge(
    api: ApiEmulator,
) -> None:
    faults = [
        api.fail("PATCH", rf"/sloservices/{NAME}/scale$", 503, "ServiceUnavailable"),
        api.fail("POST", r"/deployments$", 500, "InternalError", times=2),
        api.fail("PATCH", rf"/sloservices/{NAME}/status$", 500, "InternalError", times=2),
        # kopf's own writes: its bookkeeping annotations on the SLOService.
        api.fail("PATCH", rf"/sloservices/{NAME}$", 500, "InternalError"),
    ]
    async with deployment_controller(api), operator():
        await create_sloservice(api)
        body = await until(lambda: ready(api), "Ready")
        await until(lambda: children(api) == CHILDREN, "children")
        # The status converges to Stable while the operator runs (a reconcile cut short by
        # the operator's own shutdown below is not what this test is about).
        await until(lambda: condition(slo(api), "Degraded").get("reason") == "Stable", "Stable")
    assert [f.hits for f in faults] == [f.times for f in faults]
    status = body["status"]
    assert status["phase"] == "Ready" and status["readyReplicas"] == 2
    assert condition(body, "Degraded")["status"] == "False"
    assert body["spec"]["replicas"]["desired"] == 2  # written through /scale, on a retry
    assert stored(api, "deployments", f"{NAME}-replica", "apps/v1")["spec"]["replicas"] == 2
    # The failed creates were reported (that status write failed too, then a later one won).
    assert any(condition(r.data, "Degraded").get("reason") == "ApplyFailed"
               for r in api["patch", kmock.subresource("status"), SLOS])  # fmt: skip


async def test_conflicts_are_retried_and_a_concurrent_scale_is_kept(api: ApiEmulator) -> None:
    async def kubectl_scale() -> None:  # another client's write, between read and write
        await call(api, "PATCH", f"{SLOS_PATH}/{NAME}/scale", {"spec": {"replicas": 3}})

    # The operator's first /scale write (replicas.desired unset: initial, 2) carries the
    # resourceVersion it read; the concurrent scale makes that stale, so it gets a real 409.
    concurrent = api.before("PATCH", rf"/sloservices/{NAME}/scale$", kubectl_scale)
    status_conflicts = api.fail("PATCH", rf"/sloservices/{NAME}/status$", 409, "Conflict")
    async with deployment_controller(api), operator():
        await create_sloservice(api)
        body = await until(lambda: ready(api), "Ready")
        assert body["spec"]["replicas"]["desired"] == 3  # the concurrent scale, not undone
        deployment = stored(api, "deployments", f"{NAME}-replica", "apps/v1")
        assert deployment["spec"]["replicas"] == 3
        assert body["status"]["readyReplicas"] == 3
        # The concurrent write and the operator's, refused: it did not try again on a retry.
        assert len(api["patch", kmock.subresource("scale"), SLOS]) == 2

        # A repair answered 409 twice is retried until the ConfigMap holds the new spec.
        config_conflicts = api.fail(
            "PATCH", rf"/configmaps/{NAME}-config$", 409, "Conflict", times=2
        )
        await patch_spec(api, slower_chat)
        await until(lambda: config_has_slower_chat(api), "ConfigMap updated")
        await until(
            lambda: condition(slo(api), "Degraded").get("reason") == "Stable", "Degraded cleared"
        )
    assert concurrent.hits == 1 and status_conflicts.hits == 1 and config_conflicts.hits == 2
    reasons = [condition(v, "Degraded").get("reason") for v in slo_history(api)]
    assert "ApplyFailed" in reasons  # the refused repair, reported while retrying


async def test_dropped_watches_are_resumed_and_missed_changes_handled(api: ApiEmulator) -> None:
    async with deployment_controller(api), operator():
        await create_sloservice(api)
        await until(lambda: ready(api), "Ready")
        # The API server goes away: open watches end, the next two reconnects are refused.
        refused = api.fail("WATCH", r"/sloservices$", 500, "InternalError", times=2)
        api.drop_watches()
        await until(lambda: refused.hits >= 1, "a refused reconnect")
        # Changed while no SLOService watch is open: only a resumed watch can tell kopf.
        await patch_spec(api, slower_chat)
        # The child watches resumed too and nudged a reconcile; kopf's note of the spec it last
        # handled shows that its SLOService watch saw the change as well.
        await until(lambda: config_has_slower_chat(api), "ConfigMap updated", timeout_s=30)
        await until(lambda: '"tpotMs":150' in last_handled(api), "kopf handled the update")
    assert refused.hits == 2

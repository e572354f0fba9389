"""Reconciles that no SLOService event starts: periodic resync, and child-change nudges.

The resync loop is what kopf's timers would be, without the finalizer kopf adds for timers:
the operator keeps none, so deleting an SLOService never waits for the operator. A child that
changes (edited or deleted by hand) nudges its owner, debounced so a burst of a Deployment's
status updates costs one reconcile.
"""

from __future__ import annotations

import asyncio
import logging

from sloserve.kubeclient import ApiError
from sloserve.operator.reconcile import RetryLater, reconcile
from sloserve.operator.resources import SLOSERVICES
from sloserve.operator.runtime import Runtime

log = logging.getLogger("sloserve.operator")

NUDGE_DELAY_S = 0.5


async def reconcile_named(rt: Runtime, namespace: str, name: str) -> None:
    body = await rt.api.get(SLOSERVICES.path(namespace, name))
    if body is not None:
        await reconcile(rt, body)


async def _one(rt: Runtime, namespace: str, name: str) -> None:
    try:
        await reconcile_named(rt, namespace, name)
    except (ApiError, RetryLater) as error:
        log.warning("%s/%s: reconcile failed, will retry: %s", namespace, name, error)
    except Exception:  # the loop must outlive any one object's bug
        log.exception("%s/%s: reconcile failed", namespace, name)


async def resync_forever(rt: Runtime) -> None:
    scopes: tuple[str | None, ...] = rt.config.namespaces or (None,)
    while True:
        await asyncio.sleep(rt.config.resync_s)
        for scope in scopes:
            try:
                items = await rt.api.list(SLOSERVICES.path(scope))
            except ApiError as error:
                log.warning("listing SLOServices in %s: %s", scope or "all namespaces", error)
                continue
            for item in items:
                meta = item["metadata"]
                await _one(rt, meta["namespace"], meta["name"])


class Nudges:
    """Debounced reconciles of owners whose children changed."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.pending: dict[tuple[str, str], asyncio.Task[None]] = {}

    def nudge(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key not in self.pending:
            self.pending[key] = asyncio.create_task(self._later(key))

    async def _later(self, key: tuple[str, str]) -> None:
        await asyncio.sleep(NUDGE_DELAY_S)
        self.pending.pop(key, None)
        await _one(self.rt, *key)

    def cancel(self) -> None:
        for task in self.pending.values():
            task.cancel()
        self.pending.clear()

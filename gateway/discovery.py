"""Which replicas exist. A discovery source yields the full set of endpoints whenever it
changes; the pool adds and removes replicas to match, without a restart.

Only a static list exists now. A Kubernetes source (a headless Service's EndpointSlices,
watched) will implement the same protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from sloserve.errors import FieldError
from sloserve.gateway.replica_pool import ReplicaPool


class Discovery(Protocol):
    def watch(self) -> AsyncIterator[frozenset[str]]:
        """Yields the current set of HOST:PORT endpoints, then each new set."""
        ...


def check_endpoint(endpoint: str, field: str = "replica") -> str:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FieldError(field, f"{endpoint!r} is not HOST:PORT")
    return endpoint


class StaticDiscovery:
    """A fixed list of endpoints, given on the command line."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        if not endpoints:
            raise FieldError("replica", "give at least one replica endpoint")
        self._endpoints = frozenset(check_endpoint(e) for e in endpoints)

    async def watch(self) -> AsyncIterator[frozenset[str]]:
        yield self._endpoints
        await asyncio.Event().wait()  # a static list never changes


async def follow(discovery: Discovery, pool: ReplicaPool) -> None:
    """Keeps the pool in step with discovery; runs until cancelled."""
    async for endpoints in discovery.watch():
        await pool.apply(endpoints)

"""Per-class attainment as the gateways measure it, over a sliding window.

Each gateway pod keeps its own counters since it started (GET /v1/slo/summary), so the reader
asks every ready gateway pod (the gateway Service's Endpoints) and the window takes per-pod
differences between samples: a pod that restarted (counters went down) counts from zero.
The reader is a protocol so tests and other transports can stand in; a gateway that cannot be
read is a value (`Unreachable`), never an exception.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from sloserve.gateway.k8s_discovery import list_endpoint_slices, ready_endpoints
from sloserve.kubeclient import ApiError, KubeApi

SUMMARY_PATH = "/v1/slo/summary"


@dataclass(frozen=True)
class Counts:
    arrived: int = 0
    attained: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.arrived + other.arrived, self.attained + other.attained)

    @property
    def attainment(self) -> float | None:
        return self.attained / self.arrived if self.arrived else None


@dataclass(frozen=True)
class GatewaySample:
    """One gateway pod's summary: counters since it started, and its load now."""

    source: str  # the pod (its address)
    classes: Mapping[str, Counts]
    in_flight: int
    queued: int

    @classmethod
    def from_summary(cls, source: str, summary: Mapping[str, Any]) -> GatewaySample:
        classes = {
            str(name): Counts(int(t.get("arrived", 0)), int(t.get("attained", 0)))
            for name, t in (summary.get("classes") or {}).items()
        }
        depth = (summary.get("queue") or {}).get("depth") or {}
        return cls(
            source=source,
            classes=classes,
            in_flight=int(summary.get("in_flight", 0)),
            queued=sum(int(n) for n in depth.values()),
        )


@dataclass(frozen=True)
class Unreachable:
    message: str


class SummaryReader(Protocol):
    async def read(
        self, namespace: str, service: str, port: int
    ) -> Sequence[GatewaySample] | Unreachable:
        """Every ready gateway pod's summary, or why none could be read."""
        ...


class EndpointsSummaryReader:
    """Reads each ready gateway pod listed in the gateway Service's EndpointSlices, over HTTP.

    Slices, not core/v1 Endpoints, as the gateway's own discovery does: Endpoints refuse
    loopback pod addresses (the dev cluster's process pods) and are deprecated since 1.33.
    """

    def __init__(self, api: KubeApi, timeout_s: float = 3.0) -> None:
        self.api = api
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def read(
        self, namespace: str, service: str, port: int
    ) -> Sequence[GatewaySample] | Unreachable:
        try:
            addresses = sorted(await self._ready_addresses(namespace, service, port))
        except ApiError as error:
            return Unreachable(f"reading the gateway's endpoints: {error}")
        if not addresses:
            return Unreachable(f"no ready gateway pod behind Service {namespace}/{service}")
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            results = await asyncio.gather(
                *(self._one(session, address, port) for address in addresses)
            )
        samples = [r for r in results if isinstance(r, GatewaySample)]
        if not samples:
            errors = "; ".join(r.message for r in results if isinstance(r, Unreachable))
            return Unreachable(f"no gateway pod answered {SUMMARY_PATH}: {errors}")
        return samples

    async def _ready_addresses(self, namespace: str, service: str, port: int) -> set[str]:
        _, listing = await list_endpoint_slices(self.api, namespace, service)
        return {
            endpoint.rpartition(":")[0].strip("[]")
            for endpoint_slice in listing.get("items") or []
            for endpoint in ready_endpoints(endpoint_slice, str(port))
        }

    async def _one(
        self, session: aiohttp.ClientSession, address: str, port: int
    ) -> GatewaySample | Unreachable:
        host = f"[{address}]" if ":" in address else address
        url = f"http://{host}:{port}{SUMMARY_PATH}"
        try:
            async with session.get(url) as response:
                response.raise_for_status()
                return GatewaySample.from_summary(address, await response.json())
        except aiohttp.ClientResponseError as error:
            return Unreachable(f"{url}: HTTP {error.status}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            return Unreachable(f"{url}: {type(error).__name__} {error}"[:200])


@dataclass(frozen=True)
class WindowView:
    """What the window shows: per-class counts within it, lifetime counts, load now."""

    window: Mapping[str, Counts]
    lifetime: Mapping[str, Counts]
    in_flight: int
    queued: int


class AttainmentWindow:
    """Samples of one SLOService's gateways over time, for windowed attainment."""

    def __init__(self, keep_s: float = 3600.0) -> None:
        self._samples: deque[tuple[float, Mapping[str, GatewaySample]]] = deque()
        self.keep_s = keep_s

    def observe(self, now: float, samples: Sequence[GatewaySample]) -> None:
        self._samples.append((now, {s.source: s for s in samples}))
        while self._samples and self._samples[0][0] < now - self.keep_s:
            self._samples.popleft()

    def view(self, now: float, window_s: float, since: float | None = None) -> WindowView | None:
        """Counts since the oldest sample within the window (and after `since`, the last scale
        change: older requests say nothing about the current replica count)."""
        if not self._samples:
            return None
        start = now - window_s if since is None else max(now - window_s, since)
        base = next((s for t, s in self._samples if t >= start), self._samples[-1][1])
        latest = self._samples[-1][1]
        window: dict[str, Counts] = {}
        lifetime: dict[str, Counts] = {}
        for source, sample in latest.items():
            before = base.get(source)
            for name, counts in sample.classes.items():
                lifetime[name] = lifetime.get(name, Counts()) + counts
                old = before.classes.get(name, Counts()) if before else Counts()
                if counts.arrived < old.arrived or counts.attained < old.attained:
                    old = Counts()  # the pod restarted: all it counted is new
                delta = Counts(counts.arrived - old.arrived, counts.attained - old.attained)
                window[name] = window.get(name, Counts()) + delta
        return WindowView(
            window=window,
            lifetime=lifetime,
            in_flight=sum(s.in_flight for s in latest.values()),
            queued=sum(s.queued for s in latest.values()),
        )

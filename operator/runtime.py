"""The operator's configuration and the state it keeps while running.

Configuration is set once before kopf starts (`configure`: the CLI, or a test); the runtime
(API client, attainment windows, per-object locks) is made by the startup handler on kopf's
own event loop, because aiohttp sessions and asyncio locks belong to the loop that made them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sloserve import __version__
from sloserve.kubeclient import KubeApi
from sloserve.operator.attainment import AttainmentWindow, EndpointsSummaryReader, SummaryReader


@dataclass(frozen=True)
class OperatorConfig:
    # Image of replica and gateway pods whose SLOService names none (the chart passes its own).
    default_image: str = f"sloserve:{__version__}"
    # Every SLOService is reconciled this often: status, attainment, autoscaling, and a
    # safety net for missed watch events.
    resync_s: float = 15.0
    # Namespaces watched; empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    # Delay before kopf retries a handler whose API call failed transiently.
    retry_delay_s: float = 5.0
    reader_factory: Callable[[KubeApi], SummaryReader] = EndpointsSummaryReader
    clock: Callable[[], float] = time.time


_config = OperatorConfig()


def configure(config: OperatorConfig) -> None:
    global _config
    _config = config


def config() -> OperatorConfig:
    return _config


@dataclass
class Runtime:
    config: OperatorConfig
    api: KubeApi
    reader: SummaryReader
    pdb_api_version: str
    windows: dict[str, AttainmentWindow] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def window(self, uid: str) -> AttainmentWindow:
        return self.windows.setdefault(uid, AttainmentWindow())

    def lock(self, uid: str) -> asyncio.Lock:
        """Serialises reconciles of one object (handlers, child events, the resync loop)."""
        return self.locks.setdefault(uid, asyncio.Lock())

    def forget(self, uid: str) -> None:
        self.windows.pop(uid, None)
        self.locks.pop(uid, None)

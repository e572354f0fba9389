"""A container's probes, run against its local process (for process_kubelet.py).

startupProbe first (until it passes, nothing else is probed), then readinessProbe and
livenessProbe side by side, each on its own period with Kubernetes' thresholds. Kinds:
exec (the command runs like the container's own: resolved program, rewritten paths and
hosts), tcpSocket, httpGet and grpc, all aimed at the pod IP. Named ports are looked up in
the container's ports.

One shortcut: an exec probe `sloserve health --endpoint HOST:PORT` is answered in this process
by the same gRPC health check the command makes. Running it as a command starts a Python
interpreter and imports grpc each time (about a second of CPU); with a probe every few seconds
per replica that is most of a 2-core CI machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sloserve.client import serving
from sloserve.devcluster.pod_launch import Launch

log = logging.getLogger("sloserve.devcluster.probes")

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class ProbeTiming:
    initial_delay_s: float
    period_s: float
    timeout_s: float
    success_threshold: int
    failure_threshold: int

    @classmethod
    def of(cls, probe: JsonObject) -> ProbeTiming:
        return cls(
            initial_delay_s=float(probe.get("initialDelaySeconds", 0)),
            period_s=float(probe.get("periodSeconds", 10)),
            timeout_s=float(probe.get("timeoutSeconds", 1)),
            success_threshold=int(probe.get("successThreshold", 1)),
            failure_threshold=int(probe.get("failureThreshold", 3)),
        )


def port_number(container: JsonObject, port: int | str) -> int:
    if isinstance(port, int) or port.isdigit():
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"no container port named {port!r}")


def _inline_health_endpoint(command: Sequence[str], launch: Launch) -> str | None:
    """HOST:PORT when `command` is `sloserve health [--endpoint E]` (and nothing else)."""
    if len(command) < 2 or Path(command[0]).name != "sloserve" or command[1] != "health":
        return None
    endpoint, rest = "localhost:50051", list(command[2:])
    while rest:
        flag = rest.pop(0)
        if flag.startswith("--endpoint="):
            endpoint = flag.partition("=")[2]
        elif flag == "--endpoint" and rest:
            endpoint = rest.pop(0)
        else:
            return None  # --wait or anything else: run the real command
    return launch.rewrite(endpoint)


async def probe_once(
    probe: JsonObject, container: JsonObject, launch: Launch, log_path: Path
) -> bool:
    timeout_s = ProbeTiming.of(probe).timeout_s
    host = launch.pod_ip
    try:
        if (action := probe.get("exec")) is not None:
            command = list(action.get("command") or [])
            if (endpoint := _inline_health_endpoint(command, launch)) is not None:
                return await asyncio.to_thread(serving, endpoint, timeout_s)
            return await _exec(launch, command, timeout_s, log_path)
        if (action := probe.get("tcpSocket")) is not None:
            port = port_number(container, action["port"])
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(action.get("host") or host, port), timeout_s
            )
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return True
        if (action := probe.get("httpGet")) is not None:
            port = port_number(container, action["port"])
            scheme = str(action.get("scheme", "HTTP")).lower()
            url = f"{scheme}://{action.get('host') or host}:{port}{action.get('path', '/')}"
            headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, headers=headers, ssl=False) as response,
            ):
                return 200 <= response.status < 400
        if (action := probe.get("grpc")) is not None:
            endpoint = f"{host}:{port_number(container, action['port'])}"
            return await asyncio.to_thread(serving, endpoint, timeout_s)
    except (OSError, TimeoutError, aiohttp.ClientError, ValueError) as error:
        log.debug("probe of %s failed: %s", container["name"], error)
        return False
    log.warning("container %s: a probe of no known kind counts as passing", container["name"])
    return True


async def _exec(launch: Launch, command: list[str], timeout_s: float, log_path: Path) -> bool:
    try:
        argv = launch.exec_argv(command)
    except Exception as error:  # a command that cannot run here fails, as a missing binary
        log.info("exec probe %s cannot run: %s", command, error)
        return False
    with log_path.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            *argv, env=launch.env, cwd=launch.cwd, stdout=out, stderr=out,
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            return await asyncio.wait_for(process.wait(), timeout_s) == 0
        except TimeoutError:
            process.kill()
            await process.wait()
            return False


class Prober:
    """Runs one container's probes until cancelled, calling back on changes:
    `on_ready(bool)` when readiness flips, `on_unhealthy(why)` once when startup or liveness
    fails past its threshold (the kubelet then restarts the container)."""

    def __init__(
        self,
        container: JsonObject,
        launch: Launch,
        log_path: Path,
        on_ready: Callable[[bool], Awaitable[None]],
        on_unhealthy: Callable[[str], Awaitable[None]],
    ) -> None:
        self.container = container
        self.launch = launch
        self.log_path = log_path
        self.on_ready = on_ready
        self.on_unhealthy = on_unhealthy

    async def run(self) -> None:
        startup = self.container.get("startupProbe")
        if startup is not None and not await self._until_passing(startup):
            await self.on_unhealthy("startup probe failed")
            return
        readiness = self.container.get("readinessProbe")
        liveness = self.container.get("livenessProbe")
        tasks = []
        if readiness is None:
            await self.on_ready(True)
        else:
            tasks.append(asyncio.create_task(self._readiness(readiness)))
        if liveness is not None:
            tasks.append(asyncio.create_task(self._liveness(liveness)))
        try:
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _until_passing(self, probe: JsonObject) -> bool:
        """Probes until it passes success_threshold times in a row (True) or fails
        failure_threshold times in a row (False)."""
        timing = ProbeTiming.of(probe)
        await asyncio.sleep(timing.initial_delay_s)
        successes = failures = 0
        while True:
            if await probe_once(probe, self.container, self.launch, self.log_path):
                successes, failures = successes + 1, 0
                if successes >= timing.success_threshold:
                    return True
            else:
                successes, failures = 0, failures + 1
                if failures >= timing.failure_threshold:
                    return False
            await asyncio.sleep(timing.period_s)

    async def _readiness(self, probe: JsonObject) -> None:
        timing = ProbeTiming.of(probe)
        await asyncio.sleep(timing.initial_delay_s)
        ready, successes, failures = False, 0, 0
        while True:
            if await probe_once(probe, self.container, self.launch, self.log_path):
                successes, failures = successes + 1, 0
                if not ready and successes >= timing.success_threshold:
                    ready = True
                    await self.on_ready(True)
            else:
                successes, failures = 0, failures + 1
                # Not ready until the first pass; afterwards, after failure_threshold fails.
                if ready and failures >= timing.failure_threshold:
                    ready = False
                    await self.on_ready(False)
            await asyncio.sleep(timing.period_s)

    async def _liveness(self, probe: JsonObject) -> None:
        if not await self._until_failing(probe):
            return
        await self.on_unhealthy("liveness probe failed")

    async def _until_failing(self, probe: JsonObject) -> bool:
        timing = ProbeTiming.of(probe)
        await asyncio.sleep(timing.initial_delay_s)
        failures = 0
        while True:
            if await probe_once(probe, self.container, self.launch, self.log_path):
                failures = 0
            else:
                failures += 1
                if failures >= timing.failure_threshold:
                    return True
            await asyncio.sleep(timing.period_s)

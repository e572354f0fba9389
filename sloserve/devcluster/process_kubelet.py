"""A kubelet that really runs pods: each container of each pod bound to its node becomes a
local process (issue 7), so the operator, the gateway and replicas can be tested end to end on
the dev cluster without containers.

What it does for a pod:
- gives it its own loopback address (127.X.Y.Z), its pod IP, so containers' fixed ports do
  not clash; the address is free again once the pod is gone;
- fetches what the pod refers to (ConfigMaps, Secrets, PVCs, its ServiceAccount's token),
  writes its volumes into a folder of its own and starts each container's command there
  (`pod_launch.py`: which commands can run, how paths and hosts are rewritten, the env);
- runs the probes (`pod_probes.py`) and reports Ready, restarts exited or unhealthy
  containers as restartPolicy says (restartCount, lastState, CrashLoopBackOff with a short
  doubling back-off), and reports Succeeded or Failed when nothing is restarted;
- on deletion, sends SIGTERM to each container's process, SIGKILL to its whole process group
  after the grace period (capped, see ProcessKubeletSettings), and confirms the deletion to the
  API server only once the processes are gone, as the real kubelet does.

Processes die with the kubelet's thread if the test run is killed (PR_SET_PDEATHSIG), and each
runs in a session of its own, so the process group that SIGKILL reaches holds the children it
spawned (vLLM's engine core) and nothing else.

Not emulated: init containers (logged, skipped), resource limits, images (the installed
package stands in for every image), service link env variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sloserve.devcluster.cluster import DevCluster
from sloserve.devcluster.kubelet import FakeKubelet, NodeSpec, PodAddresses
from sloserve.devcluster.pod_launch import (
    Launch,
    LaunchError,
    PodSources,
    build_launch,
    decode_secret,
    materialize_volumes,
    service_account_files,
)
from sloserve.devcluster.pod_probes import Prober
from sloserve.kubeclient import ApiError, JsonObject, KubeApi

log = logging.getLogger("sloserve.devcluster.process_kubelet")

_PR_SET_PDEATHSIG = 1
POLL_S = 0.2
SOURCES_RETRY_S = 2.0
RESET_BACKOFF_AFTER_S = 60.0  # a container that ran this long restarts without back-off


def loopback_network() -> str:
    """A /24 of loopback addresses picked at random, so that two dev clusters on one machine
    (two engineers' test runs) do not hand out the same pod IPs with the same ports. Linux
    routes all of 127.0.0.0/8 to the loopback device; nothing needs configuring."""
    return f"127.{random.randint(64, 254)}.{random.randint(0, 255)}.0/24"


@dataclass(frozen=True)
class ProcessKubeletSettings:
    workdir: Path | None = None  # pod folders (volumes, logs); None: a temporary folder
    network: str | None = None  # pod IPs; None: loopback_network()
    restart_backoff_s: float = 1.0  # first restart delay, doubled per restart (real: 10 s)
    max_restart_backoff_s: float = 30.0  # (real: 300 s)
    max_grace_s: float = 30.0  # cap on terminationGracePeriodSeconds before SIGKILL
    shutdown_grace_s: float = 5.0  # SIGTERM to SIGKILL when the kubelet itself stops


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _die_with_parent() -> None:
    # Runs in the child before exec: if the kubelet's thread dies without stopping us (a test
    # run killed with SIGKILL), the kernel ends us too.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _exit_code(returncode: int) -> int:
    """A shell's exit code: 128 + N for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class ContainerRun:
    """One container's process and the state reported for it."""

    spec: JsonObject
    log_path: Path
    restart_count: int = 0
    state: JsonObject = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JsonObject = field(default_factory=dict)
    ready: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> JsonObject:
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "containerID": f"process://{self.process.pid}" if self.process else "",
            "ready": self.ready,
            "started": "running" in self.state,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class PodRun:
    pod: JsonObject
    ip: str
    folder: Path
    containers: list[ContainerRun]
    start_time: str = field(default_factory=_now)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one status patch at a time
    task: asyncio.Task[None] | None = None
    finished_phase: str | None = None  # Succeeded or Failed once nothing restarts

    @property
    def key(self) -> str:
        meta = self.pod["metadata"]
        return f"{meta['namespace']}/{meta['name']}"

    def phase(self) -> str:
        if self.finished_phase is not None:
            return self.finished_phase
        started = any("running" in c.state or c.last_state for c in self.containers)
        return "Running" if started else "Pending"

    def restart_policy(self) -> str:
        return str(self.pod["spec"].get("restartPolicy", "Always"))


class ProcessKubelet(FakeKubelet):
    def __init__(
        self,
        api: KubeApi,
        node: NodeSpec | None = None,
        settings: ProcessKubeletSettings | None = None,
    ) -> None:
        self.settings = settings or ProcessKubeletSettings()
        super().__init__(api, node, PodAddresses(self.settings.network or loopback_network()))
        self._own_workdir = self.settings.workdir is None
        self.workdir = self.settings.workdir or Path(tempfile.mkdtemp(prefix="sloserve-pods-"))
        self._runs: dict[str, PodRun] = {}  # pod uid -> its run, until its processes are gone
        self._stops: dict[str, asyncio.Task[None]] = {}
        self._confirmations: dict[str, asyncio.Task[None]] = {}

    # Looking in from tests (another thread): snapshots, no locking needed under the GIL.

    def pod_folder(self, namespace: str, name: str) -> Path | None:
        run = self._find(namespace, name)
        return None if run is None else run.folder

    def process_id(self, namespace: str, name: str, container: str | None = None) -> int | None:
        """The pid of a running container's process (the pod's first container by default)."""
        run = self._find(namespace, name)
        if run is None:
            return None
        for c in run.containers:
            if (container is None or c.name == container) and c.process and c.alive():
                return c.process.pid
        return None

    def running_processes(self) -> dict[str, int]:
        """'namespace/pod/container' -> pid of every process alive now."""
        return {
            f"{run.key}/{c.name}": c.process.pid
            for run in list(self._runs.values())
            for c in run.containers
            if c.process is not None and c.alive()
        }

    def _find(self, namespace: str, name: str) -> PodRun | None:
        for run in list(self._runs.values()):
            if run.key == f"{namespace}/{name}":
                return run
        return None

    # The seam.

    async def start_pod(self, pod: JsonObject) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if pod["spec"].get("initContainers"):
            log.warning("pod %s/%s: init containers are not run", meta["namespace"], meta["name"])
        folder = self.workdir / f"{meta['namespace']}_{meta['name']}_{uid[:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        run = PodRun(
            pod=pod,
            ip=self.addresses.assign(uid),
            folder=folder,
            containers=[
                ContainerRun(spec=c, log_path=folder / f"{c['name']}.log")
                for c in pod["spec"]["containers"]
            ],
        )
        self._runs[uid] = run
        run.task = asyncio.create_task(self._run_pod(run), name=f"pod {run.key}")

    async def stop_pod(self, pod: JsonObject) -> None:
        uid = pod["metadata"]["uid"]
        run = self._runs.get(uid)
        if run is None or uid in self._stops:
            return
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        grace_s = min(float(grace), self.settings.max_grace_s)
        self._stops[uid] = asyncio.create_task(self._stop(uid, run, grace_s))

    async def _confirm_deletion(self, pod: JsonObject) -> None:
        # The pod stays Terminating until its processes are gone, as with the real kubelet;
        # the watch must not wait for that, so the confirmation follows the stop in a task.
        uid = pod["metadata"]["uid"]
        stopping = self._stops.get(uid)
        if stopping is None:
            await super()._confirm_deletion(pod)
        elif uid not in self._confirmations:
            self._confirmations[uid] = asyncio.create_task(self._confirm_after(stopping, pod))

    async def _confirm_after(self, stopping: asyncio.Task[None], pod: JsonObject) -> None:
        try:
            await asyncio.shield(stopping)
            await super()._confirm_deletion(pod)
        except ApiError as error:
            log.info("pod %s: deletion not confirmed: %s", pod["metadata"]["name"], error)
        finally:
            self._confirmations.pop(pod["metadata"]["uid"], None)

    async def close(self) -> None:
        """Stops every pod's processes (short grace), then the kubelet."""
        for uid, run in list(self._runs.items()):
            if uid not in self._stops:
                self._stops[uid] = asyncio.create_task(
                    self._stop(uid, run, self.settings.shutdown_grace_s)
                )
        await asyncio.gather(*self._stops.values(), return_exceptions=True)
        for task in self._confirmations.values():
            task.cancel()
        await asyncio.gather(*self._confirmations.values(), return_exceptions=True)
        self._started.clear()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def _stop(self, uid: str, run: PodRun, grace_s: float) -> None:
        run.stopping.set()
        try:
            await asyncio.gather(*(_terminate(c, grace_s) for c in run.containers))
            if run.task is not None:
                run.task.cancel()
                await asyncio.gather(run.task, return_exceptions=True)
        finally:
            self._runs.pop(uid, None)
            self.addresses.release(uid)
            self._stops.pop(uid, None)

    # A pod's life.

    async def _run_pod(self, run: PodRun) -> None:
        try:
            launches = await self._prepare(run)
            if launches is None:
                return  # stopped while waiting for what the pod refers to
            await asyncio.gather(
                *(
                    self._supervise(run, c, launch)
                    for c, launch in zip(run.containers, launches, strict=True)
                )
            )
            failed = any(c.state.get("terminated", {}).get("exitCode", 0) for c in run.containers)
            run.finished_phase = "Failed" if failed else "Succeeded"
            await self._publish(run)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod %s failed in the kubelet", run.key)

    async def _prepare(self, run: PodRun) -> list[Launch] | None:
        """The containers' launches, once everything they need exists (retried meanwhile)."""
        await self._publish(run)
        while not run.stopping.is_set():
            try:
                sources = await self._fetch_sources(run)
                volumes = materialize_volumes(run.pod, sources, run.folder)
                return [
                    build_launch(run.pod, c.spec, sources, run.ip, run.folder, volumes)
                    for c in run.containers
                ]
            except LaunchError as error:
                for c in run.containers:
                    c.state = {"waiting": {"reason": error.reason, "message": str(error)}}
                await self._publish(run)
                if error.reason == "CreateContainerError":  # a command that cannot run here
                    log.warning("pod %s cannot run: %s", run.key, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.stopping.wait(), SOURCES_RETRY_S)
        return None

    async def _fetch_sources(self, run: PodRun) -> PodSources:
        pod = run.pod
        namespace, spec = pod["metadata"]["namespace"], pod["spec"]
        config_maps: set[str] = set()
        secrets: set[str] = set()
        claims: set[str] = set()
        for volume in spec.get("volumes") or []:
            if "configMap" in volume:
                config_maps.add(volume["configMap"]["name"])
            elif "secret" in volume:
                secrets.add(volume["secret"]["secretName"])
            elif "persistentVolumeClaim" in volume:
                claims.add(volume["persistentVolumeClaim"]["claimName"])
        for container in spec["containers"]:
            for source in container.get("envFrom") or []:
                if "configMapRef" in source:
                    config_maps.add(source["configMapRef"]["name"])
                if "secretRef" in source:
                    secrets.add(source["secretRef"]["name"])
            for variable in container.get("env") or []:
                value_from = variable.get("valueFrom") or {}
                if "configMapKeyRef" in value_from:
                    config_maps.add(value_from["configMapKeyRef"]["name"])
                if "secretKeyRef" in value_from:
                    secrets.add(value_from["secretKeyRef"]["name"])
        base = f"/api/v1/namespaces/{namespace}"
        found_maps = {}
        for name in config_maps:
            if (obj := await self.api.get(f"{base}/configmaps/{name}")) is not None:
                found_maps[name] = {k: str(v) for k, v in (obj.get("data") or {}).items()}
        found_secrets = {}
        for name in secrets:
            if (obj := await self.api.get(f"{base}/secrets/{name}")) is not None:
                found_secrets[name] = decode_secret(obj)
        claim_paths = {}
        for name in claims:
            if (path := await self._claim_path(base, name)) is not None:
                claim_paths[name] = path
        return PodSources(
            config_maps=found_maps,
            secrets=found_secrets,
            claim_paths=claim_paths,
            kubeconfig=await self._service_account(run),
        )

    async def _claim_path(self, base: str, claim: str) -> str | None:
        pvc = await self.api.get(f"{base}/persistentvolumeclaims/{claim}")
        volume_name = None if pvc is None else pvc.get("spec", {}).get("volumeName")
        if not volume_name:
            raise LaunchError("CreateContainerConfigError", f"PVC {claim!r} is not bound")
        pv = await self.api.get(f"/api/v1/persistentvolumes/{volume_name}")
        spec = (pv or {}).get("spec", {})
        source = spec.get("hostPath") or spec.get("local") or {}
        path = source.get("path")
        return None if path is None else str(path)

    async def _service_account(self, run: PodRun) -> Path | None:
        """A kubeconfig with the pod's ServiceAccount token, unless the pod opts out."""
        namespace, spec = run.pod["metadata"]["namespace"], run.pod["spec"]
        name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        account = await self.api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            automount = (
                True if account is None else account.get("automountServiceAccountToken", True)
            )
        if not automount:
            return None
        if account is None:
            raise LaunchError("CreateContainerConfigError", f"ServiceAccount {name!r} not found")
        ca_file = self.api.access.ca_file
        if ca_file is None:  # never so: the dev cluster hands its kubelet its CA
            raise LaunchError("CreateContainerConfigError", "the kubelet knows no API CA file")
        # 1.20's token controller makes one token Secret per account and lists it here.
        for ref in account.get("secrets") or []:
            secret = await self.api.get(f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
            if secret is not None and secret.get("type") == "kubernetes.io/service-account-token":
                token = decode_secret(secret).get("token")
                if token:
                    return service_account_files(
                        run.folder / "serviceaccount",
                        self.api.access.server,
                        Path(ca_file),
                        namespace,
                        token.decode(),
                    )
        raise LaunchError(
            "CreateContainerConfigError", f"ServiceAccount {name!r} has no token Secret yet"
        )

    async def _supervise(self, run: PodRun, c: ContainerRun, launch: Launch) -> None:
        """Runs one container, restarting it as the pod's restartPolicy says."""
        backoff = self.settings.restart_backoff_s
        while not run.stopping.is_set():
            started = time.monotonic()
            unhealthy = asyncio.Event()
            code = await self._run_once(run, c, launch, unhealthy)
            if run.stopping.is_set():
                return
            policy = run.restart_policy()
            if policy == "Never" or (
                policy == "OnFailure" and code == 0 and not unhealthy.is_set()
            ):
                return
            if time.monotonic() - started > RESET_BACKOFF_AFTER_S:
                backoff = self.settings.restart_backoff_s
            c.last_state, c.restart_count = c.state, c.restart_count + 1
            c.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {backoff:g}s restarting failed container {c.name}",
                }
            }
            await self._publish(run)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.stopping.wait(), backoff)
            backoff = min(backoff * 2, self.settings.max_restart_backoff_s)

    async def _run_once(
        self, run: PodRun, c: ContainerRun, launch: Launch, unhealthy: asyncio.Event
    ) -> int:
        """Starts the container's process, probes it until it exits (or is killed for
        failing its probes); returns its exit code."""
        started_at = _now()
        with c.log_path.open("ab") as out:
            out.write(f"--- {started_at} start #{c.restart_count}: {launch.argv}\n".encode())
            out.flush()
            c.process = subprocess.Popen(
                launch.argv, env=launch.env, cwd=launch.cwd, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        c.state, c.ready = {"running": {"startedAt": started_at}}, False
        await self._publish(run)
        reason = ""

        async def ready_changed(ready: bool) -> None:
            c.ready = ready
            await self._publish(run)

        async def failed(why: str) -> None:
            nonlocal reason
            reason = why
            unhealthy.set()

        prober = asyncio.create_task(
            Prober(c.spec, launch, c.log_path, ready_changed, failed).run()
        )
        try:
            while c.process.poll() is None and not unhealthy.is_set():
                await asyncio.sleep(POLL_S)
            if unhealthy.is_set():
                log.info("pod %s container %s: %s; restarting it", run.key, c.name, reason)
                grace = float(run.pod["spec"].get("terminationGracePeriodSeconds", 30))
                await _terminate(c, min(grace, self.settings.max_grace_s))
        finally:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        _kill_group(c)
        code = _exit_code(c.process.wait())
        c.ready = False
        c.state = {
            "terminated": {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "message": reason,
                "startedAt": started_at,
                "finishedAt": _now(),
            }
        }
        if not run.stopping.is_set():
            await self._publish(run)
        return code

    async def _publish(self, run: PodRun) -> None:
        async with run.lock:
            if run.stopping.is_set() and run.finished_phase is None:
                return  # being deleted: what the pod says no longer matters
            now = _now()
            ready = "True" if all(c.ready for c in run.containers) else "False"
            status: JsonObject = {
                "phase": run.phase(),
                "hostIP": self.node.address,
                "podIP": run.ip,
                "podIPs": [{"ip": run.ip}],
                "startTime": run.start_time,
                "conditions": [
                    {"type": kind, "status": value, "lastTransitionTime": now}
                    for kind, value in (
                        ("Initialized", "True"),
                        ("PodScheduled", "True"),
                        ("ContainersReady", ready),
                        ("Ready", ready),
                    )
                ],
                "containerStatuses": [c.status() for c in run.containers],
            }
            try:
                await self._patch_pod_status(run.pod, status)
            except ApiError as error:  # gone meanwhile; its deletion is on its way
                log.info("pod %s: status not written: %s", run.key, error)


async def _terminate(c: ContainerRun, grace_s: float) -> None:
    """SIGTERM to the container's main process (as to a container's PID 1), then SIGKILL to
    its whole process group after `grace_s`."""
    process = c.process
    if process is not None and process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
    _kill_group(c)
    if process is not None:
        while process.poll() is None:
            await asyncio.sleep(POLL_S / 4)


def _kill_group(c: ContainerRun) -> None:
    """SIGKILL whatever is left of the container: its process and their children (vLLM's
    engine core outlives a killed API process otherwise)."""
    process = c.process
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class ProcessDevCluster(DevCluster):
    """A dev cluster whose node runs its pods as processes; `kubelet` is that kubelet once
    started (for tests that look at the processes)."""

    def __init__(
        self,
        workdir: Path | None = None,
        node: NodeSpec | None = None,
        settings: ProcessKubeletSettings | None = None,
    ) -> None:
        self.kubelet: ProcessKubelet | None = None

        def make(api: KubeApi, node: NodeSpec) -> FakeKubelet:
            self.kubelet = ProcessKubelet(api, node, settings)
            return self.kubelet

        super().__init__(workdir, node, kubelet=make)

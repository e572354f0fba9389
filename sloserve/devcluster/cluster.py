"""The dev cluster: the control plane, plus a kubelet running in a background thread (its
own event loop), so synchronous callers (pytest fixtures, the CLI) can use it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from sloserve.devcluster.controlplane import ClusterAccess, ControlPlane, ControlPlaneError
from sloserve.devcluster.kubelet import FakeKubelet, NodeSpec
from sloserve.kubeclient import ApiAccess, KubeApi

KubeletFactory = Callable[[KubeApi, NodeSpec], FakeKubelet]
KUBELET_STOP_TIMEOUT_S = 10.0


class DevCluster:
    """Starts the control plane and a kubelet; start() returns once the node is Ready.

    `kubelet` picks the kubelet class (a FakeKubelet subclass that runs pods, for one).
    """

    def __init__(
        self,
        workdir: Path | None = None,
        node: NodeSpec | None = None,
        kubelet: KubeletFactory = FakeKubelet,
    ) -> None:
        self.control_plane = ControlPlane(workdir)
        self.node = node or NodeSpec()
        self._kubelet_factory = kubelet
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Created here, used in the kubelet's loop: an asyncio.Event binds to a loop only
        # when awaited, and set() before that still counts.
        self._stop = asyncio.Event()
        self._node_ready = threading.Event()
        self._kubelet_error: BaseException | None = None

    def start(self, timeout_s: float = 60.0) -> ClusterAccess:
        access = self.control_plane.start(timeout_s)
        try:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._run_kubelet,
                args=(self._loop, access),
                name="devcluster-kubelet",
                daemon=True,
            )
            self._thread.start()
            if not self._node_ready.wait(timeout_s) or self._kubelet_error is not None:
                raise ControlPlaneError(
                    f"the kubelet did not register node {self.node.name}: "
                    f"{self._kubelet_error or 'timed out'}"
                )
        except BaseException:
            self.stop()
            raise
        return access

    def stop(self) -> None:
        """Stops the kubelet (and so its pods), then the control plane."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None:
            # RuntimeError: the loop closed meanwhile, the kubelet has already ended.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._stop.set)
            thread.join(KUBELET_STOP_TIMEOUT_S)
        elif loop is not None:
            loop.close()  # start() failed before the kubelet's thread began
        self._loop = self._thread = None
        self.control_plane.stop()

    def check_running(self) -> None:
        """Raises ControlPlaneError if a process or the kubelet has failed."""
        self.control_plane.check_running()
        if self._kubelet_error is not None:
            raise ControlPlaneError(f"the kubelet failed: {self._kubelet_error!r}")

    def __enter__(self) -> ClusterAccess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run_kubelet(self, loop: asyncio.AbstractEventLoop, access: ClusterAccess) -> None:
        try:
            loop.run_until_complete(self._kubelet_main(access))
        except BaseException as error:  # reported through start() and check_running()
            self._kubelet_error = error
            self._node_ready.set()  # wake start() so it raises instead of waiting
        finally:
            loop.close()

    async def _kubelet_main(self, access: ClusterAccess) -> None:
        async with KubeApi(ApiAccess(access.server, access.token, access.ca_file)) as api:
            kubelet = self._kubelet_factory(api, self.node)
            running = asyncio.create_task(kubelet.run(on_ready=self._node_ready.set))
            stopping = asyncio.create_task(self._stop.wait())
            try:
                await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (running, stopping):
                    task.cancel()
                await asyncio.gather(running, stopping, return_exceptions=True)
                await kubelet.close()
            error = None if running.cancelled() else running.exception()
            if error is not None:
                raise error

"""`sloserve up --backend ray`: the replicas placed as Ray actors, on a local Ray started here
or on the cluster at `--ray-address`; the gateway stays a local process and is given the
endpoints the actors report (a static list: actors do not move).

Each actor runs one `sloserve replica` *process* on its node rather than the server inside the
actor: vLLM starts its engine core as a child process and installs signal handlers, which sit
badly inside a Ray worker; as a process the replica is exactly what runs everywhere else, with
its own SIGTERM drain. The actor picks a free port on its node's address, starts the process
in a session of its own (so the engine core can be killed with it) that dies with the actor
(PR_SET_PDEATHSIG), and answers `exit_code`/`stop`. Actors are spread across nodes (SPREAD).

On a cluster, every node needs sloserve installed and the model at the same path; the
gateway's machine must reach the nodes' addresses.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sloserve.cpu_cores import replica_core_args

_PR_SET_PDEATHSIG = 1
ACTOR_NAME_PREFIX = "sloserve-replica"


def _die_with_parent() -> None:
    # Runs in the replica process before exec: if the actor's worker dies (ray.kill, a lost
    # node, the driver gone), the kernel ends the replica too.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# Ray replaces 127.0.0.1 (and localhost) by the machine's network address, so a local Ray
# given it would advertise that address for its GCS, raylet and workers. Any other loopback
# address is taken as it is: every address this Ray hands out is then loopback.
LOCAL_RAY_ADDRESS = "127.0.0.2"


class ReplicaHost:
    """The body of one replica actor (wrapped with ray.remote by RayReplicas)."""

    def __init__(self, name: str, replica_args: Sequence[str], log_dir: str) -> None:
        self.name = name
        self.replica_args = list(replica_args)
        folder = Path(log_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:  # another node's folder: keep the log on this node instead
            folder = Path(tempfile.mkdtemp(prefix="sloserve-ray-"))
        self.log_path = folder / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, host: str | None = None) -> str:
        """Starts the replica on `host` (default: the node's address); returns HOST:PORT (it
        serves once its engine is up)."""
        import ray

        if host is None:
            host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]  # Ray's own
        port = _free_port(host)
        command = [
            sys.executable, "-m", "sloserve", "replica", "--host", host, "--port", str(port),
            "--metrics-port", "-1", *self.replica_args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        return f"{host}:{port}"

    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM (the replica drains), SIGKILL to its process group after `timeout_s`."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the engine core, if it outlived it
        return process.wait()


class RayBackendError(RuntimeError):
    pass


class RayReplicas:
    """N replica actors: start() places them and returns their endpoints; stop() ends them,
    and the local Ray if this process started it."""

    def __init__(
        self,
        replica_args: Sequence[str],
        replicas: int,
        log_dir: Path,
        address: str | None = None,
        cpus_per_replica: float = 1.0,
        gpus_per_replica: float = 0.0,
    ) -> None:
        self.replica_args = list(replica_args)
        self.replicas = replicas
        self.log_dir = log_dir
        self.address = address
        self.cpus_per_replica = cpus_per_replica
        self.gpus_per_replica = gpus_per_replica
        self.actors: list[Any] = []
        self.endpoints: list[str] = []
        self._started_ray = False

    def start(self, timeout_s: float = 120.0) -> list[str]:
        try:
            import ray
        except ImportError:
            raise RayBackendError(
                "--backend ray needs Ray: pip install 'sloserve[ray]' (or pip install ray)"
            ) from None
        # A local Ray advertises a loopback address, and its replicas bind it; on a cluster
        # each replica binds its node's address (what get_node_ip_address says there).
        host = None if self.address else LOCAL_RAY_ADDRESS
        if self.address:
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            # Loopback only, no dashboard: a private Ray for this stack (about 2 s to start).
            ray.init(
                num_cpus=max(2, int(self.replicas * self.cpus_per_replica + 0.999)),
                _node_ip_address=LOCAL_RAY_ADDRESS,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        self._started_ray = True
        actor_class = ray.remote(
            num_cpus=self.cpus_per_replica, num_gpus=self.gpus_per_replica, max_restarts=0
        )(ReplicaHost)
        # A local Ray puts every replica on this machine, where vLLM would compute them all on
        # the same cores (sloserve/cpu_cores.py); a cluster's nodes bind their own.
        cores = replica_core_args(self.replicas) if not self.address else [[]] * self.replicas
        self.actors = [
            actor_class.options(
                name=f"{ACTOR_NAME_PREFIX}-{os.getpid()}-{i}", scheduling_strategy="SPREAD"
            ).remote(f"replica-{i}", [*self.replica_args, *cores[i]], str(self.log_dir))
            for i in range(self.replicas)
        ]
        try:
            self.endpoints = list(
                ray.get([actor.start.remote(host) for actor in self.actors], timeout=timeout_s)
            )
        except ray.exceptions.GetTimeoutError:
            raise RayBackendError(
                f"the replica actors were not placed within {timeout_s:.0f} s: does the Ray "
                f"cluster have {self.cpus_per_replica:g} CPU(s) and "
                f"{self.gpus_per_replica:g} GPU(s) free per replica?"
            ) from None
        return self.endpoints

    def problem(self) -> str | None:
        """Why a replica is gone (its process exited, its actor died), or None."""
        import ray

        for i, actor in enumerate(self.actors):
            try:
                code = ray.get(actor.exit_code.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
                return f"replica-{i}'s actor is gone: {type(error).__name__}"
            if code is not None:
                tail = ray.get(actor.log_tail.remote(), timeout=30)
                return f"replica-{i} exited with code {code}; its log ends:\n{tail}"
        return None

    def pids(self) -> list[int | None]:
        import ray

        return list(ray.get([actor.pid.remote() for actor in self.actors], timeout=30))

    def stop(self, timeout_s: float = 60.0) -> None:
        if not self._started_ray:
            return
        import ray

        try:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get([a.stop.remote(timeout_s) for a in self.actors], timeout=timeout_s + 10)
            for actor in self.actors:
                with contextlib.suppress(ray.exceptions.RayError, ValueError):
                    ray.kill(actor)
        finally:
            self.actors = []
            # Ends the local Ray's processes when ray.init started them; disconnects otherwise.
            ray.shutdown()
            self._started_ray = False

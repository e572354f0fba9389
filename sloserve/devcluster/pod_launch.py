"""How a pod's container becomes a local process (for the process kubelet, process_kubelet.py).

There is no image, no mount namespace and no network namespace, so the container's view of
the world is emulated by rewriting what it is told:

- **Command.** Only the installed package can run: `sloserve ...` resolves to this
  environment's `sloserve` script, `python`/`python3` (e.g. `python -m sloserve ...`) to this
  interpreter. Anything else (an image's own entrypoint, a shell) is refused with a message,
  since nothing here would match what the image holds. `$(VAR)` references in command and
  args are expanded from the container's environment, as Kubernetes does.
- **Network.** Each pod has its own loopback address (its pod IP), so containers' fixed ports
  do not clash. A container that binds the wildcard address (`0.0.0.0`) or talks to its own
  `localhost`/`127.0.0.1` means the pod's own network namespace: those hosts, where they stand
  as a whole word in args, env values and exec probes, become the pod IP.
- **Volumes.** Each volume is a folder under the pod's directory: configMap and secret
  volumes are written out (keys or `items`), emptyDir is an empty folder, hostPath is the
  host path itself, and a persistentVolumeClaim is its bound PersistentVolume's hostPath or
  local path when it has one. A volume mount's `mountPath` is then rewritten to that folder
  wherever it appears as a path in args, env values and exec probes (longest mount first;
  `subPath` honored). A program that finds its files some other way (a path compiled in)
  does not see them: that is the limitation.
- **Environment.** The host's environment is inherited, as an image would bring PATH, HOME
  and locale, except Kubernetes variables (KUBECONFIG, KUBERNETES_*), then the container's
  own: `value`, `valueFrom` fieldRef (metadata.name/namespace/uid/labels/annotations,
  spec.nodeName/serviceAccountName, status.podIP/hostIP), configMapKeyRef, secretKeyRef,
  and `envFrom`. Service link variables (FOO_SERVICE_HOST) are not set.
- **API access.** See `service_account_files`: the pod's ServiceAccount token becomes a
  kubeconfig named by $KUBECONFIG.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

JsonObject = dict[str, Any]

SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# Hosts that mean "this pod" inside a container; whole words only (not 10.0.0.0, not
# 127.0.0.10).
_OWN_HOSTS = re.compile(r"(?<![\w.-])(?:0\.0\.0\.0|127\.0\.0\.1|localhost)(?![\w.-])")
_VAR_REFERENCE = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
_DROPPED_HOST_ENV = ("KUBECONFIG",)
_DROPPED_HOST_ENV_PREFIXES = ("KUBERNETES_",)


class LaunchError(Exception):
    """The container cannot run as a local process here; the message says why (it becomes
    the container's waiting message in the pod's status)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # CreateContainerError, CreateContainerConfigError


@dataclass(frozen=True)
class PodSources:
    """What the pod refers to in the API, fetched beforehand (launching is then pure)."""

    config_maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    secrets: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)
    claim_paths: Mapping[str, str] = field(default_factory=dict)  # PVC name -> host path
    kubeconfig: Path | None = None  # the pod's ServiceAccount, when it gets API access


@dataclass(frozen=True)
class Launch:
    """One container as a process: what to run, with what, where."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    mounts: tuple[tuple[str, Path], ...]  # (mountPath, folder), longest mountPath first
    pod_ip: str

    def rewrite(self, text: str) -> str:
        """A string the container was given, as seen from outside its namespaces."""
        return rewrite(text, self.mounts, self.pod_ip)

    def exec_argv(self, command: Sequence[str]) -> list[str]:
        """An exec probe's command, run like the container's own."""
        return resolve_command([self.rewrite(part) for part in command])


def rewrite(text: str, mounts: Sequence[tuple[str, Path]], pod_ip: str) -> str:
    for mount_path, folder in mounts:
        pattern = re.compile(
            r"(?<![\w.-])" + re.escape(mount_path.rstrip("/")) + r"(?=/|$|[^\w.-])"
        )
        # A function, not a replacement string: the folder is not a regex template.
        text = pattern.sub(_constant(str(folder)), text)
    return _OWN_HOSTS.sub(pod_ip, text)


def _constant(value: str) -> Callable[[re.Match[str]], str]:
    return lambda _: value


def resolve_command(argv: Sequence[str]) -> list[str]:
    """argv with its program resolved to this environment's, or LaunchError."""
    if not argv:
        raise LaunchError(
            "CreateContainerError",
            "the container names no command: an image's entrypoint cannot run here; give "
            "`command: [sloserve]` (or `python -m sloserve`)",
        )
    program, *rest = argv
    name = Path(program).name
    if name == "sloserve":
        script = Path(sys.executable).with_name("sloserve")
        resolved = [str(script)] if script.exists() else [sys.executable, "-m", "sloserve"]
        return [*resolved, *rest]
    if re.fullmatch(r"python(3(\.\d+)?)?", name):
        return [sys.executable, *rest]
    raise LaunchError(
        "CreateContainerError",
        f"command {program!r} cannot run here: only `sloserve ...` and `python ...` run as "
        "local processes (the installed package stands in for the image)",
    )


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is replaced, an undefined reference
    is left as it is, and $$ is a literal $."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _VAR_REFERENCE.sub(one, text)


def field_value(pod: JsonObject, path: str) -> str:
    """A downward-API fieldRef's value."""
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        return str(simple[path] or "")
    if match := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise LaunchError("CreateContainerConfigError", f"fieldRef {path!r} is not supported here")


def _key_ref(
    sources: Mapping[str, Mapping[str, str | bytes]], ref: JsonObject, kind: str
) -> str | None:
    data = sources.get(ref["name"])
    value = None if data is None else data.get(ref["key"])
    if value is None:
        if ref.get("optional"):
            return None
        raise LaunchError(
            "CreateContainerConfigError", f"{kind} {ref['name']!r} has no key {ref['key']!r}"
        )
    return value.decode() if isinstance(value, bytes) else value


def container_env(
    pod: JsonObject, container: JsonObject, sources: PodSources, pod_ip: str
) -> dict[str, str]:
    """The container's own variables (not the inherited ones), in Kubernetes' order."""
    pod = {**pod, "status": {**pod.get("status", {}), "podIP": pod_ip}}
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        if ref := source.get("configMapRef"):
            data: Mapping[str, str | bytes] | None = sources.config_maps.get(ref["name"])
        elif ref := source.get("secretRef"):
            data = sources.secrets.get(ref["name"])
        else:
            continue
        if data is None:
            if ref.get("optional"):
                continue
            raise LaunchError("CreateContainerConfigError", f"envFrom: {ref['name']!r} not found")
        for key, item in data.items():
            env[prefix + key] = item.decode() if isinstance(item, bytes) else item
    for variable in container.get("env") or []:
        name, value_from = variable["name"], variable.get("valueFrom")
        value: str | None
        if value_from is None:
            value = expand(variable.get("value", ""), env)
        elif "fieldRef" in value_from:
            value = field_value(pod, value_from["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in value_from:
            value = _key_ref(sources.config_maps, value_from["configMapKeyRef"], "ConfigMap")
        elif "secretKeyRef" in value_from:
            value = _key_ref(sources.secrets, value_from["secretKeyRef"], "Secret")
        elif "resourceFieldRef" in value_from:
            value = "0"  # no resource limits are enforced on a local process
        else:
            raise LaunchError("CreateContainerConfigError", f"env {name}: unsupported valueFrom")
        if value is not None:
            env[name] = value
    return env


def _write_files(folder: Path, files: Mapping[str, bytes], items: Sequence[JsonObject]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    chosen = {item["key"]: item["path"] for item in items} if items else {k: k for k in files}
    for key, relative in chosen.items():
        if key not in files:
            raise LaunchError("CreateContainerConfigError", f"volume has no key {key!r}")
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[key])


def materialize_volumes(pod: JsonObject, sources: PodSources, pod_dir: Path) -> dict[str, Path]:
    """Each supported volume of the pod as a folder: volume name -> folder."""
    folders: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        folder = pod_dir / "volumes" / name
        if (ref := volume.get("configMap")) is not None:
            data = sources.config_maps.get(ref["name"])
            if data is None and not ref.get("optional"):
                raise LaunchError(
                    "CreateContainerConfigError", f"ConfigMap {ref['name']!r} not found"
                )
            encoded = {k: v.encode() for k, v in (data or {}).items()}
            _write_files(folder, encoded, ref.get("items") or [])
        elif (ref := volume.get("secret")) is not None:
            secret = sources.secrets.get(ref["secretName"])
            if secret is None and not ref.get("optional"):
                raise LaunchError(
                    "CreateContainerConfigError", f"Secret {ref['secretName']!r} not found"
                )
            _write_files(folder, secret or {}, ref.get("items") or [])
        elif "emptyDir" in volume:
            folder.mkdir(parents=True, exist_ok=True)
        elif (ref := volume.get("hostPath")) is not None:
            folder = Path(ref["path"])
        elif (ref := volume.get("persistentVolumeClaim")) is not None:
            host_path = sources.claim_paths.get(ref["claimName"])
            if host_path is None:
                continue  # no host folder behind it: the mount stays unmapped
            folder = Path(host_path)
        else:
            continue  # downwardAPI, projected, ...: not emulated
        folders[name] = folder
    return folders


def container_mounts(container: JsonObject, volumes: Mapping[str, Path]) -> list[tuple[str, Path]]:
    mounts = []
    for mount in container.get("volumeMounts") or []:
        folder = volumes.get(mount["name"])
        if folder is not None:
            mounts.append((mount["mountPath"], folder / mount.get("subPath", "")))
    return mounts


def build_launch(
    pod: JsonObject,
    container: JsonObject,
    sources: PodSources,
    pod_ip: str,
    pod_dir: Path,
    volumes: Mapping[str, Path],
) -> Launch:
    """The process for one container; LaunchError if it cannot run here."""
    mounts = container_mounts(container, volumes)
    if sources.kubeconfig is not None:
        mounts.append((SERVICE_ACCOUNT_MOUNT, sources.kubeconfig.parent))
    mounts.sort(key=lambda m: len(m[0]), reverse=True)
    own_env = container_env(pod, container, sources, pod_ip)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _DROPPED_HOST_ENV and not key.startswith(_DROPPED_HOST_ENV_PREFIXES)
    }
    env["HOSTNAME"] = pod["metadata"]["name"]
    if sources.kubeconfig is not None:
        env["KUBECONFIG"] = str(sources.kubeconfig)
    for mount_path, folder in mounts:
        if mount_path.rstrip("/") == "/tmp":  # programs find /tmp through TMPDIR
            env["TMPDIR"] = str(folder)
    env.update({k: rewrite(v, mounts, pod_ip) for k, v in own_env.items()})
    argv = [
        rewrite(expand(part, own_env), mounts, pod_ip)
        for part in [*(container.get("command") or []), *(container.get("args") or [])]
    ]
    working_dir = container.get("workingDir")
    cwd = Path(rewrite(working_dir, mounts, pod_ip)) if working_dir else pod_dir
    return Launch(
        argv=resolve_command(argv),
        env=env,
        cwd=cwd if cwd.is_dir() else pod_dir,
        mounts=tuple(mounts),
        pod_ip=pod_ip,
    )


def service_account_files(
    folder: Path, server: str, ca_file: Path, namespace: str, token: str
) -> Path:
    """What a pod's ServiceAccount mount holds (token, ca.crt, namespace), plus a kubeconfig
    with the same token; returns the kubeconfig's path.

    Why a kubeconfig: in-cluster clients find the API through KUBERNETES_SERVICE_HOST/PORT and
    the fixed path /var/run/secrets/kubernetes.io/serviceaccount, which a local process cannot
    have as its own; every client we run (the gateway's discovery, kopf, kubectl, the
    `kubernetes` package) reads $KUBECONFIG instead. The token is the ServiceAccount's own, so
    RBAC applies to the process exactly as to the pod.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "token").write_text(token)
    (folder / "namespace").write_text(namespace)
    shutil.copyfile(ca_file, folder / "ca.crt")
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "in-cluster",
                "cluster": {"server": server, "certificate-authority": str(folder / "ca.crt")},
            }
        ],
        # Inline: every client reads `token`; not all read `tokenFile`. Secret-based tokens
        # do not rotate, so a copy does not go stale.
        "users": [{"name": "service-account", "user": {"token": token}}],
        "contexts": [
            {
                "name": "in-cluster",
                "context": {
                    "cluster": "in-cluster",
                    "user": "service-account",
                    "namespace": namespace,
                },
            }
        ],
        "current-context": "in-cluster",
    }
    path = folder / "kubeconfig"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def decode_secret(secret: JsonObject) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data

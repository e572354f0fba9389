"""The kopf handlers: what the operator reacts to.

- startup/cleanup: build and close the runtime (API client, resync loop) on kopf's loop;
- login: a service account in a pod, else the kubeconfig (read when called, not imported);
- SLOService resume/create/update: reconcile; a transient failure is retried by kopf;
- child events: a child edited or deleted by hand nudges its owner's reconcile.
No delete handler and no timer: both would make kopf put a finalizer on every SLOService,
and owner references already let the garbage collector remove the children.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from typing import Any

import kopf

from sloserve.kubeclient import ApiAccess, ApiError, KubeApi
from sloserve.operator.crd import GROUP, PLURAL, VERSION
from sloserve.operator.naming import MANAGED_BY, owner_name
from sloserve.operator.reconcile import RetryLater, reconcile
from sloserve.operator.resync import Nudges, resync_forever
from sloserve.operator.runtime import Runtime, config

# Annotations kopf keeps on each SLOService (handler progress, last handled spec), under the
# project's own prefix rather than kopf.zalando.org.
ANNOTATION_PREFIX = "operator.sloserve.io"

_CHILD_KINDS = (
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("", "v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
)


def _credentials(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _access_of(info: kopf.ConnectionInfo) -> ApiAccess:
    """The operator's own calls go with the credentials kopf logged in with."""

    def path(value: str | bytes | os.PathLike[str] | os.PathLike[bytes] | None) -> str | None:
        return None if value is None else os.fsdecode(value)

    certificate = path(info.certificate_path)
    # Inline CA data is base64, as kubeconfig's certificate-authority-data is.
    ca_data = base64.b64decode(info.ca_data).decode() if info.ca_data else None
    return ApiAccess(
        server=str(info.server),
        token=info.token,
        ca_file=path(info.ca_path),
        ca_data=ca_data,
        client_cert=(certificate, path(info.private_key_path)) if certificate else None,
        verify=not info.insecure,
    )


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return _credentials(**kwargs)


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings,
    memo: kopf.Memo,
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # k8s Events for problems only
    info = _credentials(settings=settings, logger=logger)
    if info is None:
        raise kopf.PermanentError("no credentials: neither a service account nor a kubeconfig")
    cfg = config()
    api = KubeApi(_access_of(info))
    pdb = "policy/v1" if await api.serves("policy/v1") else "policy/v1beta1"
    rt = Runtime(cfg, api, cfg.reader_factory(api), pdb)
    memo["runtime"] = rt
    memo["nudges"] = Nudges(rt)
    memo["resync"] = asyncio.create_task(resync_forever(rt))
    logger.info("sloserve operator: PDBs as %s, resync every %gs", pdb, cfg.resync_s)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo["nudges"].cancel()
    memo["resync"].cancel()
    await memo["runtime"].api.close()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile_sloservice(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    rt: Runtime = memo["runtime"]
    try:
        await reconcile(rt, body)
    except RetryLater as error:
        raise kopf.TemporaryError(str(error), delay=rt.config.retry_delay_s) from error
    except ApiError as error:
        # A failed /scale or /status write: retried as soon as the apply failures are, not after
        # kopf's default delay for arbitrary exceptions (60 s).
        if error.retryable:
            raise kopf.TemporaryError(str(error), delay=rt.config.retry_delay_s) from error
        raise


async def _on_child_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    owner = owner_name(body)
    namespace = body.get("metadata", {}).get("namespace")
    if owner and namespace:
        memo["nudges"].nudge(namespace, owner)


for _group, _version, _plural in _CHILD_KINDS:
    kopf.on.event(_group, _version, _plural, labels={"app.kubernetes.io/managed-by": MANAGED_BY})(
        _on_child_event
    )

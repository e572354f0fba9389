"""Idempotent create-or-repair of one child object.

A child is left alone while everything the operator wants is in it (`contains`: fields the
server or other controllers add are fine), created when missing, and merge-patched back when a
wanted field differs: that is how a child edited or deleted by hand is put back. A name taken
by an object that the SLOService does not control is never touched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from sloserve.kubeclient import ApiError, KubeApi
from sloserve.operator.naming import owned_by
from sloserve.operator.resources import resource_of

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([a-zA-Z]*)$")
_SUFFIXES = {
    "": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
}  # fmt: skip


class Outcome(StrEnum):
    CREATED = "created"
    REPAIRED = "repaired"
    UNCHANGED = "unchanged"


class ForeignObjectError(Exception):
    """The child's name is taken by an object the SLOService does not control."""


def _quantity(value: str) -> Decimal | None:
    match = _QUANTITY.match(value)
    if not match or match.group(2) not in _SUFFIXES:
        return None
    try:
        return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]
    except InvalidOperation:
        return None


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have:
        return True
    # The server normalises resource quantities ("0.5" comes back as "500m").
    if isinstance(want, str | int) and isinstance(have, str | int):
        a, b = _quantity(str(want)), _quantity(str(have))
        return a is not None and a == b
    return False


def contains(want: Any, have: Any) -> bool:
    """Whether `have` holds everything in `want`: maps by key, lists item by item."""
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(
            key in have and contains(value, have[key]) for key, value in want.items()
        )
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(contains(w, h) for w, h in zip(want, have, strict=True))
        )
    return _same_scalar(want, have)


async def apply(
    api: KubeApi, manifest: Mapping[str, Any], owner_uid: str
) -> tuple[Outcome, dict[str, Any]]:
    """Makes the child match `manifest`; returns what was done and the object as stored."""
    meta = manifest["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    resource = resource_of(manifest)
    path = resource.path(namespace, name)
    actual = await api.get(path)
    if actual is None:
        try:
            return Outcome.CREATED, await api.create(resource.path(namespace), manifest)
        except ApiError as error:
            if error.reason != "AlreadyExists":
                raise
            # Created meanwhile (another reconcile, a restarted operator): check it below.
            actual = await api.get(path)
            if actual is None:
                raise
    if not owned_by(actual, owner_uid):
        raise ForeignObjectError(
            f"{manifest['kind']} {namespace}/{name} exists and is not controlled by this "
            "SLOService; rename or delete it"
        )
    if contains(manifest, actual):
        return Outcome.UNCHANGED, actual
    patch = {key: value for key, value in manifest.items() if key not in ("apiVersion", "kind")}
    return Outcome.REPAIRED, await api.merge_patch(path, patch)

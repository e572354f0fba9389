"""Optional API keys: who a request is from (its tenant), which SLO classes it may use, and
how fast it may send.

`sloserve gateway --api-keys PATH` turns them on. PATH is a YAML file, a list of keys (or a
mapping with that list under `api_keys`):

    - key: sk-team-a-1          # the secret, sent as `authorization: Bearer <key>`
      tenant: team-a            # a name: [A-Za-z0-9._-], at most 64 characters
      classes: [chat, coding]   # optional: the classes it may use (default: any class and
                                # explicit budgets); a list excludes explicit budgets
      rate_limit_rps: 5         # optional: requests per second, per tenant (token bucket)
      burst: 10                 # optional: requests at once (default: rate rounded up)

or a directory (a mounted Kubernetes Secret): its `keys.yaml` when there is one, else one
file per key, each holding one entry. A tenant may have several keys (to rotate them); they
share its rate limit, so they must agree on `classes`, `rate_limit_rps` and `burst`.

Keys are kept only as SHA-256 digests: looking one up compares digests, so the time taken
says nothing about how much of a guessed key was right.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sloserve.errors import FieldError
from sloserve.gateway import failures
from sloserve.gateway.rate_limit import TokenBucket

KEYS_FILE_IN_DIRECTORY = "keys.yaml"
_TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # it is a metrics label
_FIELDS = ("key", "tenant", "classes", "rate_limit_rps", "burst")


@dataclass(frozen=True)
class Tenant:
    name: str
    classes: frozenset[str] | None  # None: any class, and explicit budgets
    rate_limit_rps: float | None = None  # None: no limit
    burst: int | None = None

    def may_use(self, class_name: str) -> bool:
        """`class_name` is "" for a request with explicit budgets."""
        return self.classes is None or class_name in self.classes


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _entry(raw: object, where: str, known_classes: Iterable[str]) -> tuple[str, Tenant]:
    if not isinstance(raw, Mapping):
        raise FieldError(where, "must be a mapping with `key` and `tenant`")
    unknown = sorted(set(map(str, raw)) - set(_FIELDS))
    if unknown:
        raise FieldError(f"{where}.{unknown[0]}", f"unknown field; known: {list(_FIELDS)}")
    key = raw.get("key")
    if not isinstance(key, str) or not key.strip():
        raise FieldError(f"{where}.key", "is required: a non-empty string")
    if key != key.strip() or any(c.isspace() for c in key):
        raise FieldError(f"{where}.key", "must not contain whitespace")
    tenant = raw.get("tenant")
    if not isinstance(tenant, str) or not _TENANT_NAME.fullmatch(tenant):
        raise FieldError(
            f"{where}.tenant", "is required: 1 to 64 characters of letters, digits, '.', '_', '-'"
        )
    classes: frozenset[str] | None = None
    if "classes" in raw:
        listed = raw["classes"]
        if not isinstance(listed, list) or not listed:
            raise FieldError(f"{where}.classes", "must be a non-empty list of SLO class names")
        known = sorted(known_classes)
        for i, name in enumerate(listed):
            if not isinstance(name, str) or name not in known:
                raise FieldError(f"{where}.classes[{i}]", f"unknown class {name!r}; known: {known}")
        classes = frozenset(listed)
    rate = raw.get("rate_limit_rps")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0
    ):
        raise FieldError(f"{where}.rate_limit_rps", "must be a number above 0")
    burst = raw.get("burst")
    if burst is not None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise FieldError(f"{where}.burst", "must be a whole number of at least 1")
        if rate is None:
            raise FieldError(f"{where}.burst", "needs rate_limit_rps")
    if rate is not None and burst is None:
        burst = max(1, math.ceil(rate))
    return key, Tenant(tenant, classes, None if rate is None else float(rate), burst)


def _raw_entries(path: Path) -> list[tuple[str, Any]]:
    """(where, raw entry) pairs from a file or a directory; `where` names it in errors."""

    def read(file: Path) -> Any:
        try:
            return yaml.safe_load(file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise FieldError("api_keys", f"cannot read {file}: {error}") from None

    if path.is_dir():
        if (path / KEYS_FILE_IN_DIRECTORY).is_file():
            path = path / KEYS_FILE_IN_DIRECTORY
        else:
            # A mounted Secret also holds `..data` and timestamped directories: skip hidden.
            files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
            if not files:
                raise FieldError("api_keys", f"no key files in directory {path}")
            return [(f"api_keys[{f.name}]", read(f)) for f in files]
    elif not path.is_file():
        raise FieldError("api_keys", f"no such file or directory: {path}")
    data = read(path)
    if isinstance(data, Mapping) and set(data) == {"api_keys"}:
        data = data["api_keys"]
    if not isinstance(data, list) or not data:
        raise FieldError("api_keys", f"{path} must hold a non-empty list of keys")
    return [(f"api_keys[{i}]", raw) for i, raw in enumerate(data)]


class ApiKeys:
    """The keys, their tenants, and one rate-limit bucket per tenant."""

    def __init__(
        self, keys: Mapping[str, Tenant], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._tenants = {_digest(key): tenant for key, tenant in keys.items()}
        self._buckets: dict[str, TokenBucket] = {}
        for tenant in keys.values():
            if tenant.rate_limit_rps is not None and tenant.burst is not None:
                self._buckets[tenant.name] = TokenBucket(tenant.rate_limit_rps, tenant.burst, clock)

    @property
    def tenants(self) -> list[str]:
        return sorted({t.name for t in self._tenants.values()})

    @classmethod
    def load(cls, path: Path, known_classes: Iterable[str]) -> ApiKeys:
        """Reads and validates `path`; FieldError names the bad entry and field."""
        known = list(known_classes)
        keys: dict[str, Tenant] = {}
        where_key: dict[str, str] = {}
        tenants: dict[str, tuple[str, Tenant]] = {}
        for where, raw in _raw_entries(path):
            key, tenant = _entry(raw, where, known)
            if key in keys:
                raise FieldError(f"{where}.key", f"the same key as {where_key[key]}")
            first = tenants.setdefault(tenant.name, (where, tenant))
            for attribute in ("classes", "rate_limit_rps", "burst"):
                if getattr(tenant, attribute) != getattr(first[1], attribute):
                    raise FieldError(
                        f"{where}.{attribute}",
                        f"differs from {first[0]} of the same tenant {tenant.name!r} "
                        "(a tenant's keys share its classes and rate limit)",
                    )
            keys[key] = tenant
            where_key[key] = where
        return cls(keys)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an `authorization: Bearer <key>` value; UNAUTHENTICATED if none."""
        if not authorization:
            raise failures.unauthenticated(
                "an API key is required: send `authorization: Bearer <key>`", "API_KEY_MISSING"
            )
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise failures.unauthenticated(
                "the authorization header must be `Bearer <key>`", "API_KEY_MALFORMED"
            )
        tenant = self._tenants.get(_digest(key.strip()))
        if tenant is None:
            raise failures.unauthenticated("the API key is not valid", "API_KEY_INVALID")
        return tenant

    def authorize(self, tenant: Tenant, class_name: str) -> None:
        """PERMISSION_DENIED when the tenant may not use the class ("" = explicit budgets)."""
        if tenant.may_use(class_name):
            return
        allowed = sorted(tenant.classes or ())
        what = f"SLO class {class_name!r}" if class_name else "explicit SLO budgets"
        raise failures.permission_denied(
            f"tenant {tenant.name!r} may not use {what}; allowed classes: {allowed}",
            "CLASS_NOT_ALLOWED",
        )

    def admit(self, tenant: Tenant) -> None:
        """Takes one request from the tenant's rate limit; RESOURCE_EXHAUSTED when over it."""
        bucket = self._buckets.get(tenant.name)
        if bucket is None:
            return
        wait_s = bucket.take()
        if wait_s is not None:
            raise failures.rejected(
                "RATE_LIMITED",
                f"tenant {tenant.name!r} is over its rate limit of {bucket.rate_per_s:g} "
                f"requests/s (burst {bucket.burst}); retry in {wait_s:.2f} s",
                wait_s,
                "rate_limited",
            )

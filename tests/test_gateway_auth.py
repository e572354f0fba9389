"""API keys, tenants and rate limits (gateway/auth.py, gateway/rate_limit.py): the keys file's
validation, and the checks a request goes through. No engine."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from sloserve.errors import FieldError
from sloserve.gateway.auth import ApiKeys, Tenant
from sloserve.gateway.failures import GatewayError
from sloserve.gateway.rate_limit import TokenBucket

CLASSES = ["chat", "coding", "batch"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def load_error(tmp_path: Path, text: str) -> FieldError:
    with pytest.raises(FieldError) as caught:
        ApiKeys.load(write(tmp_path / "keys.yaml", text), CLASSES)
    return caught.value


# -- the keys file ------------------------------------------------------------------------


def test_a_keys_file_maps_keys_to_tenants_with_classes_and_limits(tmp_path: Path) -> None:
    keys = ApiKeys.load(
        write(
            tmp_path / "keys.yaml",
            """
- {key: sk-a-1, tenant: team-a, classes: [chat, coding], rate_limit_rps: 5, burst: 10}
- {key: sk-a-2, tenant: team-a, classes: [chat, coding], rate_limit_rps: 5, burst: 10}
- {key: sk-b, tenant: team-b}
""",
        ),
        CLASSES,
    )
    assert keys.tenants == ["team-a", "team-b"]
    a = keys.authenticate("Bearer sk-a-2")
    assert a == Tenant("team-a", frozenset({"chat", "coding"}), 5.0, 10)
    assert keys.authenticate("bearer sk-a-1") == a  # the scheme is case-insensitive
    b = keys.authenticate("Bearer sk-b")
    assert b.classes is None and b.rate_limit_rps is None


def test_the_list_may_sit_under_api_keys_and_burst_defaults_to_the_rate(tmp_path: Path) -> None:
    keys = ApiKeys.load(
        write(tmp_path / "k.yaml", "api_keys:\n  - {key: k1, tenant: t, rate_limit_rps: 2.5}\n"),
        CLASSES,
    )
    assert keys.authenticate("Bearer k1").burst == 3


@pytest.mark.parametrize(
    ("text", "field", "says"),
    [
        ("{}", "api_keys", "non-empty list"),
        ("[]", "api_keys", "non-empty list"),
        ("- just-a-string", "api_keys[0]", "mapping"),
        ("- {tenant: t}", "api_keys[0].key", "required"),
        ("- {key: 'a b', tenant: t}", "api_keys[0].key", "whitespace"),
        ("- {key: k}", "api_keys[0].tenant", "required"),
        ("- {key: k, tenant: 'team a'}", "api_keys[0].tenant", "letters"),
        ("- {key: k, tenant: t, role: admin}", "api_keys[0].role", "unknown field"),
        ("- {key: k, tenant: t, classes: chat}", "api_keys[0].classes", "list"),
        ("- {key: k, tenant: t, classes: []}", "api_keys[0].classes", "non-empty"),
        ("- {key: k, tenant: t, classes: [chat, gold]}", "api_keys[0].classes[1]", "'gold'"),
        ("- {key: k, tenant: t, rate_limit_rps: 0}", "api_keys[0].rate_limit_rps", "above 0"),
        ("- {key: k, tenant: t, rate_limit_rps: fast}", "api_keys[0].rate_limit_rps", "number"),
        ("- {key: k, tenant: t, rate_limit_rps: 1, burst: 0}", "api_keys[0].burst", "at least 1"),
        ("- {key: k, tenant: t, rate_limit_rps: 1, burst: 1.5}", "api_keys[0].burst", "whole"),
        ("- {key: k, tenant: t, burst: 3}", "api_keys[0].burst", "rate_limit_rps"),
        ("- {key: k, tenant: t}\n- {key: k, tenant: u}", "api_keys[1].key", "api_keys[0]"),
        (
            "- {key: k1, tenant: t, classes: [chat]}\n- {key: k2, tenant: t, classes: [coding]}",
            "api_keys[1].classes",
            "same tenant 't'",
        ),
        (
            "- {key: k1, tenant: t, rate_limit_rps: 1}\n- {key: k2, tenant: t}",
            "api_keys[1].rate_limit_rps",
            "differs from api_keys[0]",
        ),
        ("- [unclosed", "api_keys", "cannot read"),
    ],
)
def test_a_bad_keys_file_names_the_entry_and_field(
    tmp_path: Path, text: str, field: str, says: str
) -> None:
    error = load_error(tmp_path, text)
    assert error.field == field
    assert says in error.description


def test_a_missing_keys_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FieldError, match="no such file or directory") as caught:
        ApiKeys.load(tmp_path / "absent.yaml", CLASSES)
    assert caught.value.field == "api_keys"


def test_a_secret_directory_holds_keys_yaml_or_one_file_per_key(tmp_path: Path) -> None:
    with_list = tmp_path / "with-list"
    with_list.mkdir()
    write(with_list / "keys.yaml", "- {key: k1, tenant: t1}\n")
    assert ApiKeys.load(with_list, CLASSES).authenticate("Bearer k1").name == "t1"

    per_key = tmp_path / "per-key"
    per_key.mkdir()
    write(per_key / "team-a", "{key: ka, tenant: team-a, classes: [chat]}\n")
    write(per_key / "team-b", "{key: kb, tenant: team-b, classes: [cluster]}\n")
    (per_key / "..data").mkdir()  # what a mounted Secret also holds: skipped
    with pytest.raises(FieldError) as caught:
        ApiKeys.load(per_key, CLASSES)
    assert caught.value.field == "api_keys[team-b].classes[0]"
    write(per_key / "team-b", "{key: kb, tenant: team-b}\n")
    keys = ApiKeys.load(per_key, CLASSES)
    assert keys.tenants == ["team-a", "team-b"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FieldError, match="no key files"):
        ApiKeys.load(empty, CLASSES)


# -- a request's checks -------------------------------------------------------------------


def gateway_error(call: object, *args: object) -> GatewayError:
    assert callable(call)
    with pytest.raises(GatewayError) as caught:
        call(*args)
    return caught.value


@pytest.fixture
def keys() -> ApiKeys:
    return ApiKeys(
        {
            "sk-a": Tenant("team-a", frozenset({"chat"}), rate_limit_rps=2.0, burst=3),
            "sk-any": Tenant("open", None),
        },
        clock=clock,
    )


clock = FakeClock()


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "API_KEY_MISSING"),
        ("", "API_KEY_MISSING"),
        ("sk-a", "API_KEY_MALFORMED"),
        ("Basic sk-a", "API_KEY_MALFORMED"),
        ("Bearer ", "API_KEY_MALFORMED"),
        ("Bearer sk-wrong", "API_KEY_INVALID"),
        ("Bearer sk-a-but-longer", "API_KEY_INVALID"),
    ],
)
def test_a_missing_or_unknown_key_is_unauthenticated(
    keys: ApiKeys, authorization: str | None, reason: str
) -> None:
    error = gateway_error(keys.authenticate, authorization)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.details.reason == reason
    assert error.outcome == "unauthenticated"


def test_a_class_the_tenant_may_not_use_is_denied_by_name(keys: ApiKeys) -> None:
    tenant = keys.authenticate("Bearer sk-a")
    keys.authorize(tenant, "chat")
    error = gateway_error(keys.authorize, tenant, "coding")
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert error.details.reason == "CLASS_NOT_ALLOWED"
    assert "'coding'" in error.status.message and "['chat']" in error.status.message
    # Explicit budgets are not one of the listed classes either.
    error = gateway_error(keys.authorize, tenant, "")
    assert "explicit SLO budgets" in error.status.message
    # A key with no class list may use any class, and explicit budgets.
    anyone = keys.authenticate("Bearer sk-any")
    keys.authorize(anyone, "coding")
    keys.authorize(anyone, "")


def test_the_rate_limit_refuses_past_the_burst_with_a_retry_after(keys: ApiKeys) -> None:
    tenant = keys.authenticate("Bearer sk-a")
    for _ in range(3):  # the burst
        keys.admit(tenant)
    error = gateway_error(keys.admit, tenant)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details.reason == "RATE_LIMITED"
    assert error.details.retry_after_s == pytest.approx(0.5)  # one token at 2/s
    assert error.outcome == "rate_limited"
    clock.now += 0.5
    keys.admit(tenant)  # one token flowed in
    # The unlimited tenant is never refused.
    anyone = keys.authenticate("Bearer sk-any")
    for _ in range(100):
        keys.admit(anyone)


def test_a_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    fake = FakeClock()
    bucket = TokenBucket(rate_per_s=4.0, burst=2, clock=fake)
    assert bucket.take() is None and bucket.take() is None
    assert bucket.take() == pytest.approx(0.25)
    fake.now += 0.125  # half a token
    assert bucket.take() == pytest.approx(0.125)
    fake.now += 10  # long idle: capped at the burst
    assert [bucket.take() is None for _ in range(3)] == [True, True, False]
    with pytest.raises(ValueError):
        TokenBucket(rate_per_s=0, burst=1)

"""API keys and TLS on a real gateway process: both front doors, over TLS with a certificate
made here. The checks come before routing, so most tests need no replica: the gateway is
given one that is not there, and a request that passes every check ends UNAVAILABLE
(NO_REPLICA). One test (engine) serves through a real replica to show the tenant reaches it."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from conftest import CLASSES, REPO, Gateway, Replica, free_port, metric_sum, self_signed_cert
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sloserve import errors
from sloserve.client import build_request
from sloserve.v1 import inference_pb2_grpc

KEYS = """
- {key: sk-chat-only, tenant: team-a, classes: [chat]}
- {key: sk-limited, tenant: team-b, rate_limit_rps: 0.2, burst: 1}
- {key: sk-anything, tenant: team-c}
"""
PROMPT = list(range(10, 40))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


def secure_gateway(workdir: Path, replicas: list[str], tls_files: tuple[Path, Path]) -> Gateway:
    keys = workdir / "keys.yaml"
    keys.write_text(KEYS)
    cert, key = tls_files
    return Gateway(
        workdir=workdir,
        replicas=replicas,
        args=["--api-keys", str(keys), "--tls-cert", str(cert), "--tls-key", str(key)],
    )


def secure_channel(gateway: Gateway, cert: Path) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    return grpc.secure_channel(gateway.endpoint, credentials)


def wait_answering(gateway: Gateway, cert: Path, want: int, timeout_s: float = 60) -> None:
    """Until the gateway's gRPC health answers `want` over TLS."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert gateway.process is not None and gateway.process.poll() is None, (
            gateway.log_path.read_text()[-4000:]
        )
        with secure_channel(gateway, cert) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                if status.status == want:
                    return
            except grpc.RpcError:
                pass
        assert time.monotonic() < deadline, "the gateway did not answer over TLS"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, tls_files: tuple[Path, Path]
) -> Iterator[Gateway]:
    nowhere = f"127.0.0.1:{free_port()}"  # no replica there: requests that pass end UNAVAILABLE
    server = secure_gateway(tmp_path_factory.mktemp("gateway"), [nowhere], tls_files)
    server.start()
    try:
        wait_answering(server, tls_files[0], health_pb2.HealthCheckResponse.NOT_SERVING)
        yield server
    finally:
        assert server.stop() == 0


def grpc_error(
    gateway: Gateway, cert: Path, key: str | None, slo_class: str = "chat", **options: object
) -> grpc.RpcError:
    request = build_request(PROMPT, slo_class=slo_class, max_tokens=2, **options)  # type: ignore[arg-type]
    metadata = (("authorization", f"Bearer {key}"),) if key is not None else ()
    with secure_channel(gateway, cert) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, metadata=metadata, timeout=30))
    return caught.value


# -- gRPC ---------------------------------------------------------------------------------


def test_grpc_without_a_valid_key_is_unauthenticated(
    gateway: Gateway, tls_files: tuple[Path, Path]
) -> None:
    cert = tls_files[0]
    for key, reason in ((None, "API_KEY_MISSING"), ("sk-guessed", "API_KEY_INVALID")):
        error = grpc_error(gateway, cert, key)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert errors.status_details(errors.rich_status(error)).reason == reason


def test_grpc_a_class_the_tenant_may_not_use_is_permission_denied(
    gateway: Gateway, tls_files: tuple[Path, Path]
) -> None:
    error = grpc_error(gateway, tls_files[0], "sk-chat-only", slo_class="coding")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'coding'" in str(error.details()) and "team-a" in str(error.details())
    # Its own class passes every check and reaches routing (where there is no replica).
    error = grpc_error(gateway, tls_files[0], "sk-chat-only", slo_class="chat")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert errors.status_details(errors.rich_status(error)).reason == "NO_REPLICA"


def test_grpc_over_the_rate_limit_is_refused_not_queued(
    gateway: Gateway, tls_files: tuple[Path, Path]
) -> None:
    cert = tls_files[0]
    # team-b: a burst of 1, then one request per 5 s. The first passes the checks.
    first = grpc_error(gateway, cert, "sk-limited", allow_best_effort=True)
    assert first.code() == grpc.StatusCode.UNAVAILABLE
    # The next is refused at once, though it would accept the best-effort queue.
    second = grpc_error(gateway, cert, "sk-limited", allow_best_effort=True)
    assert second.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = errors.status_details(errors.rich_status(second))
    assert details.reason == "RATE_LIMITED"
    assert details.retry_after_s is not None and 0 < details.retry_after_s <= 5
    assert "team-b" in str(second.details())
    # Another tenant is not held back by team-b's limit.
    assert grpc_error(gateway, cert, "sk-anything").code() == grpc.StatusCode.UNAVAILABLE
    team_b = metric_sum(
        gateway.metrics_url, "sloserve_gateway_tenant_requests_total", tenant="team-b"
    )
    limited = metric_sum(
        gateway.metrics_url,
        "sloserve_gateway_tenant_requests_total",
        tenant="team-b",
        outcome="rate_limited",
    )
    assert limited >= 1 and team_b >= 2
    # Nothing was ever put in the best-effort queue.
    assert metric_sum(gateway.metrics_url, "sloserve_gateway_spilled_total") == 0


def test_a_too_long_session_id_is_invalid_argument_naming_the_label(
    gateway: Gateway, tls_files: tuple[Path, Path]
) -> None:
    request = build_request(PROMPT, slo_class="chat", max_tokens=2)
    request.labels["session"] = "s" * 257
    with secure_channel(gateway, tls_files[0]) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, metadata=(("authorization", "Bearer sk-anything"),)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert errors.status_details(errors.rich_status(caught.value)).field == "labels[session]"


def test_a_plaintext_client_cannot_talk_to_the_tls_port(gateway: Gateway) -> None:
    with (
        grpc.insecure_channel(gateway.endpoint) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# -- HTTP ---------------------------------------------------------------------------------


def https_client(gateway: Gateway, cert: Path, api_key: str) -> openai.OpenAI:
    context = ssl.create_default_context(cafile=str(cert))
    return openai.OpenAI(
        base_url=f"https://127.0.0.1:{gateway.http_port}/v1",
        api_key=api_key,
        max_retries=0,
        timeout=30,
        http_client=openai.DefaultHttpxClient(verify=context),
    )


def chat(client: openai.OpenAI, slo_class: str) -> None:
    client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=2,
        extra_body={"slo_class": slo_class},
    )


def test_http_an_unknown_key_is_401_in_openai_shape(
    gateway: Gateway, tls_files: tuple[Path, Path]
) -> None:
    client = https_client(gateway, tls_files[0], "sk-guessed")
    with pytest.raises(openai.AuthenticationError) as caught:
        chat(client, "chat")
    assert caught.value.status_code == 401
    assert caught.value.code == "API_KEY_INVALID"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    # A valid key lists the models.
    models = https_client(gateway, tls_files[0], "sk-anything").models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_http_a_missing_key_is_401(gateway: Gateway, tls_files: tuple[Path, Path]) -> None:
    context = ssl.create_default_context(cafile=str(tls_files[0]))
    response = httpx.post(
        f"https://127.0.0.1:{gateway.http_port}/v1/completions",
        json={"model": "tiny", "prompt": "hello", "max_tokens": 2},
        verify=context,
        timeout=30,
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "API_KEY_MISSING"
    assert response.json()["error"]["type"] == "authentication_error"


def test_http_a_class_the_tenant_may_not_use_is_403_naming_it(
    gateway: Gateway, tls_files: tuple[Path, Path]
) -> None:
    client = https_client(gateway, tls_files[0], "sk-chat-only")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        chat(client, "reasoning")
    assert caught.value.status_code == 403
    assert "'reasoning'" in caught.value.message
    assert caught.value.code == "CLASS_NOT_ALLOWED"


def test_http_over_the_rate_limit_is_429_with_retry_after(
    gateway: Gateway, tls_files: tuple[Path, Path]
) -> None:
    client = https_client(gateway, tls_files[0], "sk-limited")
    statuses = []
    for _ in range(3):
        try:
            chat(client, "chat")
        except openai.APIStatusError as error:
            statuses.append(error.status_code)
            if error.status_code == 429:
                assert error.code == "RATE_LIMITED"
                assert 1 <= int(error.response.headers["Retry-After"]) <= 5
    # At most one passes the limit (the bucket may have refilled since the gRPC test); the
    # rest are 429. A request that passes ends 503: there is no replica.
    assert statuses.count(429) >= 2 and set(statuses) <= {429, 503}


def test_plain_http_is_refused_by_the_tls_port(gateway: Gateway) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{gateway.http_port}/healthz", timeout=5)


# -- configuration ------------------------------------------------------------------------


def sloserve_gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sloserve", "gateway", "--replica", "127.0.0.1:1",
         "--port", str(free_port()), "--http-port", str(free_port()), "--metrics-port", "-1",
         "--classes", str(CLASSES), *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_bad_keys_file_stops_the_gateway_naming_the_entry(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("- {key: k1, tenant: t}\n- {key: k2, tenant: u, classes: [chat, gold]}\n")
    run = sloserve_gateway("--api-keys", str(keys))
    assert run.returncode == 2
    assert f"--api-keys {keys}: api_keys[1].classes[1]: unknown class 'gold'" in run.stderr


def test_tls_needs_a_cert_and_key_that_fit(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    run = sloserve_gateway("--tls-cert", str(cert))
    assert run.returncode == 2 and "--tls-key: is required with --tls-cert" in run.stderr
    run = sloserve_gateway("--tls-cert", str(cert), "--tls-key", str(tmp_path / "absent.pem"))
    assert run.returncode == 2 and "--tls-key: cannot read" in run.stderr
    other_cert, _ = self_signed_cert(tmp_path)
    run = sloserve_gateway("--tls-cert", str(other_cert), "--tls-key", str(key))
    assert run.returncode == 2 and "--tls-key:" in run.stderr and "does not fit" in run.stderr


# -- through a real replica ---------------------------------------------------------------


@pytest.mark.engine
def test_a_keyed_request_over_tls_is_served_with_its_tenant(
    replica: Replica, tmp_path: Path, tls_files: tuple[Path, Path]
) -> None:
    server = secure_gateway(tmp_path, [replica.endpoint], tls_files)
    server.start()
    try:
        wait_answering(server, tls_files[0], health_pb2.HealthCheckResponse.SERVING)
        # gRPC: the request claims another tenant; the key's wins.
        request = build_request(PROMPT, slo_class="chat", max_tokens=2, ignore_eos=True)
        request.request_id = "keyed-over-tls"
        request.tenant = "someone-else"
        with secure_channel(server, tls_files[0]) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            responses = list(
                stub.Generate(request, metadata=(("authorization", "Bearer sk-chat-only"),))
            )
        assert responses[-1].WhichOneof("event") == "completion"
        assert responses[-1].completion.usage.completion_tokens == 2
        # HTTP: the openai client over TLS, its api_key as the bearer token.
        completion = https_client(server, tls_files[0], "sk-anything").completions.create(
            model="tiny", prompt="hello", max_tokens=2, extra_body={"ignore_eos": True}
        )
        assert completion.usage is not None and completion.usage.completion_tokens == 2
        assert (
            metric_sum(
                server.metrics_url,
                "sloserve_gateway_tenant_requests_total",
                tenant="team-c",
                outcome="attained",
            )
            + metric_sum(
                server.metrics_url,
                "sloserve_gateway_tenant_requests_total",
                tenant="team-c",
                outcome="missed",
            )
            == 1
        )
    finally:
        assert server.stop() == 0
    # The replica saw the key's tenant (its scheduler trace records each request's tenant).
    added = [
        event
        for line in replica.trace_path.read_text().splitlines()
        if (event := json.loads(line)).get("request_id") == "keyed-over-tls"
        and event.get("tenant") is not None
    ]
    assert added and {e["tenant"] for e in added} == {"team-a"}

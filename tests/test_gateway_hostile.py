"""Hostile and broken HTTP clients against a real gateway process: bad numbers, non-JSON
JSON, oversize bodies, slow senders, too many connections, a client that stops reading.

Most checks come before routing, so the module's gateway fronts a replica that is not
there (a request that passes them all ends 503). The engine tests put a gateway in front of
the shared replica, and send the replica a 4 MB prompt while another stream flows."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import pytest
from aiohttp import web
from conftest import Gateway, Replica, free_port

from sloserve.client import build_request
from sloserve.errors import FieldError
from sloserve.gateway.http_limits import HttpLimits, LimitedSite
from sloserve.v1 import inference_pb2_grpc

TIMEOUT_S = 2.0  # the gateway's header, body and write timeouts here
MAX_BODY = 65536
MAX_CONNECTIONS = 8
LIMIT_FLAGS = [
    "--http-header-timeout", str(TIMEOUT_S),
    "--http-body-timeout", str(TIMEOUT_S),
    "--http-write-timeout", str(TIMEOUT_S),
    "--http-max-body-bytes", str(MAX_BODY),
    "--http-max-connections", str(MAX_CONNECTIONS),
]  # fmt: skip


def wait_answering(gateway: Gateway, timeout_s: float = 60) -> None:
    """Until the HTTP port answers (503 is an answer: there is no replica)."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert gateway.process is not None and gateway.process.poll() is None, (
            gateway.log_path.read_text()[-4000:]
        )
        with contextlib.suppress(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{gateway.http_port}/healthz", timeout=2)
            return
        assert time.monotonic() < deadline, "the gateway's HTTP port did not answer"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    nowhere = f"127.0.0.1:{free_port()}"
    server = Gateway(
        workdir=tmp_path_factory.mktemp("gateway-hostile"), replicas=[nowhere], args=LIMIT_FLAGS
    )
    server.start()
    try:
        wait_answering(server)
        yield server
    finally:
        server.stop()


def post(
    gateway: Gateway,
    raw: bytes | str,
    path: str = "/completions",
    content_type: str = "application/json",
) -> httpx.Response:
    content = raw.encode() if isinstance(raw, str) else raw
    return httpx.post(
        gateway.base_url + path,
        content=content,
        headers={"Content-Type": content_type},
        timeout=30,
    )


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error of a response that must have `status`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


BASE = '"model": "tiny", "prompt": "Hello"'
CHAT = '"model": "tiny", "messages": [{"role": "user", "content": "hi"}]'


def completion(fields: str) -> tuple[str, str]:
    """(path, raw body) of a completion with the given raw JSON fields."""
    return "/completions", f"{{{BASE}, {fields}}}"


def budgets(fields: str) -> tuple[str, str]:
    return completion(f'"slo": {{{fields}}}')


def chat(fields: str) -> tuple[str, str]:
    return "/chat/completions", f"{{{CHAT}, {fields}}}"


BAD_BODIES = {
    # what: ((path, raw body), the param named)
    "max_tokens 10^12": (completion('"max_tokens": 1000000000000'), "max_tokens"),
    "max_tokens 0": (completion('"max_tokens": 0'), "max_tokens"),
    "max_tokens 1.5": (completion('"max_tokens": 1.5'), "max_tokens"),
    "seed 2^70": (completion(f'"seed": {2**70}'), "seed"),
    "seed -1": (completion('"seed": -1'), "seed"),
    "token id 2^40": (("/completions", f'{{"model": "tiny", "prompt": [1, {2**40}]}}'), "prompt"),
    "token id -1": (("/completions", '{"model": "tiny", "prompt": [-1]}'), "prompt"),
    "n 10^30": (completion(f'"n": {10**30}'), "n"),
    "temperature -1": (completion('"temperature": -1'), "temperature"),
    "temperature 1e39": (completion('"temperature": 1e39'), "temperature"),
    "temperature 10^400": (completion(f'"temperature": {10**400}'), "temperature"),
    "temperature NaN": (completion('"temperature": NaN'), "temperature"),
    "top_p 0": (completion('"top_p": 0'), "top_p"),
    "top_p 1e999": (completion('"top_p": 1e999'), "top_p"),
    "ttft Infinity": (budgets('"ttft_ms": Infinity, "tpot_ms": 50'), "slo.ttft_ms"),
    "tpot -Infinity": (budgets('"ttft_ms": 500, "tpot_ms": -Infinity'), "slo.tpot_ms"),
    "ttft 10^400": (budgets(f'"ttft_ms": {10**400}, "tpot_ms": 50'), "slo.ttft_ms"),
    "ttft a year": (budgets('"ttft_ms": 31536000000, "tpot_ms": 50'), "slo.ttft_ms"),
    "thinking_tpot NaN": (
        budgets('"ttft_ms": 500, "tpot_ms": 50, "thinking_tpot_ms": NaN'),
        "slo.thinking_tpot_ms",
    ),
    "thinking_tokens 2^40": (
        budgets(f'"ttft_ms": 500, "tpot_ms": 50, "thinking_tokens": {2**40}'),
        "slo.thinking_tokens",
    ),
    "NaN in a field not read": (completion('"logprobs": NaN'), "logprobs"),
    "an unpaired surrogate": (
        ("/completions", '{"model": "tiny", "prompt": "a\\ud800b"}'),
        "prompt",
    ),
    "user not a string": (completion('"user": 5'), "user"),
    "a 5000-digit integer": (completion(f'"max_tokens": {"9" * 5000}'), "body"),
    "not JSON": (("/completions", "{not json"), "body"),
    "a JSON array": (("/completions", "[1, 2]"), "body"),
    "chat max_completion_tokens 10^12": (
        chat('"max_completion_tokens": 1000000000000'),
        "max_completion_tokens",
    ),
    "chat content surrogate": (
        (
            "/chat/completions",
            '{"model": "tiny", "messages": [{"role": "user", "content": "\\udc00"}]}',
        ),
        "messages[0].content",
    ),
    "chat temperature Infinity": (chat('"temperature": Infinity'), "temperature"),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_a_bad_value_is_400_naming_the_field(gateway: Gateway, case: str) -> None:
    (path, raw), param = BAD_BODIES[case]
    error = error_of(post(gateway, raw, path), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{param}: ")


def test_values_at_the_edges_of_their_ranges_pass(gateway: Gateway) -> None:
    body = {
        "model": "tiny", "prompt": [0, 2**32 - 1], "max_tokens": 2**31 - 1, "seed": 2**63 - 1,
        "temperature": 2, "top_p": 1, "n": 1,
        "slo": {"ttft_ms": 86_400_000, "tpot_ms": 0.5, "thinking_tokens": 2**32 - 1,
                "thinking_tpot_ms": 1},
    }  # fmt: skip
    # Past every check: the only replica is not there.
    assert error_of(post(gateway, json.dumps(body)), 503)["param"] is None


@pytest.mark.parametrize("depth", [10_000, 2_000])
def test_deeply_nested_json_is_400(gateway: Gateway, depth: int) -> None:
    for raw in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        error = error_of(post(gateway, raw), 400)
        assert error["param"] == "body" and "nested" in error["message"]


@pytest.mark.parametrize("charset", ["foo", "utf-16", "latin-1"])
def test_a_charset_other_than_utf8_is_415(gateway: Gateway, charset: str) -> None:
    raw = f"{{{BASE}}}"
    error = error_of(post(gateway, raw, content_type=f"application/json; charset={charset}"), 415)
    assert error["code"] == "unsupported_charset" and charset in error["message"]


def test_utf8_named_in_any_spelling_is_accepted(gateway: Gateway) -> None:
    for charset in ("utf-8", "UTF8", "us-ascii"):
        response = post(gateway, f"{{{BASE}}}", content_type=f"application/json; charset={charset}")
        assert error_of(response, 503)["code"] != "unsupported_charset"


def test_invalid_utf8_is_400(gateway: Gateway) -> None:
    error = error_of(post(gateway, b'{"model": "tiny", "prompt": "\xff\xfe"}'), 400)
    assert error["param"] == "body" and "UTF-8" in error["message"]


def test_an_oversize_body_is_413_naming_the_limit(gateway: Gateway) -> None:
    raw = json.dumps({"model": "tiny", "prompt": "x" * MAX_BODY})
    error = error_of(post(gateway, raw), 413)
    assert error["code"] == "body_too_large" and str(MAX_BODY) in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap is met while reading
        for _ in range(8):
            yield b" " * (MAX_BODY // 4)

    response = httpx.post(
        gateway.base_url + "/completions",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert error_of(response, 413)["code"] == "body_too_large"


def test_unknown_routes_and_wrong_methods_are_json(gateway: Gateway) -> None:
    missing = httpx.get(gateway.base_url + "/nope", timeout=10)
    assert "/v1/nope" in error_of(missing, 404)["message"]
    wrong = httpx.get(gateway.base_url + "/completions", timeout=10)
    error_of(wrong, 405)
    assert "POST" in wrong.headers["allow"]


def connect(gateway: Gateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.http_port), timeout=15)
    sock.settimeout(15)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (the socket's timeout bounds each read)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_slow_header_sender_is_cut_off(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        # One more header byte every 0.25 s: trickling does not extend the deadline.
        sock.settimeout(0.25)
        closed = False
        for byte in b"X-Slow: " + b"a" * 200:
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                sock.send(bytes([byte]))
        elapsed = time.monotonic() - start
    assert closed, "the connection was still open after 50 s"
    print(f"slow headers: closed after {elapsed:.2f} s (timeout {TIMEOUT_S} s)")
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 3


def test_an_idle_connection_is_closed(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT_S + 3


def test_a_slow_body_sender_gets_408_and_is_cut_off(gateway: Gateway) -> None:
    with connect(gateway) as sock:
        start = time.monotonic()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"model": '
        )
        received = read_until_closed(sock)
        elapsed = time.monotonic() - start
    print(f"slow body: answered and closed after {elapsed:.2f} s (timeout {TIMEOUT_S} s)")
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "body_timeout"
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 3


def test_connections_past_the_cap_are_refused_at_once(gateway: Gateway) -> None:
    extra = 3
    sockets = [connect(gateway) for _ in range(MAX_CONNECTIONS + extra)]
    try:
        refused: list[bytes] = []
        with selectors.DefaultSelector() as selector:
            for sock in sockets:
                selector.register(sock, selectors.EVENT_READ)
            # The refusals come at once; the accepted connections say nothing until the
            # header timeout closes them.
            deadline = time.monotonic() + TIMEOUT_S / 2
            while (left := deadline - time.monotonic()) > 0:
                for key, _ in selector.select(left):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    selector.unregister(ready)
                    refused.append(read_until_closed(ready))
        assert len(refused) == extra
        for answer in refused:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503")
            assert json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for sock in sockets:
            sock.close()
    # Once they are gone, requests are served again.
    deadline = time.monotonic() + 10
    while (response := httpx.get(gateway.base_url + "/models", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("limits", "flag"),
    [
        (HttpLimits(body_timeout_s=0), "http_body_timeout"),
        (HttpLimits(header_timeout_s=float("nan")), "http_header_timeout"),
        (HttpLimits(write_timeout_s=-1), "http_write_timeout"),
        (HttpLimits(max_body_bytes=0), "http_max_body_bytes"),
        (HttpLimits(max_connections=0), "http_max_connections"),
    ],
)
def test_bad_limits_are_named_by_their_flag(limits: HttpLimits, flag: str) -> None:
    with pytest.raises(FieldError) as bad:
        limits.check()
    assert bad.value.field == flag


# The write timeout, in process: aiohttp's own request handling behind LimitedSite.


async def _serve_big(
    limits: HttpLimits, chunks: int, log: list[str], waits: list[float]
) -> tuple[int, Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        # Small kernel buffers, so that the writes stall as soon as the client lags.
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        response = web.StreamResponse()
        response.force_close()  # its end is where the client's reads end
        await response.prepare(request)
        try:
            for _ in range(chunks):
                start = time.monotonic()
                await response.write(b"x" * 65536)
                waits.append(time.monotonic() - start)
        except BaseException as error:
            log.append(type(error).__name__)
            raise
        log.append("finished")
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handler_cancellation=True, **limits.runner_args())
    await runner.setup()
    port = free_port()
    site = LimitedSite(runner, "127.0.0.1", port, limits)
    await site.start()
    return port, runner


def _run_server(
    limits: HttpLimits, chunks: int
) -> tuple[int, list[str], list[float], Callable[[], None]]:
    """Serves `chunks` x 64 KiB at GET / on a thread's loop: (port, how the handler ended,
    how long each write waited, a function that stops the server)."""
    log: list[str] = []
    waits: list[float] = []
    loop = asyncio.new_event_loop()
    ready: list[tuple[int, Any]] = []
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        ready.append(loop.run_until_complete(_serve_big(limits, chunks, log, waits)))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    port, runner = ready[0]

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return port, log, waits, stop


def _small_window_request(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast when not read
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout() -> None:
    port, log, _, stop = _run_server(HttpLimits(write_timeout_s=1.0), chunks=4096)  # 256 MiB
    try:
        with _small_window_request(port):
            start = time.monotonic()
            while not log and time.monotonic() - start < 20:
                time.sleep(0.05)
            elapsed = time.monotonic() - start
        print(f"a stalled reader: cut off after {elapsed:.2f} s ({log})")
        assert log and log[0] != "finished"
        assert elapsed < 1.0 + 5
    finally:
        stop()


def test_a_slow_steady_reader_is_not_cut_off() -> None:
    # The reader pauses 0.2 s after every 128 KiB: each of the server's writes stalls for less
    # than the timeout, and the whole response takes several times longer.
    write_timeout_s, chunks = 0.5, 32
    port, log, waits, stop = _run_server(HttpLimits(write_timeout_s=write_timeout_s), chunks)
    try:
        with _small_window_request(port) as sock:
            start, received, paused_at = time.monotonic(), 0, 0
            while chunk := sock.recv(65536):
                received += len(chunk)
                if received - paused_at >= 131072:
                    paused_at = received
                    time.sleep(0.2)
            elapsed = time.monotonic() - start
        deadline = time.monotonic() + 5
        while not log and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop()
    print(f"a slow reader: {received} bytes in {elapsed:.2f} s, longest write {max(waits):.2f} s")
    assert log == ["finished"]
    assert received >= chunks * 65536
    assert max(waits) > 0.1, "no write stalled: the test did not exercise the timer"
    assert elapsed > 2 * write_timeout_s, "the response did not outlast the write timeout"


# Through a real replica.


@pytest.fixture(scope="module")
def served(replica: Replica, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway with the same short limits, in front of the shared replica."""
    server = Gateway(
        workdir=tmp_path_factory.mktemp("gateway-hostile-served"),
        replicas=[replica.endpoint],
        args=LIMIT_FLAGS,
    )
    server.start()
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()


@pytest.mark.engine
def test_a_stream_outlasting_the_write_timeout_is_not_cut(served: Gateway) -> None:
    body = {
        "model": "tiny", "prompt": "Once upon a time", "max_tokens": 600, "ignore_eos": True,
        "stream": True, "seed": 2**63 - 1, "temperature": 2,
    }  # fmt: skip
    start, events = time.monotonic(), []
    with httpx.stream("POST", served.base_url + "/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    elapsed = time.monotonic() - start
    print(f"a 600-token stream took {elapsed:.2f} s (write timeout {TIMEOUT_S} s)")
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert elapsed > TIMEOUT_S, "the stream did not outlast the write timeout"


def _stream_gaps(replica: Replica, tokens: int) -> tuple[list[float], float]:
    """Streams `tokens` tokens from the replica; (gaps between its token messages, seconds)."""
    request = build_request("Once upon a time", max_tokens=tokens, ignore_eos=True)
    arrivals, received = [], 0
    start = time.monotonic()
    with grpc.insecure_channel(replica.endpoint) as channel:
        for response in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=120):
            if response.WhichOneof("event") == "delta":
                arrivals.append(time.monotonic())
                received += len(response.delta.token_ids)
    assert received == tokens
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return gaps, time.monotonic() - start


@pytest.mark.engine
def test_a_4mb_prompt_is_refused_at_once_and_does_not_stall_other_streams(
    replica: Replica,
) -> None:
    tokens = 150
    baseline, baseline_s = _stream_gaps(replica, tokens)
    refusals: list[tuple[float, grpc.StatusCode, str]] = []
    huge = build_request("lorem ipsum " * 333_333, max_tokens=4)  # 4 MB of text

    def hostile() -> None:
        with grpc.insecure_channel(replica.endpoint) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            time.sleep(baseline_s / 4)  # into the stream's steady state
            for _ in range(3):
                start = time.monotonic()
                try:
                    list(stub.Generate(huge, timeout=60))
                except grpc.RpcError as error:
                    refusals.append((time.monotonic() - start, error.code(), error.details()))

    thread = threading.Thread(target=hostile)
    thread.start()
    gaps, _ = _stream_gaps(replica, tokens)
    thread.join(120)
    print(
        f"largest gap between tokens: {max(baseline) * 1000:.0f} ms alone, "
        f"{max(gaps) * 1000:.0f} ms beside 4 MB prompts; refused in "
        f"{', '.join(f'{s * 1000:.0f} ms' for s, _, _ in refusals)}"
    )
    assert len(refusals) == 3
    for seconds, code, details in refusals:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("prompt.text: ")
        assert seconds < 2
    assert max(gaps) < 0.5  # tokenizing 4 MB on the event loop stalled streams 1.24 s

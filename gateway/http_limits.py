"""What one HTTP client may hold of the gateway: connections, time, and bytes.

- Connections: beyond `max_connections` open at once, a new connection is answered 503
  (OpenAI-shaped JSON, `Connection: close`) and closed at once, not queued.
- Headers: aiohttp's keep-alive timer (`keepalive_timeout`) runs from a connection's opening
  and from each response it gets; a connection still without a whole request line and
  headers when it fires is closed. So `header_timeout_s` bounds a slow sender of headers and
  an idle keep-alive connection alike (and a TLS handshake, before them).
- Body: it must arrive whole within `body_timeout_s` (408, then the connection is closed) and
  be at most `max_body_bytes` (413: at once when Content-Length says so, else as soon as the
  bytes read pass the cap).
- Writes: a connection whose writes have stayed paused for `write_timeout_s` (the client
  stopped reading and the buffers are full) is aborted. The timer runs only while a write is
  stalled, so a stream whose client keeps reading is never cut, however long it lasts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from sloserve.errors import FieldError
from sloserve.gateway.openai_format import error_body

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 2 * 1024 * 1024
    header_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    write_timeout_s: float = 60.0
    max_connections: int = 1000

    def check(self) -> None:
        """Raises FieldError naming the flag (`http_body_timeout`) of a bad value."""
        if self.max_body_bytes < 1:
            raise FieldError("http_max_body_bytes", "must be at least 1")
        if self.max_connections < 1:
            raise FieldError("http_max_connections", "must be at least 1")
        for name, seconds in (
            ("http_header_timeout", self.header_timeout_s),
            ("http_body_timeout", self.body_timeout_s),
            ("http_write_timeout", self.write_timeout_s),
        ):
            if not (math.isfinite(seconds) and seconds > 0):
                raise FieldError(name, "must be a positive number of seconds")

    def runner_args(self) -> dict[str, Any]:
        """aiohttp's per-connection settings (web.AppRunner keyword arguments)."""
        return {"keepalive_timeout": self.header_timeout_s}


class RequestRefused(Exception):
    """A request the limits turn away: answered `status` in OpenAI's error shape."""

    def __init__(self, status: int, message: str, code: str, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.close = close  # close the connection after the answer (the client is too slow)


async def read_body(request: web.Request, limits: HttpLimits) -> bytes:
    """The request's body, within the byte cap and the body timeout."""
    cap = limits.max_body_bytes
    length = request.content_length
    if length is not None and length > cap:
        message = f"the request body ({length} bytes) is over the limit of {cap} bytes"
        raise RequestRefused(413, message, "body_too_large")
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            return await request.read()  # the app's client_max_size is `cap`
    except web.HTTPRequestEntityTooLarge:
        message = f"the request body is over the limit of {cap} bytes"
        raise RequestRefused(413, message, "body_too_large") from None
    except TimeoutError:
        message = f"the request body did not arrive within {limits.body_timeout_s:g} s"
        raise RequestRefused(408, message, "body_timeout", close=True) from None


def _unavailable(message: str, code: str) -> bytes:
    """A whole HTTP/1.1 503 response, written before any request was read."""
    body = json.dumps(error_body(503, message, None, code)).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class LimitedSite(web.BaseSite):
    """A TCP site (as web.TCPSite) whose connections are capped and whose stalled writes
    time out; everything else is aiohttp's own request handler."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limits: HttpLimits,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self.limits = limits
        self.open_connections = 0
        self._full = _unavailable(
            f"the gateway has {limits.max_connections} connections open, its limit; retry",
            "too_many_connections",
        )

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    def admit(self, transport: asyncio.Transport) -> bool:
        """Counts a new connection in, or answers it 503 and closes it when the site is full."""
        if self.open_connections >= self.limits.max_connections:
            transport.write(self._full)
            transport.close()
            return False
        self.open_connections += 1
        return True

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # A TLS handshake comes before the headers: it gets the same time.
        handshake_s = self.limits.header_timeout_s if self._ssl_context else None
        self._server = await loop.create_server(
            lambda: _GuardedConnection(self, server, loop),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=handshake_s,
        )


class _GuardedConnection(asyncio.Protocol):
    """One connection: counted while open (refused when the site is full), aborted when a
    write stalls too long; its HTTP is aiohttp's request handler, to which it delegates."""

    def __init__(
        self, site: LimitedSite, server: web.Server, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._site = site
        self._server = server
        self._loop = loop
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: uvloop's implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if not self._site.admit(transport):
            return
        # Made here, not when the connection was accepted: a refused one needs none.
        self._inner = self._server()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stall is not None:
            self._stall.cancel()
        if self._inner is not None:
            self._site.open_connections -= 1
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is None:
            return
        self._stall = self._loop.call_later(self._site.limits.write_timeout_s, self._abort)
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is None:
            return
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._inner.resume_writing()

    def _abort(self) -> None:
        self._stall = None
        if self._transport is not None:
            peer = self._transport.get_extra_info("peername")
            log.info(
                "closing the connection from %s: its writes stalled for %g s",
                peer,
                self._site.limits.write_timeout_s,
            )
            self._transport.abort()

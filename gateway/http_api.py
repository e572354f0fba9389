"""The OpenAI-compatible HTTP front door (aiohttp), over the same dispatcher as gRPC.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming over SSE
when `stream` is true), GET /v1/slo/summary (for operators), GET /healthz.

Errors use OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, whatever
the failure: 400 names the bad field in `param` (every number is range-checked, and NaN,
Infinity, unpaired surrogate escapes and too deep nesting are refused: openai_format.py);
401 (no or unknown API key, when keys are on) and 403 (an SLO class the tenant may not use)
carry the reason in `code`; 404/405 for an unknown route or method; 408 (the body came too
slowly), 413 (the body is over the cap) and 415 (a charset other than UTF-8) carry it in
`code` too (http_limits.py has the limits); 429 (not admitted, queue full, over the tenant's
rate limit) carries the reason in `code` and a Retry-After header; 503 when no replica can
take requests, or the gateway has its most connections open; 500, logged with its
traceback, for a failure of the gateway's own. A stream that fails after it started ends
with one `data: {"error": ...}` event instead of `data: [DONE]`.

Streams: `stream_options.include_usage` adds a last chunk with the usage; with
`continuous_usage_stats` too, every chunk carries the cumulative usage and every token delta
gets a chunk, even one whose text is empty (the detokenizer holding back part of a
character), as vLLM's server does: a client then counts tokens, and times each, exactly. The
first chunk carries the `sloserve` report of how the request is served (admitted or best
effort), and a demotion to best effort mid-stream sends the report again at once, in a chunk
with no choices (as the usage chunk has none), so that no client times it as a token: a
client that stops reading before the end (it has what it wanted) still knows.

A client that disconnects cancels its request: the handler is cancelled (the server runs it
with aiohttp's handler_cancellation), and with it the replica call, which aborts the request
in the engine.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from sloserve.errors import FieldError
from sloserve.gateway import openai_format as oai
from sloserve.gateway.dispatch import Dispatcher
from sloserve.gateway.failures import GatewayError
from sloserve.gateway.http_limits import HttpLimits, RequestRefused, read_body
from sloserve.protoconv import seconds
from sloserve.v1 import inference_pb2, slo_pb2

log = logging.getLogger(__name__)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _field_error(bad: FieldError) -> web.Response:
    return web.json_response(oai.error_body(400, str(bad), bad.field, None), status=400)


@dataclass(frozen=True)
class _HttpError:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def _gateway_error(error: GatewayError, prompt_field: str) -> _HttpError:
    status = _HTTP_STATUS.get(error.code, 500)
    details = error.details
    headers: dict[str, str] = {}
    if details.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(details.retry_after_s)))
        headers["retry-after-ms"] = str(round(details.retry_after_s * 1000))
    message = error.status.message
    param = oai.body_field(details.field, prompt_field) if details.field else None
    if param is not None and details.field != param:
        message = f"{param}: {message.split(': ', 1)[-1]}"
    return _HttpError(
        status, oai.error_body(status, message, param, details.reason or None), headers
    )


@dataclass
class _Generation:
    """A GenerateResponse stream, accumulated."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # so far; the Completion's count once it came
    admission: inference_pb2.Admission | None = None
    completion: inference_pb2.Completion | None = None
    demoted: bool = False  # admitted, then demoted to best effort

    def feed(self, response: inference_pb2.GenerateResponse) -> str:
        """Takes one response; returns the text it adds."""
        event = response.WhichOneof("event")
        if event == "admission":
            self.admission = response.admission
            self.prompt_tokens = response.admission.prompt_tokens
        elif event == "delta":
            self.text += response.delta.text
            self.completion_tokens += len(response.delta.token_ids)
            return response.delta.text
        elif event == "demotion":
            self.demoted = True
        elif event == "completion":
            self.completion = response.completion
            self.finish_reason = oai.FINISH_REASONS.get(response.completion.finish_reason)
            self.completion_tokens = response.completion.usage.completion_tokens
        return ""

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def slo_report(self) -> dict[str, Any]:
        """sloserve's extension of the response: how the request was served."""
        report: dict[str, Any] = {}
        if self.admission is not None:
            best_effort = self.admission.mode == slo_pb2.ADMISSION_MODE_BEST_EFFORT
            report["mode"] = "best_effort" if best_effort or self.demoted else "admitted"
            report["slo_class"] = self.admission.class_name
            report["request_id"] = self.admission.request_id
        if self.demoted:
            report["demoted"] = True
        if self.completion is not None:
            outcome = self.completion.slo_outcome
            report |= {
                "attained": outcome.attained,
                "ttft_s": seconds(outcome.ttft),
                "mean_tpot_s": seconds(outcome.mean_tpot),
            }
        return report


class _Kind:
    """What differs between /v1/completions and /v1/chat/completions."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self.prompt_field = "messages" if chat else "prompt"
        self.max_tokens_field = "max_completion_tokens" if chat else "max_tokens"
        self.id_prefix = "chatcmpl" if chat else "cmpl"

    def prompt(self, body: dict[str, Any]) -> str | list[int]:
        if self.chat:
            return oai.render_chat(body.get("messages"))
        if "prompt" not in body:
            raise FieldError("prompt", "is required")
        return oai.completion_prompt(body["prompt"])

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(
        self, text: str, finish_reason: str | None, first: bool = False
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text else {}
            if first:
                delta = {"role": "assistant", "content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


class HttpApi:
    def __init__(
        self,
        dispatcher: Dispatcher,
        model_names: list[str],
        status: Callable[[], dict[str, Any]],
        limits: HttpLimits | None = None,
    ) -> None:
        self._dispatcher = dispatcher
        self._models = model_names
        self._status = status
        self._limits = limits or HttpLimits()
        self._created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self._limits.max_body_bytes, middlewares=[_json_errors]
        )
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/slo/summary", self.summary)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._dispatcher.authenticate(request.headers.get("Authorization"))
        except GatewayError as error:
            return self._error_response(_gateway_error(error, "prompt"))
        data = [
            {"id": name, "object": "model", "created": self._created, "owned_by": "sloserve"}
            for name in self._models
        ]
        return web.json_response({"object": "list", "data": data})

    async def summary(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def healthz(self, request: web.Request) -> web.Response:
        serving = self._dispatcher.serving()
        return web.json_response(
            {"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, _Kind(chat=False))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, _Kind(chat=True))

    async def _serve(self, http: web.Request, kind: _Kind) -> web.StreamResponse:
        # The SLO clock starts here, before the body is read: the client's started earlier
        # still (the event loop's lag before this handler ran, loop_lag.py, is what is left).
        received_at = time.time()
        try:
            body = oai.parse_json(_text(http, await read_body(http, self._limits)))
        except RequestRefused as refused:
            return await _refuse(http, refused)
        except FieldError as bad:
            return _field_error(bad)
        try:
            if not isinstance(body, dict):
                raise FieldError("body", "must be a JSON object")
            model = body.get("model")
            if not isinstance(model, str):
                raise FieldError("model", "is required")
            if model not in self._models:
                message = f"model {model!r} is not served; served: {self._models}"
                return web.json_response(
                    oai.error_body(404, message, "model", "model_not_found"), status=404
                )
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise FieldError("stream", "must be true or false")
            prompt = kind.prompt(body)
            generate = oai.generate_request(body, prompt, http.headers, kind.max_tokens_field)
        except FieldError as bad:
            return _field_error(bad)
        responses = self._dispatcher.generate(
            generate, http.headers.get("Authorization"), received_at
        )
        try:
            first = await anext(responses)
        except GatewayError as error:
            return self._error_response(_gateway_error(error, kind.prompt_field))
        except StopAsyncIteration:
            first = None
        common = {
            "id": f"{kind.id_prefix}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": model,
        }
        if stream:
            usage = _stream_usage(body)
            return await self._stream(http, kind, common, first, responses, usage)
        return await self._collect(kind, common, first, responses)

    def _error_response(self, error: _HttpError) -> web.Response:
        return web.json_response(error.body, status=error.status, headers=error.headers)

    async def _collect(
        self,
        kind: _Kind,
        common: dict[str, Any],
        first: inference_pb2.GenerateResponse | None,
        rest: AsyncGenerator[inference_pb2.GenerateResponse, None],
    ) -> web.Response:
        generation = _Generation()
        try:
            if first is not None:
                generation.feed(first)
            async for response in rest:
                generation.feed(response)
        except GatewayError as error:
            return self._error_response(_gateway_error(error, kind.prompt_field))
        finally:
            await rest.aclose()  # the client went away: cancel the replica's work too
        return web.json_response(
            common
            | {
                "object": kind.object,
                "choices": [kind.choice(generation.text, generation.finish_reason)],
                "usage": generation.usage(),
                "sloserve": generation.slo_report(),
            }
        )

    async def _stream(
        self,
        http: web.Request,
        kind: _Kind,
        common: dict[str, Any],
        first: inference_pb2.GenerateResponse | None,
        rest: AsyncGenerator[inference_pb2.GenerateResponse, None],
        usage: _StreamUsage,
    ) -> web.StreamResponse:
        sse = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await sse.prepare(http)
        chunk = common | {"object": kind.chunk_object}

        async def send(data: dict[str, Any]) -> None:
            await sse.write(f"data: {json.dumps(data)}\n\n".encode())

        def notice(generation: _Generation) -> dict[str, Any]:
            # No choices: benchmark clients (vLLM's among them) time every chunk with a choice
            # as a token's arrival, and a notice is not one.
            data = chunk | {"choices": [], "sloserve": generation.slo_report()}
            if usage.continuous:
                data["usage"] = generation.usage()
            return data

        generation = _Generation()
        sent_first = False
        # Text that came without a token (the tail the detokenizer held back, after the last
        # token) rides on the finishing chunk: every chunk before it brings a token.
        tail = ""
        try:
            responses = _chain(first, rest)
            async for response in responses:
                tokens, demoted = generation.completion_tokens, generation.demoted
                text = generation.feed(response)
                added = generation.completion_tokens > tokens
                if text and not added:
                    tail, text = tail + text, ""
                counted = usage.continuous and added
                news = generation.demoted != demoted
                chat_opens = kind.chat and not sent_first and generation.admission is not None
                if news:
                    await send(notice(generation))
                if not (text or counted or chat_opens):
                    continue
                data = chunk | {"choices": [kind.chunk_choice(text, None, not sent_first)]}
                if not sent_first:
                    data["sloserve"] = generation.slo_report()
                if usage.continuous:
                    data["usage"] = generation.usage()
                await send(data)
                sent_first = True
            last = chunk | {
                "choices": [kind.chunk_choice(tail, generation.finish_reason)],
                "sloserve": generation.slo_report(),
            }
            if usage.continuous:
                last["usage"] = generation.usage()
            await send(last)
            if usage.include:
                await send(chunk | {"choices": [], "usage": generation.usage()})
            await sse.write(b"data: [DONE]\n\n")
        except GatewayError as error:
            await send(_gateway_error(error, kind.prompt_field).body)
        except ConnectionError:
            raise  # the client went away: nothing to tell it
        except Exception:
            # The headers are sent: the stream can only end with an error event.
            log.exception("a stream failed")
            await send(oai.error_body(500, "internal error", None, None))
        finally:
            await rest.aclose()
        await sse.write_eof()
        return sse


def _text(http: web.Request, raw: bytes) -> str:
    """The body as text: JSON is UTF-8 (RFC 8259), and a charset naming another is refused."""
    charset = http.charset
    if charset is not None:
        try:
            known = codecs.lookup(charset).name
        except LookupError:
            known = None
        if known not in ("utf-8", "ascii"):
            message = f"charset {charset!r} is not supported: send JSON in UTF-8"
            raise RequestRefused(415, message, "unsupported_charset")
    try:
        return raw.decode()
    except UnicodeDecodeError as bad:
        raise FieldError("body", f"must be UTF-8: {bad.reason} at byte {bad.start}") from None


async def _refuse(http: web.Request, refused: RequestRefused) -> web.Response:
    body = oai.error_body(refused.status, refused.message, None, refused.code)
    response = web.json_response(body, status=refused.status)
    if not refused.close:
        return response
    # Sent and closed here: aiohttp would otherwise keep reading the slow body for up to
    # its lingering time before closing.
    response.force_close()
    await response.prepare(http)
    await response.write_eof()
    if http.transport is not None:
        http.transport.close()
    return response


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every answer in OpenAI's error shape: aiohttp's own (unknown route, wrong method) and
    an unexpected failure's (500, logged with its traceback) alike."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        if error.status == 404:
            message = f"no such route: {request.method} {request.path}"
        elif error.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        else:
            message = error.reason
        body = oai.error_body(error.status, message, None, None)
        return web.json_response(body, status=error.status, headers=headers)
    except ConnectionError:
        raise  # the client went away: nothing to tell it
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        body = oai.error_body(500, "internal error", None, None)
        return web.json_response(body, status=500)


async def _chain(
    first: inference_pb2.GenerateResponse | None,
    rest: AsyncIterator[inference_pb2.GenerateResponse],
) -> AsyncIterator[inference_pb2.GenerateResponse]:
    if first is not None:
        yield first
    async for response in rest:
        yield response


@dataclass(frozen=True)
class _StreamUsage:
    """A stream's `stream_options`, as vLLM's server reads them."""

    include: bool = False  # a last chunk with the usage
    continuous: bool = False  # the cumulative usage on every chunk (needs `include`)


def _stream_usage(body: dict[str, Any]) -> _StreamUsage:
    options = body.get("stream_options")
    if not isinstance(options, dict) or options.get("include_usage") is not True:
        return _StreamUsage()
    return _StreamUsage(include=True, continuous=options.get("continuous_usage_stats") is True)

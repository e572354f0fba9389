"""OpenAI's request and response shapes, translated to and from the Inference API.

Request bodies become GenerateRequests here, and every bad field raises FieldError with the
body's own name for it (`max_tokens`, `messages[1].content`, `slo.ttft_ms`).

sloserve extensions to the bodies:
- `slo_class`: the SLO class (or the `x-sloserve-slo-class` header);
- `slo`: explicit budgets, `{"ttft_ms": ..., "tpot_ms": ..., "thinking_tpot_ms": ...}`;
- `allow_best_effort`: accept best-effort service (or `x-sloserve-allow-best-effort: true`);
- `ignore_eos`: keep generating after end-of-sequence (as vLLM's server has it).
`user` becomes the request's tenant.

Chat messages become one prompt text (the gateway has no tokenizer, so no model chat
template): each message as `<role>: <content>` on its own line, then `assistant:`.

Bodies are parsed strictly (`parse_json`): NaN, Infinity and numbers too large for a double
are refused naming where they are, as are strings with an unpaired UTF-16 surrogate escape
(protobuf strings are UTF-8) and nesting too deep to parse. Every number is range-checked
here, against what the GenerateRequest field can carry and what OpenAI's API documents, so
that no client value reaches protobuf (which raises on out-of-range integers) or a replica
unchecked.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from sloserve.errors import FieldError
from sloserve.protoconv import duration
from sloserve.v1 import inference_pb2

SLO_CLASS_HEADER = "x-sloserve-slo-class"
BEST_EFFORT_HEADER = "x-sloserve-allow-best-effort"
SESSION_HEADER = "x-sloserve-session"
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

INT32_MAX = 2**31 - 1  # GenerateRequest.sampling.max_tokens is an int32
FLOAT32_MAX = 3.4028234663852886e38  # a proto `float`
UINT32_MAX = 2**32 - 1  # token ids and slo.thinking_tokens are uint32
INT64_MAX = 2**63 - 1  # seeds: OpenAI's and vLLM's are 64-bit signed
MAX_BUDGET_MS = 86_400_000  # a day: any longer budget is no latency objective

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "slo_rejected",
    503: "service_unavailable",
    504: "deadline_exceeded",
}


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error shape for an HTTP status."""
    kind = ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# Proto field paths (what a replica's INVALID_ARGUMENT names) -> the body's names.
_BODY_FIELDS = {
    "sampling.max_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.seed": "seed",
    "sampling.stop": "stop",
    "slo.class_name": "slo_class",
    "labels[session]": "session_id",
    "slo.budgets.ttft": "slo.ttft_ms",
    "slo.budgets.tpot": "slo.tpot_ms",
    "slo.budgets.thinking_tpot": "slo.thinking_tpot_ms",
    "slo.budgets.thinking_tokens": "slo.thinking_tokens",
}


def body_field(proto_field: str, prompt_field: str) -> str:
    """The body's name for a field a GenerateRequest error names."""
    if proto_field == "prompt" or proto_field.startswith("prompt."):
        return prompt_field
    return _BODY_FIELDS.get(proto_field, proto_field)


def render_chat(messages: object) -> str:
    """The prompt text for a chat (see the module docstring for the template)."""
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "must be a non-empty list of messages")
    lines = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise FieldError(f"messages[{i}]", "must be an object with role and content")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise FieldError(f"messages[{i}].role", f"must be one of {list(CHAT_ROLES)}")
        lines.append(f"{role}: {_content_text(message.get('content'), f'messages[{i}].content')}")
    lines.append("assistant:")
    return "\n".join(lines)


def _content_text(content: object, field: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                raise FieldError(f"{field}[{j}]", "only text parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise FieldError(f"{field}[{j}].text", "must be a string")
            texts.append(text)
        return "".join(texts)
    raise FieldError(field, "must be a string or a list of text parts")


_NOT_FINITE = object()  # what parse_json's decoder makes of NaN, Infinity and 1e999
# A JSON escape of a UTF-16 surrogate; the decoder pairs valid ones into one character, so
# only a body that has one can hold a string protobuf cannot encode.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str) -> object:
    """A request body's JSON, strictly; raises FieldError naming what is wrong, and where."""
    suspect = False

    def not_finite(_token: str) -> object:
        nonlocal suspect
        suspect = True
        return _NOT_FINITE

    def number(token: str) -> object:
        value = float(token)
        return value if math.isfinite(value) else not_finite(token)

    try:
        body = json.loads(text, parse_constant=not_finite, parse_float=number)
    except RecursionError:
        raise FieldError("body", "is nested too deeply") from None
    except ValueError as bad:  # JSONDecodeError, and integers past Python's digit limit
        raise FieldError("body", f"must be JSON: {bad}") from None
    if suspect or _SURROGATE_ESCAPE.search(text):
        _check_values(body)
    return body


def _check_values(body: object) -> None:
    """Finds the first value a GenerateRequest cannot carry, whether or not it is used."""
    stack: list[tuple[str, object]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if value is _NOT_FINITE:
            message = "must be a finite number (not NaN, Infinity or beyond a double's range)"
            raise FieldError(path or "body", message)
        if isinstance(value, str):
            _check_text(value, path or "body")
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                _check_text(key, path or "body")
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))


def _check_text(text: str, field: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise FieldError(field, "has an unpaired UTF-16 surrogate escape") from None


def completion_prompt(prompt: object) -> str | list[int]:
    """A completions `prompt`: a string, or token ids (one prompt per request)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # the client library sends [prompt] for one prompt at times
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_integer(t) for t in prompt):
        # The replica checks the ids against its vocabulary; here, what a uint32 can carry.
        bad = next((i for i, t in enumerate(prompt) if not 0 <= t <= UINT32_MAX), None)
        if bad is not None:
            raise FieldError("prompt", f"token id at index {bad} must be from 0 to {UINT32_MAX}")
        return list(prompt)
    raise FieldError("prompt", "must be a string or a non-empty list of token ids (one prompt)")


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(
    body: Mapping[str, Any], name: str, low: float, high: float, low_open: bool = False
) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, "must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(name, "must be a finite number")
    # Compared as given: an int past a double's range cannot become a float.
    if (value <= low if low_open else value < low) or value > high:
        opening = f"above {low:g}" if low_open else f"at least {low:g}"
        raise FieldError(name, f"must be {opening} and at most {high:g}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_integer(value):
        raise FieldError(name, "must be an integer")
    if not low <= value <= high:
        raise FieldError(name, f"must be from {low} to {high}")
    return int(value)


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise FieldError(name, "must be true or false")
    return value


def _stop(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise FieldError("stop", "must be a string or a list of strings")


def _slo(request: inference_pb2.GenerateRequest, body: Mapping[str, Any], header: str) -> None:
    slo_class = body.get("slo_class", header or None)
    budgets = body.get("slo")
    if slo_class is not None and budgets is not None:
        raise FieldError("slo", "give slo_class or slo budgets, not both")
    if slo_class is not None:
        if not isinstance(slo_class, str) or not slo_class:
            raise FieldError("slo_class", "must be a non-empty string")
        request.slo.class_name = slo_class
        return
    if budgets is None:
        return  # the default class
    if not isinstance(budgets, Mapping):
        raise FieldError("slo", "must be an object with ttft_ms and tpot_ms")
    target = request.slo.budgets
    for name, proto in (("ttft_ms", target.ttft), ("tpot_ms", target.tpot)):
        ms = _budget_ms(budgets, name)
        if ms is None:
            raise FieldError(f"slo.{name}", "is required with explicit budgets")
        proto.CopyFrom(duration(ms / 1000))
    thinking = _budget_ms(budgets, "thinking_tpot_ms")
    if thinking is not None:
        target.thinking_tpot.CopyFrom(duration(thinking / 1000))
    thinking_tokens = budgets.get("thinking_tokens", 0)
    if not _is_integer(thinking_tokens):
        raise FieldError("slo.thinking_tokens", "must be an integer")
    if not 0 <= thinking_tokens <= UINT32_MAX:
        raise FieldError("slo.thinking_tokens", f"must be from 0 to {UINT32_MAX}")
    target.thinking_tokens = thinking_tokens


def _budget_ms(budgets: Mapping[str, Any], name: str) -> float | None:
    value = budgets.get(name)
    if value is None:
        return None
    # Compared as given: an int past a double's range cannot become a float.
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value <= MAX_BUDGET_MS
    ):
        raise FieldError(
            f"slo.{name}", f"must be a positive number of milliseconds, at most {MAX_BUDGET_MS}"
        )
    return float(value)


def generate_request(
    body: object, prompt: str | list[int], headers: Mapping[str, str], max_tokens_field: str
) -> inference_pb2.GenerateRequest:
    """The GenerateRequest for a completions or chat body (prompt already extracted)."""
    assert isinstance(body, Mapping)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise FieldError("user", "must be a string")
    request = inference_pb2.GenerateRequest(tenant=user or "")
    if isinstance(prompt, str):
        request.prompt.text = prompt
    else:
        request.prompt.token_ids.ids.extend(prompt)
    n = body.get("n")
    if n is not None and not (_is_integer(n) and n == 1):
        raise FieldError("n", "only n=1 is supported")
    sampling = request.sampling
    if max_tokens_field != "max_tokens" and body.get(max_tokens_field) is None:
        max_tokens_field = "max_tokens"  # chat's older name
    if (max_tokens := _integer(body, max_tokens_field, 1, INT32_MAX)) is not None:
        sampling.max_tokens = max_tokens
    # vLLM's ranges: any temperature >= 0 (OpenAI stops at 2; a vLLM client may not), up to
    # what the API's 32-bit float holds.
    if (temperature := _number(body, "temperature", 0, FLOAT32_MAX)) is not None:
        sampling.temperature = temperature
    if (top_p := _number(body, "top_p", 0, 1, low_open=True)) is not None:
        sampling.top_p = top_p
    if (seed := _integer(body, "seed", 0, INT64_MAX)) is not None:
        sampling.seed = seed
    sampling.stop.extend(_stop(body))
    sampling.ignore_eos = _flag(body, "ignore_eos")
    _slo(request, body, headers.get(SLO_CLASS_HEADER, ""))
    header_best_effort = headers.get(BEST_EFFORT_HEADER, "").lower() in ("1", "true", "yes")
    request.allow_best_effort = _flag(body, "allow_best_effort") or header_best_effort
    # A multi-round session (tool calling): its rounds prefer one replica (gateway affinity).
    session = body.get("session_id")
    if session is None:
        session = headers.get(SESSION_HEADER, "")
    if not isinstance(session, str):
        raise FieldError("session_id", "must be a string")
    if session:
        request.labels["session"] = session
    return request


FINISH_REASONS = {
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_LENGTH: "length",
}

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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sloserve.errors import FieldError
from sloserve.protoconv import duration
from sloserve.v1 import inference_pb2

SLO_CLASS_HEADER = "x-sloserve-slo-class"
BEST_EFFORT_HEADER = "x-sloserve-allow-best-effort"
SESSION_HEADER = "x-sloserve-session"
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

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


def completion_prompt(prompt: object) -> str | list[int]:
    """A completions `prompt`: a string, or token ids (one prompt per request)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # the client library sends [prompt] for one prompt at times
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return list(prompt)
    raise FieldError("prompt", "must be a string or a non-empty list of token ids (one prompt)")


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(name, "must be a number")
    return float(value)


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, "must be an integer")
    return value


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
        value = budgets.get(name)
        if value is None:
            raise FieldError(f"slo.{name}", "is required with explicit budgets")
        proto.CopyFrom(duration(_positive_ms(value, f"slo.{name}")))
    thinking = budgets.get("thinking_tpot_ms")
    if thinking is not None:
        target.thinking_tpot.CopyFrom(duration(_positive_ms(thinking, "slo.thinking_tpot_ms")))
    thinking_tokens = budgets.get("thinking_tokens", 0)
    if isinstance(thinking_tokens, bool) or not isinstance(thinking_tokens, int):
        raise FieldError("slo.thinking_tokens", "must be an integer")
    if thinking_tokens < 0:
        raise FieldError("slo.thinking_tokens", "must not be negative")
    target.thinking_tokens = thinking_tokens


def _positive_ms(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FieldError(field, "must be a positive number of milliseconds")
    return float(value) / 1000


def generate_request(
    body: object, prompt: str | list[int], headers: Mapping[str, str], max_tokens_field: str
) -> inference_pb2.GenerateRequest:
    """The GenerateRequest for a completions or chat body (prompt already extracted)."""
    assert isinstance(body, Mapping)
    request = inference_pb2.GenerateRequest(tenant=str(body.get("user") or ""))
    if isinstance(prompt, str):
        request.prompt.text = prompt
    else:
        request.prompt.token_ids.ids.extend(prompt)
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise FieldError("n", "only n=1 is supported")
    sampling = request.sampling
    max_tokens = _integer(body, max_tokens_field)
    if max_tokens is None and max_tokens_field != "max_tokens":
        max_tokens = _integer(body, "max_tokens")  # chat's older name
    if max_tokens is not None:
        if max_tokens < 1:
            raise FieldError(max_tokens_field, "must be at least 1")
        sampling.max_tokens = max_tokens
    if (temperature := _number(body, "temperature")) is not None:
        sampling.temperature = temperature
    if (top_p := _number(body, "top_p")) is not None:
        sampling.top_p = top_p
    if (seed := _integer(body, "seed")) is not None:
        if seed < 0:
            raise FieldError("seed", "must not be negative")
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

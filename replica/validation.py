"""Turns a GenerateRequest into what the engine runs, or names the field that is wrong.

A text prompt is refused unread past `ModelLimits.max_prompt_chars`, and `validate_off_loop`
tokenizes it on a worker thread, so that a long prompt does not stall the streams the event
loop serves.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sloserve.errors import FieldError
from sloserve.slo import Budgets, RequestSlo, SloCatalog
from sloserve.v1 import inference_pb2, slo_pb2

MAX_REQUEST_ID_LENGTH = 256
# A text longer than this many characters per token of context cannot fit the context: text
# averages about 4 characters a token, and the longest entries of common vocabularies (runs
# of spaces or symbols) a few dozen. Longer text is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 32

# One thread, as vLLM's renderer has: a Hugging Face fast tokenizer is not safe to call from
# several threads at once. Its threads start on first use.
_TOKENIZER_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sloserve-tokenize")


@dataclass(frozen=True)
class ModelLimits:
    max_model_len: int
    vocab_size: int
    default_max_tokens: int  # cap when a request sets no max_tokens
    # Longest prompt a seeded request may have; None: any. vLLM on a CPU cannot split a
    # seeded request's prefill across steps, so there it is one step's token budget.
    max_seeded_prompt_tokens: int | None = None

    @property
    def max_prompt_chars(self) -> int:
        """The longest prompt text tokenized (see MAX_CHARS_PER_TOKEN)."""
        return self.max_model_len * MAX_CHARS_PER_TOKEN


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool


@dataclass(frozen=True)
class ValidRequest:
    prompt_token_ids: list[int]
    sampling: Sampling
    slo: RequestSlo


def _duration_s(field: str, value: object, present: bool) -> float | None:
    if not present:
        return None
    seconds = value.ToNanoseconds() / 1e9  # type: ignore[attr-defined]
    if not seconds > 0:
        raise FieldError(field, "must be a positive duration")
    return float(seconds)


def budgets_from_proto(budgets: slo_pb2.SloBudgets, field: str) -> Budgets:
    ttft = _duration_s(f"{field}.ttft", budgets.ttft, budgets.HasField("ttft"))
    tpot = _duration_s(f"{field}.tpot", budgets.tpot, budgets.HasField("tpot"))
    thinking = _duration_s(
        f"{field}.thinking_tpot", budgets.thinking_tpot, budgets.HasField("thinking_tpot")
    )
    if ttft is None:
        raise FieldError(f"{field}.ttft", "is required with explicit budgets")
    if tpot is None:
        raise FieldError(f"{field}.tpot", "is required with explicit budgets")
    if budgets.thinking_tokens and thinking is None:
        raise FieldError(f"{field}.thinking_tokens", "needs thinking_tpot")
    return Budgets(ttft, tpot, thinking, budgets.thinking_tokens)


def resolve_slo(spec: slo_pb2.SloSpec, catalog: SloCatalog, field: str) -> tuple[str, Budgets]:
    """(class name, budgets) a request asks for; class name "" for explicit budgets."""
    target = spec.WhichOneof("target")
    if target == "budgets":
        return "", budgets_from_proto(spec.budgets, f"{field}.budgets")
    name = spec.class_name if target == "class_name" else catalog.default_class
    slo_class = catalog.get(name)
    if slo_class is None:
        raise FieldError(
            f"{field}.class_name", f"unknown SLO class {name!r}; known: {sorted(catalog.classes)}"
        )
    return slo_class.name, slo_class.budgets


def already_waited_s(request: inference_pb2.GenerateRequest, budgets: Budgets) -> float:
    """GenerateRequest.already_waited in seconds (0 when unset).

    It must leave part of the TTFT budget: a request that has waited its whole budget can no
    longer be served in its class, and a negative wait would stretch the client's deadline.
    """
    if not request.HasField("already_waited"):
        return 0.0
    waited = request.already_waited.ToNanoseconds() / 1e9
    if waited < 0:
        raise FieldError("already_waited", "must not be negative")
    if waited >= budgets.ttft_s:
        raise FieldError(
            "already_waited",
            f"{waited:g} s must be less than the TTFT budget ({budgets.ttft_s:g} s)",
        )
    return float(waited)


def _prompt_ids(
    prompt: inference_pb2.Prompt,
    tokenize: Callable[[str], Sequence[int]],
    limits: ModelLimits,
) -> list[int]:
    kind = prompt.WhichOneof("kind")
    if kind == "text":
        check_prompt_text(prompt.text, limits)
        ids = list(tokenize(prompt.text))
        if not ids:
            raise FieldError("prompt.text", "tokenizes to no tokens")
        _check_room(ids, limits)
    elif kind == "token_ids":
        ids = list(prompt.token_ids.ids)
        if not ids:
            raise FieldError("prompt.token_ids", "must not be empty")
        _check_room(ids, limits)  # before the vocabulary scan: it bounds that scan's length
        bad = next((t for t in ids if t >= limits.vocab_size), None)
        if bad is not None:
            raise FieldError(
                "prompt.token_ids",
                f"token id {bad} is outside the vocabulary ({limits.vocab_size})",
            )
    else:
        raise FieldError("prompt", "is required: set text or token_ids")
    return ids


def check_prompt_text(text: str, limits: ModelLimits) -> None:
    """What can be said of a text prompt without tokenizing it."""
    if len(text) > limits.max_prompt_chars:
        raise FieldError(
            "prompt.text",
            f"{len(text)} characters are more than the {limits.max_prompt_chars} accepted "
            f"({MAX_CHARS_PER_TOKEN} per token of the model's {limits.max_model_len}-token "
            "context)",
        )
    if not text.strip():
        raise FieldError("prompt.text", "must not be empty")


def _check_room(ids: list[int], limits: ModelLimits) -> None:
    # The model needs room for at least one generated token.
    if len(ids) >= limits.max_model_len:
        raise FieldError(
            "prompt",
            f"{len(ids)} tokens leave no room in the model's context of "
            f"{limits.max_model_len} tokens",
        )


def _sampling(
    params: inference_pb2.SamplingParams, prompt_len: int, limits: ModelLimits
) -> Sampling:
    room = limits.max_model_len - prompt_len
    if params.HasField("max_tokens"):
        max_tokens = params.max_tokens
        if max_tokens < 1:
            raise FieldError("sampling.max_tokens", f"must be at least 1, got {max_tokens}")
        if max_tokens > room:
            raise FieldError(
                "sampling.max_tokens",
                f"{max_tokens} tokens after a {prompt_len}-token prompt exceed the model's "
                f"context of {limits.max_model_len} tokens (at most {room})",
            )
    else:
        max_tokens = min(room, limits.default_max_tokens)
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and temperature >= 0):
        raise FieldError("sampling.temperature", "must be a finite number >= 0")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise FieldError("sampling.top_p", "must be in (0, 1]")
    if any(not s for s in params.stop):
        raise FieldError("sampling.stop", "stop strings must not be empty")
    seeded_limit = limits.max_seeded_prompt_tokens
    if params.HasField("seed") and seeded_limit is not None and prompt_len > seeded_limit:
        raise FieldError(
            "sampling.seed",
            f"is supported on this CPU engine for prompts of at most {seeded_limit} tokens "
            f"(one step's budget), and the prompt has {prompt_len}; leave the seed unset",
        )
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        ignore_eos=params.ignore_eos,
    )


def validate(
    request: inference_pb2.GenerateRequest,
    catalog: SloCatalog,
    limits: ModelLimits,
    tokenize: Callable[[str], Sequence[int]],
    arrival_time: float | None = None,
) -> ValidRequest:
    """The engine's view of a request; raises FieldError naming the first bad field."""
    if len(request.request_id) > MAX_REQUEST_ID_LENGTH:
        raise FieldError("request_id", f"must be at most {MAX_REQUEST_ID_LENGTH} characters")
    class_name, budgets = resolve_slo(request.slo, catalog, "slo")
    waited = already_waited_s(request, budgets)
    ids = _prompt_ids(request.prompt, tokenize, limits)
    sampling = _sampling(request.sampling, len(ids), limits)
    slo_class = catalog.get(class_name) if class_name else None
    # A class that forbids best effort overrides the client: such a request is rejected
    # rather than served best effort, and ended rather than demoted.
    best_effort_forbidden = slo_class is not None and not slo_class.best_effort
    slo = RequestSlo(
        request_id=request.request_id or f"req-{uuid.uuid4().hex[:16]}",
        class_name=class_name,
        budgets=budgets,
        allow_best_effort=request.allow_best_effort and not best_effort_forbidden,
        arrival_time=arrival_time if arrival_time is not None else time.time(),
        tenant=request.tenant,
        labels=dict(request.labels),
        strict=request.strict or best_effort_forbidden,
        already_waited_s=waited,
    )
    return ValidRequest(prompt_token_ids=ids, sampling=sampling, slo=slo)


async def validate_off_loop(
    request: inference_pb2.GenerateRequest,
    catalog: SloCatalog,
    limits: ModelLimits,
    tokenize: Callable[[str], Sequence[int]],
    arrival_time: float | None = None,
) -> ValidRequest:
    """validate(), with a text prompt tokenized on the tokenizer thread: the event loop goes
    on serving other streams meanwhile. The same checks as validate(), those of a text
    prompt made first: a text over the cap is refused before anything else is done."""
    prompt = request.prompt
    if prompt.WhichOneof("kind") != "text":
        return validate(request, catalog, limits, tokenize, arrival_time)
    check_prompt_text(prompt.text, limits)
    loop = asyncio.get_running_loop()
    ids = await loop.run_in_executor(_TOKENIZER_THREAD, tokenize, prompt.text)
    return validate(request, catalog, limits, lambda _text: ids, arrival_time)

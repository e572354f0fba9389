"""Benchmark workloads: the scenarios and the request streams they build.

Follows the methodology (docs/slo.md §3-4), with arrival processes from
sloserve.bench.arrivals, trace replay from sloserve.bench.traces, and length scaling and SLO
presets from sloserve.bench.presets. Two properties hold for everything built here:

- Seeded and reproducible: the same arguments give an identical workload, so every system
  under comparison gets the same request stream (§3).
- Rate only moves arrivals: lengths, classes, budgets and request order are drawn from random
  streams that never see the rate. Every part is built at unit rate and its arrivals divided
  by the rate at the end. So a capacity search compares the same requests at every rate.

Each part of a workload draws from its own named stream (`_rng(seed, part, purpose)`), so
adding a draw to one part never shifts another part's numbers, and the mixed scenario's chat
part holds the same requests as the chatbot scenario at the same seed.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sloserve.bench.arrivals import Burst, GapSampler, exponential_gaps, gamma_sampler, unit_offsets
from sloserve.bench.presets import (
    CHAT,
    CODING,
    REASONING,
    SUMMARIZATION,
    TOOL_FINAL,
    TOOL_LOOP,
    LengthScale,
    SloPreset,
    SloReference,
    round_half_up,
)
from sloserve.bench.traces import (
    CODE_TRACE,
    CONV_TRACE,
    TraceRow,
    load_trace,
    observed_rate,
    trace_window,
)
from sloserve.bench.types import BenchRequest
from sloserve.slo import Budgets
from sloserve.stepmodel import StepTimeModel

# z-score of the 99th percentile of a standard normal: fits a log-normal to a median and a p99.
_Z99 = 2.3263478740408408


# -- random streams ----------------------------------------------------------------------------


def _rng(seed: int, *names: str) -> np.random.Generator:
    """An independent random stream per (seed, names): parts never share or shift draws."""
    if seed < 0:
        raise ValueError(f"seed must not be negative, got {seed}")
    # crc32 is stable across processes and Python versions (hash() of a str is salted).
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


# -- workloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A benchmark's request stream and what it was built from (all of it goes into results).

    `requests` are indexed 0..n-1 in arrival order. `rate` is requests/s as each scenario
    defines it (see its docstring); `arrival` names the arrival process; `scaling` is the
    LengthScale plus how many requests a cap clipped; `source` says where lengths and arrivals
    came from (trace file and window, or synthetic distributions).
    """

    name: str
    requests: list[BenchRequest]
    classes: dict[str, str]
    scaling: dict[str, Any]
    seed: int
    rate: float
    arrival: str
    source: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """Everything but the requests themselves."""
        return {
            "name": self.name,
            "requests": len(self.requests),
            "classes": dict(self.classes),
            "scaling": dict(self.scaling),
            "seed": self.seed,
            "rate": self.rate,
            "arrival": self.arrival,
            "source": dict(self.source),
        }

    def validate(self) -> None:
        """Raises ValueError unless indexes are 0..n-1 in arrival order and every `after`
        points to an earlier request of the same session."""
        for position, request in enumerate(self.requests):
            _validate_request(self.requests, position, request)


def _validate_request(requests: Sequence[BenchRequest], position: int, r: BenchRequest) -> None:
    if r.index != position:
        raise ValueError(f"request at position {position} has index {r.index}")
    if position and r.arrival_s < requests[position - 1].arrival_s:
        raise ValueError(f"request {position} arrives before request {position - 1}")
    if r.prompt_tokens < 1 or r.output_tokens < 1:
        raise ValueError(f"request {position} has an empty prompt or output")
    r.budgets.validate(f"requests[{position}].budgets")
    if r.after is not None:
        if not 0 <= r.after < position:
            raise ValueError(f"request {position} comes after {r.after}, not an earlier one")
        if requests[r.after].session != r.session or r.session is None:
            raise ValueError(f"request {position} follows a request of another session")


@dataclass(frozen=True)
class _Draft:
    """A request before the workload is merged: arrival in unit time, `after` part-local."""

    unit_arrival: float  # arrival when the part runs at 1 request/s
    slo_class: str
    budgets: Budgets
    prompt_tokens: int
    output_tokens: int
    session: int | None = None
    round: int = 0
    after: int | None = None
    delay_s: float = 0.0


@dataclass
class _Part:
    """One class's share of a workload, built at unit rate."""

    drafts: list[_Draft]
    arrival: str
    classes: dict[str, str]
    source: dict[str, Any]
    clipped: int


@dataclass(frozen=True)
class _Spec:
    """What every part builder needs."""

    ref: SloReference
    count: int
    seed: int
    scale: LengthScale
    trace_dir: Path | None


@dataclass(frozen=True)
class _LengthDist:
    """A log-normal fitted to a median and a p99, capped: close to LLM length histograms."""

    median: float
    p99: float
    cap: int

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        sigma = math.log(self.p99 / self.median) / _Z99
        values = rng.lognormal(math.log(self.median), sigma, n)
        return [int(v) for v in np.clip(np.rint(values), 1, self.cap)]

    def describe(self) -> dict[str, float]:
        return {"median": self.median, "p99": self.p99, "cap": self.cap}


# Synthetic stand-ins for the Azure traces, from their README's medians and p99s (the fit by
# median and p99 keeps the tails; means land within ~20% of the traces').
CHAT_PROMPT = _LengthDist(median=1020, p99=4142, cap=8192)
CHAT_OUTPUT = _LengthDist(median=129, p99=601, cap=2048)
CODE_PROMPT = _LengthDist(median=1469, p99=7436, cap=8192)
CODE_OUTPUT = _LengthDist(median=13, p99=252, cap=2048)
# Gap cv of the synthetic coding stand-in. The real code trace's gaps have cv ~13 (a few very
# long lulls between dense bursts); a Gamma renewal at that cv puts nearly every gap at zero,
# so the stand-in uses a moderately bursty 3. Replay the trace (trace_dir) for the real shape.
CODE_CV = 3.0
SUMMARY_PROMPT = _LengthDist(median=3000, p99=7000, cap=8192)
SUMMARY_OUTPUT = _LengthDist(median=200, p99=400, cap=1024)
REASONING_PROMPT = _LengthDist(median=150, p99=600, cap=2048)
REASONING_THINKING = _LengthDist(median=1000, p99=4000, cap=8192)
REASONING_ANSWER = _LengthDist(median=250, p99=800, cap=2048)
# Tool-calling agent: a system prompt with tool schemas, short tool calls, tool results that
# grow the context, a longer final answer.
TOOL_FIRST_PROMPT = _LengthDist(median=800, p99=2500, cap=4096)
TOOL_CALL_OUTPUT = _LengthDist(median=60, p99=200, cap=512)
TOOL_RESULT = _LengthDist(median=300, p99=1500, cap=2048)
TOOL_FINAL_OUTPUT = _LengthDist(median=250, p99=700, cap=2048)
TOOL_ROUNDS = (2, 6)
TOOL_DELAY_S = (0.2, 2.0)


def _scaled_pairs(
    spec: _Spec, prompts: Sequence[int], outputs: Sequence[int]
) -> tuple[list[tuple[int, int]], int]:
    """Scaled (prompt, output) pairs and how many a cap clipped."""
    pairs = [spec.scale.apply(p, o) for p, o in zip(prompts, outputs, strict=True)]
    clipped = sum(spec.scale.clipped(p, o) for p, o in zip(prompts, outputs, strict=True))
    return pairs, clipped


def _simple_part(
    spec: _Spec,
    class_name: str,
    preset: SloPreset,
    lengths: tuple[Sequence[int], Sequence[int]],
    arrivals: Sequence[float],
) -> tuple[list[_Draft], int]:
    """Single-round requests of one preset: budgets from each scaled prompt."""
    pairs, clipped = _scaled_pairs(spec, *lengths)
    drafts = [
        _Draft(t, class_name, spec.ref.budgets(preset, p), p, o)
        for t, (p, o) in zip(arrivals, pairs, strict=True)
    ]
    return drafts, clipped


def _trace_part(spec: _Spec, part: str, file: str, class_name: str, preset: SloPreset) -> _Part:
    """A class replayed from a trace: a seeded window of `count` rows, at unit mean rate.

    The seed picks where the window starts, so several seeds replay different stretches of
    the trace (the methodology runs 3 seeds); the rate only rescales the window's timestamps.
    """
    assert spec.trace_dir is not None
    path = spec.trace_dir / file
    rows = load_trace(path)
    if spec.count > len(rows):
        raise ValueError(f"{path} has {len(rows)} requests; {spec.count} asked for")
    start = int(_rng(spec.seed, part, "window").integers(0, len(rows) - spec.count + 1))
    window = trace_window(rows[start:], count=spec.count)
    rate = _replay_rate(window, rows)
    arrivals = [r.offset_s * rate for r in window]  # unit mean rate
    lengths = ([r.prompt_tokens for r in window], [r.output_tokens for r in window])
    drafts, clipped = _simple_part(spec, class_name, preset, lengths, arrivals)
    source = {"trace": file, "first_row": start, "rows": len(window), "trace_rate": rate}
    return _Part(drafts, f"trace:{file}", {class_name: spec.ref.describe(preset)}, source, clipped)


def _replay_rate(window: Sequence[TraceRow], rows: Sequence[TraceRow]) -> float:
    """The window's own mean rate; the whole trace's when the window has no time span (a
    short window inside one burst of simultaneous rows), so timestamps still scale."""
    for candidate in (window, rows):
        if len(candidate) >= 2 and candidate[-1].offset_s > candidate[0].offset_s:
            return observed_rate(candidate)
    if len(window) < 2:
        return 1.0  # a single request: no gaps to scale
    raise ValueError("every row of the trace arrives at once: it has no rate to scale")


def _synthetic_part(
    spec: _Spec,
    part: str,
    class_name: str,
    preset: SloPreset,
    dists: tuple[_LengthDist, _LengthDist],
    gaps: GapSampler,
    arrival: str,
) -> _Part:
    """A class with log-normal lengths and renewal arrivals at unit rate."""
    rng = _rng(spec.seed, part, "lengths")
    lengths = (dists[0].sample(rng, spec.count), dists[1].sample(rng, spec.count))
    arrivals = unit_offsets(_rng(spec.seed, part, "arrivals"), spec.count, gaps)
    drafts, clipped = _simple_part(spec, class_name, preset, lengths, arrivals)
    source = {"synthetic": {"prompt": dists[0].describe(), "output": dists[1].describe()}}
    return _Part(drafts, arrival, {class_name: spec.ref.describe(preset)}, source, clipped)


def _chat_part(spec: _Spec) -> _Part:
    if spec.trace_dir is not None:
        return _trace_part(spec, "chat", CONV_TRACE, "chat", CHAT)
    dists = (CHAT_PROMPT, CHAT_OUTPUT)
    return _synthetic_part(spec, "chat", "chat", CHAT, dists, exponential_gaps, "poisson")


def _coding_part(spec: _Spec) -> _Part:
    if spec.trace_dir is not None:
        return _trace_part(spec, "coding", CODE_TRACE, "coding", CODING)
    dists = (CODE_PROMPT, CODE_OUTPUT)
    gaps = gamma_sampler(CODE_CV)
    return _synthetic_part(spec, "coding", "coding", CODING, dists, gaps, f"gamma(cv={CODE_CV:g})")


def _summarization_part(spec: _Spec) -> _Part:
    dists = (SUMMARY_PROMPT, SUMMARY_OUTPUT)
    return _synthetic_part(
        spec, "summarization", "summarization", SUMMARIZATION, dists, exponential_gaps, "poisson"
    )


def _split_thinking(output: int, thinking: int, answer: int) -> int:
    """Thinking tokens of a scaled output, in the drawn proportion; at least one answer token."""
    if output < 2:
        return 0
    return min(output - 1, max(1, round_half_up(output * thinking / (thinking + answer))))


def _reasoning_part(spec: _Spec) -> _Part:
    """Short prompts, long outputs: thinking then answer, one TPOT each."""
    rng = _rng(spec.seed, "reasoning", "lengths")
    prompts = REASONING_PROMPT.sample(rng, spec.count)
    thinking = REASONING_THINKING.sample(rng, spec.count)
    answers = REASONING_ANSWER.sample(rng, spec.count)
    totals = [t + a for t, a in zip(thinking, answers, strict=True)]
    pairs, clipped = _scaled_pairs(spec, prompts, totals)
    arrivals = unit_offsets(_rng(spec.seed, "reasoning", "arrivals"), spec.count, exponential_gaps)
    drafts: list[_Draft] = []
    for t, (p, o), th, an in zip(arrivals, pairs, thinking, answers, strict=True):
        budgets = spec.ref.budgets(REASONING, p, thinking_tokens=_split_thinking(o, th, an))
        drafts.append(_Draft(t, "reasoning", budgets, p, o))
    source = {
        "synthetic": {
            "prompt": REASONING_PROMPT.describe(),
            "thinking": REASONING_THINKING.describe(),
            "answer": REASONING_ANSWER.describe(),
        }
    }
    classes = {"reasoning": spec.ref.describe(REASONING)}
    return _Part(drafts, "poisson", classes, source, clipped)


# -- tool calling ------------------------------------------------------------------------------


def _session_rounds(rng: np.random.Generator, count: int) -> list[int]:
    """Rounds per session, 2-6 each, summing to exactly `count` requests.

    A draw that would leave a single request over is nudged by one, so no session but a
    workload of one request has a single round.
    """
    low, high = TOOL_ROUNDS
    rounds: list[int] = []
    left = count
    while left > 0:
        k = int(rng.integers(low, high + 1))
        if k >= left:
            k = left
        elif left - k == 1:
            k = k + 1 if k < high else k - 1
        rounds.append(k)
        left -= k
    return rounds


@dataclass(frozen=True)
class _Session:
    """One agent session's scaled lengths: the first prompt, then per round its output and
    (from round 1) the tool result that joins the context before it."""

    first_prompt: int
    tool_results: list[int]  # one per follow-up round
    outputs: list[int]  # one per round
    delays_s: list[float]  # one per follow-up round

    def prompts(self) -> list[int]:
        """Each round's prompt: the previous prompt + previous output + new tool result."""
        prompts = [self.first_prompt]
        # One tool result per follow-up round: the final round's output feeds no further round.
        for output, tool in zip(self.outputs, self.tool_results, strict=False):
            prompts.append(prompts[-1] + output + tool)
        return prompts


def _draw_session(rng: np.random.Generator, rounds: int, scale: LengthScale) -> _Session:
    """Draws one session and scales its pieces; the whole session's context is fitted below."""
    first = scale.prompt(TOOL_FIRST_PROMPT.sample(rng, 1)[0])
    tools = [
        max(1, round_half_up(t * scale.prompt_factor)) for t in TOOL_RESULT.sample(rng, rounds - 1)
    ]
    calls = [scale.output(o) for o in TOOL_CALL_OUTPUT.sample(rng, rounds - 1)]
    final = scale.output(TOOL_FINAL_OUTPUT.sample(rng, 1)[0])
    delays = [float(d) for d in rng.uniform(*TOOL_DELAY_S, rounds - 1)]
    return _Session(first, tools, [*calls, final], delays)


def _shrink(pieces: list[int], limit: int) -> list[int]:
    """Pieces scaled down in proportion (each >= 1) so they sum to at most `limit`."""
    factor = limit / sum(pieces)
    shrunk = [max(1, math.floor(p * factor)) for p in pieces]
    excess = sum(shrunk) - limit
    while excess > 0:  # the >= 1 floors can overshoot: take it from the largest piece
        i = shrunk.index(max(shrunk))
        take = min(excess, shrunk[i] - 1)
        shrunk[i] -= take
        excess -= take
    return shrunk


def _fit_session(session: _Session, scale: LengthScale) -> tuple[_Session, bool]:
    """Fits the session's largest context (its last round) into the engine's limits.

    The context-growth rule must survive scaling, so instead of clipping each round (which
    would break prompt = previous prompt + output + tool result), the pieces that build the
    last prompt shrink together, keeping the session's proportions. Returns the fitted
    session and whether anything had to change.
    """
    rounds = len(session.outputs)
    calls, final = session.outputs[:-1], session.outputs[-1]
    pieces = [session.first_prompt, *session.tool_results, *calls]
    limits = [] if scale.max_prompt is None else [scale.max_prompt]
    if scale.max_model_len is not None:
        # Leave the last prompt at least one token per piece; the final output gives way first.
        final = min(final, scale.max_model_len - len(pieces))
        limits.append(scale.max_model_len - final)
    limit = min(limits, default=None)
    if final < 1 or (limit is not None and limit < len(pieces)):
        raise ValueError(f"the length limits cannot hold a {rounds}-round tool session")
    if final == session.outputs[-1] and (limit is None or sum(pieces) <= limit):
        return session, False
    if limit is not None and sum(pieces) > limit:
        pieces = _shrink(pieces, limit)
    first, tools, calls = pieces[0], pieces[1:rounds], pieces[rounds:]
    return _Session(first, tools, [*calls, final], session.delays_s), True


def _tool_part(spec: _Spec) -> _Part:
    """Agent sessions of 2-6 rounds; rounds after the first are released by the previous
    round's completion plus a tool delay, and carry the session start as their arrival."""
    rng = _rng(spec.seed, "tool-calling", "sessions")
    sessions, clipped = [], 0
    for rounds in _session_rounds(rng, spec.count):
        session, was_clipped = _fit_session(_draw_session(rng, rounds, spec.scale), spec.scale)
        sessions.append(session)
        clipped += rounds if was_clipped else 0
    # Session starts: Poisson at sessions/requests per unit time, so requests come at ~1/s.
    spacing = spec.count / len(sessions) if sessions else 1.0
    starts = unit_offsets(
        _rng(spec.seed, "tool-calling", "arrivals"), len(sessions), exponential_gaps
    )
    drafts: list[_Draft] = []
    for number, (session, start) in enumerate(zip(sessions, starts, strict=True)):
        drafts.extend(_session_drafts(spec.ref, number, session, start * spacing, len(drafts)))
    classes = {
        "tool-calling": f"per round: {spec.ref.describe(TOOL_LOOP)}; "
        f"final round: {spec.ref.describe(TOOL_FINAL)}"
    }
    source = {
        "sessions": len(sessions),
        "rounds": list(TOOL_ROUNDS),
        "tool_delay_s": list(TOOL_DELAY_S),
        "synthetic": {
            "first_prompt": TOOL_FIRST_PROMPT.describe(),
            "tool_call_output": TOOL_CALL_OUTPUT.describe(),
            "tool_result": TOOL_RESULT.describe(),
            "final_output": TOOL_FINAL_OUTPUT.describe(),
        },
    }
    return _Part(drafts, "poisson sessions", classes, source, clipped)


def _session_drafts(
    ref: SloReference, number: int, session: _Session, start: float, first_index: int
) -> list[_Draft]:
    """A session's rounds: TPOT 2x for loop rounds, 4x for the final one; TTFT 3x each.

    Each round's TTFT is 3x the zero-load prefill of its whole prompt: the methodology's
    zero-load time counts no prefix-cache hits, so a server that reuses the previous round's
    KV cache gains slack rather than the workload assuming it.
    """
    prompts = session.prompts()
    last = len(prompts) - 1
    return [
        _Draft(
            unit_arrival=start,
            slo_class="tool-calling",
            budgets=ref.budgets(TOOL_FINAL if i == last else TOOL_LOOP, prompt),
            prompt_tokens=prompt,
            output_tokens=output,
            session=number,
            round=i,
            after=None if i == 0 else first_index + i - 1,
            delay_s=0.0 if i == 0 else session.delays_s[i - 1],
        )
        for i, (prompt, output) in enumerate(zip(prompts, session.outputs, strict=True))
    ]


# -- assembling scenarios ----------------------------------------------------------------------

PartBuilder = Callable[[_Spec], _Part]

_PARTS: dict[str, PartBuilder] = {
    "chatbot": _chat_part,
    "coding": _coding_part,
    "summarization": _summarization_part,
    "reasoning": _reasoning_part,
    "tool-calling": _tool_part,
}


def _merge(
    parts: Sequence[tuple[_Part, float]], rate: float, phases: Sequence[float] | None = None
) -> list[BenchRequest]:
    """Merges parts, each running at `share` x `rate`, into one stream indexed by arrival.

    Order is decided in rate-free time (unit arrival / share), so it is the same at every
    rate; ties keep part order, then draft order (a session's rounds stay in order). `phases`
    shift each part's start (in unit time), so independent parts do not all arrive at once.
    """
    shifts = phases or [0.0] * len(parts)
    keyed = [
        ((draft.unit_arrival + shifts[p]) / share, p, i, draft)
        for p, (part, share) in enumerate(parts)
        for i, draft in enumerate(part.drafts)
    ]
    keyed.sort(key=lambda k: k[:3])
    index_of = {(p, i): n for n, (_, p, i, _) in enumerate(keyed)}
    return [
        BenchRequest(
            index=n,
            slo_class=d.slo_class,
            budgets=d.budgets,
            prompt_tokens=d.prompt_tokens,
            output_tokens=d.output_tokens,
            arrival_s=key / rate,
            session=d.session,
            round=d.round,
            after=None if d.after is None else index_of[(p, d.after)],
            delay_s=d.delay_s,
        )
        for n, (key, p, _, d) in enumerate(keyed)
    ]


def _check_args(rate: float, count: int) -> None:
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")


def _single(
    name: str,
    model: StepTimeModel,
    rate: float,
    count: int,
    seed: int,
    scale: LengthScale | None,
    trace_dir: Path | None,
    chunk_tokens: int,
) -> Workload:
    _check_args(rate, count)
    scale = scale or LengthScale()
    spec = _Spec(SloReference(model, chunk_tokens), count, seed, scale, trace_dir)
    part = _PARTS[name](spec)
    return Workload(
        name=name,
        requests=_merge([(part, 1.0)], rate),
        classes=part.classes,
        scaling=scale.describe() | {"clipped_requests": part.clipped},
        seed=seed,
        rate=rate,
        arrival=part.arrival,
        source=part.source,
    )


# What each single-part scenario is; the builders themselves are `_single`'s part table.
_SCENARIO_DOCS = {
    "chatbot": (
        "Chat: the Azure conversation trace (a seeded window of `count` rows, timestamps scaled "
        "to `rate` requests/s) when `trace_dir` is given, else log-normal lengths with the trace's "
        "median and p99 and Poisson arrivals at `rate`. Class 'chat': TTFT 5x, TPOT 4x."
    ),
    "coding": (
        "Code completion: the Azure code trace (very bursty) scaled to `rate` requests/s, else a "
        "Gamma (cv 3) process at mean `rate` with the trace's length statistics. "
        "Class 'coding': TTFT 5x, TPOT 2x."
    ),
    "summarization": (
        "Summarization: prompts of several thousand tokens, outputs ~200; Poisson at `rate` "
        "requests/s (`trace_dir` unused). Class 'summarization': TTFT 3x, TPOT 4x."
    ),
    "reasoning": (
        "Reasoning: short prompts, long outputs of thinking then answer; Poisson at `rate` "
        "requests/s (`trace_dir` unused). Class 'reasoning': TTFT 3x, thinking TPOT 2x, answer 4x; "
        "Budgets.thinking_tokens is each request's own thinking length."
    ),
    "tool-calling": (
        "Tool-calling agents: sessions of 2-6 rounds, tool delays of 0.2-2 s between rounds, the "
        "context growing each round. `count` is requests (rounds), exactly; `rate` is requests/s: "
        "sessions start as a Poisson process at rate x sessions / requests, so rounds are issued "
        "at about `rate` (follow-up rounds wait for completions and tool delays, so under load the "
        "realised request rate is a little lower). Class 'tool-calling': TTFT 3x per round, TPOT "
        "2x for loop rounds and 4x for the final round. `trace_dir` unused."
    ),
}


def _single_scenario(name: str) -> Scenario:
    """The scenario `name` alone, with the common scenario signature."""

    def build(
        model: StepTimeModel,
        rate: float,
        count: int,
        seed: int = 0,
        scale: LengthScale | None = None,
        trace_dir: Path | None = None,
        chunk_tokens: int = 2048,
    ) -> Workload:
        return _single(name, model, rate, count, seed, scale, trace_dir, chunk_tokens)

    build.__name__ = name.replace("-", "_")
    build.__doc__ = _SCENARIO_DOCS[name]
    return build


def _split_count(count: int, parts: int) -> list[int]:
    """`count` split as evenly as possible; the first parts take the remainder."""
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


def mixed(
    model: StepTimeModel,
    rate: float,
    count: int,
    seed: int = 0,
    scale: LengthScale | None = None,
    trace_dir: Path | None = None,
    chunk_tokens: int = 2048,
) -> Workload:
    """All five classes at once, each with its own class and arrival process. `rate` is the
    total request rate and `count` the total requests, both split evenly: each part runs at
    rate / 5 with count / 5 requests (the first parts take a remainder), as it would alone."""
    _check_args(rate, count)
    scale = scale or LengthScale()
    ref = SloReference(model, chunk_tokens)
    counts = _split_count(count, len(_PARTS))
    built = {
        name: build(_Spec(ref, n, seed, scale, trace_dir))
        for (name, build), n in zip(_PARTS.items(), counts, strict=True)
    }
    share = 1.0 / len(built)  # each part runs at rate / 5
    return Workload(
        name="mixed",
        requests=_merge(
            [(part, share) for part in built.values()],
            rate,
            # Each part starts one random mean gap in, as independent applications would.
            phases=_rng(seed, "mixed-phase").uniform(0.0, 1.0, len(built)).tolist(),
        ),
        classes={k: v for part in built.values() for k, v in part.classes.items()},
        scaling=scale.describe() | {"clipped_requests": sum(p.clipped for p in built.values())},
        seed=seed,
        rate=rate,
        arrival="mixed: " + ", ".join(f"{n}={p.arrival}" for n, p in built.items()),
        source={
            "split": "even",
            "parts": {n: p.source | {"requests": len(p.drafts)} for n, p in built.items()},
        },
    )


class Scenario(Protocol):
    def __call__(
        self,
        model: StepTimeModel,
        rate: float,
        count: int,
        seed: int = 0,
        scale: LengthScale | None = None,
        trace_dir: Path | None = None,
        chunk_tokens: int = 2048,
    ) -> Workload: ...


SCENARIOS: dict[str, Scenario] = {
    **{name: _single_scenario(name) for name in _SCENARIO_DOCS},
    "mixed": mixed,
}


def with_burst(workload: Workload, burst: Burst) -> Workload:
    """The workload with its arrivals warped by `burst` (methodology: burst test).

    Lengths, classes and order stay; only arrival offsets move (monotonically), so the burst
    run is comparable with the steady one.
    """
    arrivals = [r.arrival_s for r in workload.requests]
    window = burst.window_for_base(arrivals[-1] if arrivals else 0.0)
    warped = burst.warp(arrivals, window)
    return replace(
        workload,
        requests=[replace(r, arrival_s=t) for r, t in zip(workload.requests, warped, strict=True)],
        arrival=f"{workload.arrival} + burst x{burst.factor:g}",
        source=workload.source | {"burst": burst.describe(window)},
    )


def build_scenario(name: str, *, burst: Burst | None = None, **kwargs: Any) -> Workload:
    """The scenario `name` (see SCENARIOS) built from `kwargs`, with an optional burst."""
    scenario = SCENARIOS.get(name.replace("_", "-"))
    if scenario is None:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    workload = scenario(**kwargs)
    return workload if burst is None else with_burst(workload, burst)

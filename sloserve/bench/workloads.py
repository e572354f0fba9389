"""Benchmark workloads: the scenarios and the request streams they build, and the replay of a
user's trace file (replay_user_trace; the format: sloserve.bench.user_trace).

Follows the methodology (docs/slo.md §3-4), with arrival processes from
sloserve.bench.arrivals, trace replay from sloserve.bench.traces, and length scaling and SLO
presets from sloserve.bench.presets. These properties hold for everything built here:

- Seeded and reproducible: the same arguments give an identical workload, so every system
  under comparison gets the same request stream (§3).
- Rate only moves arrivals: lengths, classes, budgets and request order are drawn from random
  streams that never see the rate. Every part is built at unit rate and its arrivals divided
  by the rate at the end. So a capacity search compares the same requests at every rate.
- No oracle (methodology §5): a request's `max_tokens` is its class's cap, the smallest power
  of two at least the longest output the class can produce in the scenario after length
  scaling (`client_cap` of the length distribution's cap, or of the trace's longest output),
  the same for every request of the class; clipped only where the model's context leaves less
  room after the prompt, as a client must clip it (servers refuse prompt + max_tokens beyond
  the context). The true length (`output_tokens`) stays on the client's side.

Each part of a workload draws from its own named stream (`_rng(seed, part, purpose)`), so
adding a draw to one part never shifts another part's numbers, and the mixed and
reasoning-burst scenarios' chat parts hold the same requests as the chatbot scenario at the
same seed.

A scenario's burst (reasoning-burst, coding-burst) is part of its shape, in unit time, so the
rate rescales it with everything else; `with_burst` (the CLIs' --burst-*) is the methodology's
burst test instead, a window of fixed seconds laid over any workload at the rate under test.
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
    densest_stretches,
    load_trace,
    observed_rate,
    trace_window,
    window_around,
)
from sloserve.bench.types import BenchRequest, client_cap
from sloserve.bench.user_trace import (
    DEFAULT_MAX_ROWS,
    TraceFormat,
    UserTrace,
    UserTraceRow,
    read_user_trace,
)
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
class SharedPrefix:
    """The leading `tokens` prompt tokens a request shares with every request of `group`
    (a trace's `prefix_hash`): the prompt builder (runner.PromptBook) gives them one token
    sequence, so a server's prefix cache can reuse it."""

    group: str
    tokens: int


@dataclass(frozen=True)
class Workload:
    """A benchmark's request stream and what it was built from (all of it goes into results).

    `requests` are indexed 0..n-1 in arrival order. `rate` is requests/s as each scenario
    defines it (see its docstring); `arrival` names the arrival process; `scaling` is the
    LengthScale plus how many requests a cap clipped; `source` says where lengths and arrivals
    came from (trace file and window, or synthetic distributions); `max_tokens` is each
    class's cap as clients send it (before clipping to the context; see the module docstring).
    `prefixes` maps a request's index to the prompt prefix it shares with others (replayed
    traces with prefix hashes; empty elsewhere). It lives here rather than on BenchRequest
    because only the prompt builder reads it: no server and no judge is told.
    """

    name: str
    requests: list[BenchRequest]
    classes: dict[str, str]
    scaling: dict[str, Any]
    seed: int
    rate: float
    arrival: str
    source: dict[str, Any] = field(default_factory=dict)
    max_tokens: dict[str, int] = field(default_factory=dict)
    prefixes: dict[int, SharedPrefix] = field(default_factory=dict)

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
            "max_tokens": dict(self.max_tokens),
            **({"shared_prefixes": self._describe_prefixes()} if self.prefixes else {}),
        }

    def _describe_prefixes(self) -> dict[str, int]:
        return {
            "requests": len(self.prefixes),
            "groups": len({p.group for p in self.prefixes.values()}),
            "tokens": sum(p.tokens for p in self.prefixes.values()),
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
    if r.max_tokens < r.output_tokens:
        raise ValueError(f"request {position}'s max_tokens cuts its output short")
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
    # The longest output the class can produce here, scaled: its client cap's basis.
    longest_output: int

    @property
    def max_tokens(self) -> dict[str, int]:
        return {name: client_cap(self.longest_output) for name in self.classes}


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


def _longest_output(scale: LengthScale, tokens: int) -> int:
    """The longest output of `tokens` becomes on the engine (LengthScale.apply's output)."""
    return scale.apply(1, tokens)[1]


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
    rows = _load_for(spec, file)
    start = int(_rng(spec.seed, part, "window").integers(0, len(rows) - spec.count + 1))
    return _window_part(spec, file, rows, start, class_name, preset)


def _load_for(spec: _Spec, file: str) -> list[TraceRow]:
    """The trace `file` from the spec's folder, checked to hold the spec's count."""
    assert spec.trace_dir is not None
    path = spec.trace_dir / file
    rows = load_trace(path)
    if spec.count > len(rows):
        raise ValueError(f"{path} has {len(rows)} requests; {spec.count} asked for")
    return rows


def _window_part(
    spec: _Spec,
    file: str,
    rows: Sequence[TraceRow],
    start: int,
    class_name: str,
    preset: SloPreset,
) -> _Part:
    """The spec's count of trace rows from row `start`, at unit mean rate."""
    window = trace_window(rows[start:], count=spec.count)
    rate = _replay_rate(window, rows)
    arrivals = [r.offset_s * rate for r in window]  # unit mean rate
    lengths = ([r.prompt_tokens for r in window], [r.output_tokens for r in window])
    drafts, clipped = _simple_part(spec, class_name, preset, lengths, arrivals)
    source = {"trace": file, "first_row": start, "rows": len(window), "trace_rate": rate}
    # The whole trace's longest output, not the window's: a client's cap is set once.
    longest = _longest_output(spec.scale, max(r.output_tokens for r in rows))
    classes = {class_name: spec.ref.describe(preset)}
    return _Part(drafts, f"trace:{file}", classes, source, clipped, longest)


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
    classes = {class_name: spec.ref.describe(preset)}
    longest = _longest_output(spec.scale, dists[1].cap)
    return _Part(drafts, arrival, classes, source, clipped, longest)


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


def _split_thinking(output: int, thinking: float, answer: float) -> int:
    """Thinking tokens of a scaled output, in the drawn proportion; at least one answer token."""
    if output < 2:
        return 0
    return min(output - 1, max(1, round_half_up(output * thinking / (thinking + answer))))


def _reasoning_part(
    spec: _Spec, arrivals: Sequence[float] | None = None, arrival: str = "poisson"
) -> _Part:
    """Short prompts, long outputs: thinking then answer, one TPOT each. `arrivals` (unit
    time, one per request) replace the Poisson arrivals, described by `arrival`."""
    rng = _rng(spec.seed, "reasoning", "lengths")
    prompts = REASONING_PROMPT.sample(rng, spec.count)
    thinking = REASONING_THINKING.sample(rng, spec.count)
    answers = REASONING_ANSWER.sample(rng, spec.count)
    totals = [t + a for t, a in zip(thinking, answers, strict=True)]
    pairs, clipped = _scaled_pairs(spec, prompts, totals)
    if arrivals is None:
        rng = _rng(spec.seed, "reasoning", "arrivals")
        arrivals = unit_offsets(rng, spec.count, exponential_gaps)
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
    longest = _longest_output(spec.scale, REASONING_THINKING.cap + REASONING_ANSWER.cap)
    return _Part(drafts, arrival, classes, source, clipped, longest)


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
    # A tool call or a final answer: the agent cannot tell which the model will write, so one
    # cap covers both.
    longest = max(_longest_output(spec.scale, d.cap) for d in (TOOL_CALL_OUTPUT, TOOL_FINAL_OUTPUT))
    return _Part(drafts, "poisson sessions", classes, source, clipped, longest)


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
    parts: Sequence[tuple[_Part, float]],
    rate: float,
    scale: LengthScale,
    phases: Sequence[float] | None = None,
) -> list[BenchRequest]:
    """Merges parts, each running at `share` x `rate`, into one stream indexed by arrival.

    Order is decided in rate-free time (unit arrival / share), so it is the same at every
    rate; ties keep part order, then draft order (a session's rounds stay in order). `phases`
    shift each part's start (in unit time), so independent parts do not all arrive at once.
    Each request's max_tokens is its part's cap, clipped to the context `scale` leaves.
    """
    shifts = phases or [0.0] * len(parts)
    keyed = [
        ((draft.unit_arrival + shifts[p]) / share, p, i, draft)
        for p, (part, share) in enumerate(parts)
        for i, draft in enumerate(part.drafts)
    ]
    keyed.sort(key=lambda k: k[:3])
    index_of = {(p, i): n for n, (_, p, i, _) in enumerate(keyed)}
    caps = [client_cap(part.longest_output) for part, _ in parts]

    def max_tokens(p: int, prompt_tokens: int) -> int:
        if scale.max_model_len is None:
            return caps[p]
        return min(caps[p], scale.max_model_len - prompt_tokens)

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
            max_tokens=max_tokens(p, d.prompt_tokens),
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
        requests=_merge([(part, 1.0)], rate, scale),
        classes=part.classes,
        scaling=scale.describe() | {"clipped_requests": part.clipped},
        seed=seed,
        rate=rate,
        arrival=part.arrival,
        source=part.source,
        max_tokens=part.max_tokens,
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
        "Budgets.thinking_tokens is each request's own thinking length, for the judge (where "
        "the thinking TPOT ends); no server is told it."
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
            scale,
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
        max_tokens={k: v for part in built.values() for k, v in part.max_tokens.items()},
    )


# -- bursts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BurstWindow:
    """Where a scenario's burst lies, in its unit time, for the results."""

    start: float
    length: float
    about: dict[str, Any]  # what is dense in it, and how dense

    def describe(self, share: float, rate: float) -> dict[str, Any]:
        """In seconds of the run, for a part merged at `share` of `rate`: the start is computed
        as _merge computes arrivals, so the first arrival in the window compares equal."""
        start = self.start / share / rate
        end = (self.start + self.length) / share / rate
        return {"start_s": start, "duration_s": end - start} | self.about


# reasoning-burst: one request in ten is a reasoning request, and all of them arrive in a
# window in the middle of a steady chat stream, at three times the chat stream's rate. The
# window then takes 1/27 of the run: 37-62 s for 1,000 requests at 1-0.6 req/s (about stock
# vLLM's capacity for it on the simulated A100). A reasoning request decodes ~7x a chat
# request's tokens, so the window carries ~20x the chat stream's decode work.
REASONING_BURST_SHARE = 0.1
REASONING_BURST_FACTOR = 3.0


def reasoning_burst(
    model: StepTimeModel,
    rate: float,
    count: int,
    seed: int = 0,
    scale: LengthScale | None = None,
    trace_dir: Path | None = None,
    chunk_tokens: int = 2048,
) -> Workload:
    """A reasoning burst over a steady chat stream, the kind of burst SLOs-Serve (arXiv
    2504.08784) evaluates; the mix and shape below are this benchmark's.

    The chat stream is the chatbot scenario's (the Azure conversation trace when `trace_dir`
    is given, else its synthetic stand-in) with 90% of `count`; the other 10% are reasoning
    requests (the reasoning scenario's lengths and class: thinking TPOT 2x, answer 4x) that
    arrive as a Poisson process at 3x the chat stream's rate, in a window centred in the run
    (1/27 of it). `rate` is the total offered rate, requests / run, with this mix and shape
    fixed: the chat stream runs at 0.9 x `rate`, the reasoning arrivals at 2.7 x `rate` inside
    the window, and the window lasts count / (27 x `rate`) s (37 s for 1,000 requests
    at 1 req/s). The rate only rescales arrivals; the window's place in seconds is in
    `source["burst_window"]`.
    """
    _check_args(rate, count)
    scale = scale or LengthScale()
    ref = SloReference(model, chunk_tokens)
    reasoning_count = round_half_up(count * REASONING_BURST_SHARE)
    chat = _chat_part(_Spec(ref, count - reasoning_count, seed, scale, trace_dir))
    # Both parts are laid out in the chat stream's unit time (one chat request per unit).
    chat_span = chat.drafts[-1].unit_arrival if chat.drafts else 0.0
    window = _BurstWindow(
        start=0.0,
        length=reasoning_count / REASONING_BURST_FACTOR,
        about={"class": "reasoning", "factor": REASONING_BURST_FACTOR, "against": "chat rate"},
    )
    window = replace(window, start=max(0.0, (chat_span - window.length) / 2))
    offsets = unit_offsets(
        _rng(seed, "reasoning-burst", "arrivals"), reasoning_count, exponential_gaps
    )
    reasoning = _reasoning_part(
        _Spec(ref, reasoning_count, seed, scale, None),
        arrivals=[window.start + t / REASONING_BURST_FACTOR for t in offsets],
        arrival=f"poisson at {REASONING_BURST_FACTOR:g}x the chat rate, mid-run",
    )
    # The chat stream carries the run's length: at a share of 90% of the rate, `count`
    # requests arrive over the chat stream's span at `rate` in all.
    share = (count - reasoning_count) / count if count else 1.0
    parts = {"chat": chat, "reasoning": reasoning}
    return Workload(
        name="reasoning-burst",
        requests=_merge([(part, share) for part in parts.values()], rate, scale),
        classes=chat.classes | reasoning.classes,
        scaling=scale.describe() | {"clipped_requests": chat.clipped + reasoning.clipped},
        seed=seed,
        rate=rate,
        arrival=f"chat={chat.arrival}; reasoning={reasoning.arrival}",
        source={
            "mix": {"reasoning_share": REASONING_BURST_SHARE, "factor": REASONING_BURST_FACTOR},
            "parts": {n: p.source | {"requests": len(p.drafts)} for n, p in parts.items()},
            "burst_window": window.describe(share, rate),
        },
        max_tokens=chat.max_tokens | reasoning.max_tokens,
    )


# coding-burst with the code trace: a window around one of the trace's densest 30-s stretches
# (traces.densest_stretches); the seed picks which of this many, so the methodology's three
# seeds replay three different bursts.
CODING_BURST_CANDIDATES = 5
# coding-burst without the trace: the synthetic stand-in under the methodology's burst test,
# its rate doubled over the middle fifth of the run (30-60 s of the 150-300 s that 1,000
# requests take at 3-7 req/s).
CODING_BURST_FACTOR = 2.0
CODING_BURST_FRACTION = 0.2


def coding_burst(
    model: StepTimeModel,
    rate: float,
    count: int,
    seed: int = 0,
    scale: LengthScale | None = None,
    trace_dir: Path | None = None,
    chunk_tokens: int = 2048,
) -> Workload:
    """Code completion through a burst, class 'coding' (TTFT 5x, TPOT 2x).

    With `trace_dir`: `count` rows of the Azure code trace centred (in time) on one of its 5
    densest 30-s stretches (seed 0 the densest, seed 1 the next, ..., seed 5 the densest
    again), replayed with the trace's own shape. Such a stretch holds 330-557 requests, 4-7x
    the trace's mean rate: with fewer than about 1,000 requests the window is mostly burst.
    Without: the coding scenario's synthetic stream with its rate doubled over the middle
    fifth of the run (methodology: burst test).
    `rate` is the mean rate over the run, burst included; the rate only rescales arrivals.
    `source["burst_window"]` says where the burst is, in seconds, and how dense.
    """
    _check_args(rate, count)
    scale = scale or LengthScale()
    spec = _Spec(SloReference(model, chunk_tokens), count, seed, scale, trace_dir)
    part, window = _coding_burst_replay(spec) if trace_dir else _coding_burst_synthetic(spec)
    return Workload(
        name="coding-burst",
        requests=_merge([(part, 1.0)], rate, scale),
        classes=part.classes,
        scaling=scale.describe() | {"clipped_requests": part.clipped},
        seed=seed,
        rate=rate,
        arrival=part.arrival,
        source=part.source | {"burst_window": window.describe(1.0, rate)},
        max_tokens=part.max_tokens,
    )


def _coding_burst_synthetic(spec: _Spec) -> tuple[_Part, _BurstWindow]:
    part = _coding_part(replace(spec, trace_dir=None))
    base = [d.unit_arrival for d in part.drafts]
    end = base[-1] if base else 0.0
    factor, fraction = CODING_BURST_FACTOR, CODING_BURST_FRACTION
    about = {"factor": factor, "against": "steady rate"}
    if not end > 0:  # one request, or none: no run to burst in
        return part, _BurstWindow(0.0, 0.0, about)
    # The warp shortens the run by (factor - 1) x length: solve for a window of `fraction`
    # of the warped run.
    burst = Burst(factor, duration_s=fraction * end / (1 + fraction * (factor - 1)))
    start, length = burst.window_for_base(end)
    warped = burst.warp(base, (start, length))
    drafts = [replace(d, unit_arrival=t) for d, t in zip(part.drafts, warped, strict=True)]
    part = replace(part, drafts=drafts, arrival=f"{part.arrival} + burst x{factor:g}")
    return part, _BurstWindow(start, length, about)


def _coding_burst_replay(spec: _Spec) -> tuple[_Part, _BurstWindow]:
    rows = _load_for(spec, CODE_TRACE)
    if spec.count < 1:
        return _window_part(spec, CODE_TRACE, rows, 0, "coding", CODING), _BurstWindow(0, 0, {})
    bursts = densest_stretches(rows, limit=CODING_BURST_CANDIDATES)
    rank = spec.seed % len(bursts)
    burst = bursts[rank]
    start = window_around(rows, burst.centre_s, spec.count)
    part = _window_part(spec, CODE_TRACE, rows, start, "coding", CODING)
    # The stretch in the window's unit time, cut to the window (a small window sits inside it).
    unit = float(part.source["trace_rate"])
    arrivals = [d.unit_arrival for d in part.drafts]
    low = max(0.0, (burst.offset_s - rows[start].offset_s) * unit)
    high = min(arrivals[-1], low + burst.span_s * unit)
    # Counted in trace time, as densest_stretches counts (no rounding at the edges).
    window = rows[start : start + spec.count]
    end_s = burst.offset_s + burst.span_s
    inside = sum(1 for r in window if burst.offset_s <= r.offset_s < end_s)
    mean = (len(arrivals) - 1) / arrivals[-1] if arrivals[-1] > 0 else 0.0
    about = {
        "rank": rank + 1,
        "trace_offset_s": burst.offset_s,
        "arrivals": inside,
        # The window's arrival rate during the stretch over its mean rate.
        "rate_over_mean": inside / (high - low) / mean if high > low and mean > 0 else None,
    }
    return part, _BurstWindow(low, high - low, about)


# -- a user's trace ------------------------------------------------------------------------------

# The SLO classes a trace file may name (user_trace.py), with their presets as the scenarios
# use them. A tool-calling session's last round takes TOOL_FINAL, its other rounds (and a
# tool-calling row without a session) TOOL_LOOP.
TRACE_CLASSES: dict[str, SloPreset] = {
    "chat": CHAT,
    "coding": CODING,
    "summarization": SUMMARIZATION,
    "reasoning": REASONING,
    "tool-calling": TOOL_LOOP,
}
# A row that names no class: the replicas' default class (sloserve/default_classes.yaml).
DEFAULT_TRACE_CLASS = "chat"


def read_trace_file(
    path: Path, fmt: TraceFormat | None = None, max_rows: int = DEFAULT_MAX_ROWS
) -> UserTrace:
    """A user's trace file (format: user_trace.py), checked against the classes above."""
    return read_user_trace(
        path, classes=TRACE_CLASSES, default_class=DEFAULT_TRACE_CLASS, fmt=fmt, max_rows=max_rows
    )


def replay_user_trace(
    trace: UserTrace,
    model: StepTimeModel,
    rate: float,
    count: int,
    seed: int = 0,
    scale: LengthScale | None = None,
    chunk_tokens: int = 2048,
) -> Workload:
    """The trace's first `count` requests by arrival (all of them when it has fewer).

    Timestamps are scaled so the replayed rows' mean rate, (rows - 1) / span, is `rate`: the
    trace's shape, bursts included, is kept. Lengths are scaled like every scenario's; budgets
    come from each row's class (TRACE_CLASSES). A session's first round arrives at its time;
    each later round is sent once the round before it completes, after a delay of the gap
    between the two rounds' arrivals in the file, scaled with the timestamps (the file's gap
    holds the original service time too, so a replayed session never runs ahead of its
    original pace). A reasoning row without `thinking_tokens` thinks for the reasoning
    scenario's median share of its output (80%). `seed` changes no request here (the file is
    the workload); it is recorded, and seeds the prompt tokens as everywhere.
    """
    _check_args(rate, count)
    scale = scale or LengthScale()
    ref = SloReference(model, chunk_tokens)
    rows = trace.rows[:count]
    offsets = trace.offsets_s(rows)
    to_run_s = _user_trace_rate(trace, offsets) / rate  # trace seconds to seconds of the run
    lengths = [scale.apply(r.input_tokens, r.output_tokens) for r in rows]
    # A class's cap comes from every row read, not only those replayed: a client sets it once.
    used = sorted({r.slo_class for r in rows})
    caps = {c: client_cap(_longest_output(scale, trace.longest_output[c])) for c in used}
    last_round = {r.session: i for i, r in enumerate(rows) if r.session is not None}
    sessions: dict[str, int] = {}  # the file's session keys, numbered in order of arrival
    latest: dict[str, int] = {}  # per session: the index of its latest round so far
    requests: list[BenchRequest] = []
    for i, (r, offset, (prompt, output)) in enumerate(zip(rows, offsets, lengths, strict=True)):
        after = session = None
        ends_session = False  # the last round of a session of several
        if r.session is not None:
            after = latest.get(r.session)
            session = sessions.setdefault(r.session, len(sessions))
            latest[r.session] = i
            ends_session = after is not None and last_round[r.session] == i
        preset = TRACE_CLASSES[r.slo_class]
        if r.slo_class == "tool-calling" and ends_session:
            preset = TOOL_FINAL
        cap = caps[r.slo_class]
        if scale.max_model_len is not None:
            cap = min(cap, scale.max_model_len - prompt)
        requests.append(
            BenchRequest(
                index=i,
                slo_class=r.slo_class,
                budgets=ref.budgets(preset, prompt, _trace_thinking(preset, r, output)),
                prompt_tokens=prompt,
                output_tokens=output,
                # A later round's own time in the file; the runners send it on `after` instead.
                arrival_s=offset * to_run_s,
                session=session,
                round=0 if after is None else requests[after].round + 1,
                after=after,
                delay_s=0.0 if after is None else (offset - offsets[after]) * to_run_s,
                max_tokens=cap,
            )
        )
    source = {"rows": len(rows), "requested": count, "sessions": len(sessions)}
    return Workload(
        name=f"trace:{trace.path.name}",
        requests=requests,
        classes={c: _describe_trace_class(ref, c) for c in used},
        scaling=scale.describe()
        | {"clipped_requests": sum(scale.clipped(r.input_tokens, r.output_tokens) for r in rows)},
        seed=seed,
        rate=rate,
        arrival=f"trace:{trace.path.name}",
        source=trace.describe() | source | {"trace_rate": to_run_s * rate},
        max_tokens=caps,
        prefixes=_trace_prefixes(trace, rows, [prompt for prompt, _ in lengths], scale),
    )


def _trace_thinking(preset: SloPreset, row: UserTraceRow, output: int) -> int:
    """A reasoning row's thinking tokens after length scaling: its own share of its output,
    else the reasoning scenario's median share; at least one thinking and one answer token."""
    if preset.thinking_tpot_x is None:
        return 0
    if row.thinking_tokens is None:
        return _split_thinking(output, REASONING_THINKING.median, REASONING_ANSWER.median)
    return _split_thinking(output, row.thinking_tokens, row.output_tokens - row.thinking_tokens)


def _trace_prefixes(
    trace: UserTrace, rows: Sequence[UserTraceRow], prompts: Sequence[int], scale: LengthScale
) -> dict[int, SharedPrefix]:
    """Per replayed request with a prefix hash: the prefix it shares, scaled with the prompt.
    Without `prefix_tokens`, the shortest prompt of the hash among every row read (the longest
    prefix all of them hold), so it does not depend on how many rows a load point replays."""
    prefixes: dict[int, SharedPrefix] = {}
    for i, (r, prompt) in enumerate(zip(rows, prompts, strict=True)):
        if r.prefix_hash is None:
            continue
        shared = (
            trace.shortest_prompt[r.prefix_hash] if r.prefix_tokens is None else r.prefix_tokens
        )
        # Never more than the request's own (scaled, fitted) prompt.
        prefixes[i] = SharedPrefix(r.prefix_hash, min(prompt, scale.prompt(shared)))
    return prefixes


def _user_trace_rate(trace: UserTrace, offsets: Sequence[float]) -> float:
    """The replayed rows' mean rate, else (they arrive at once) every row read's."""
    if len(offsets) >= 2 and offsets[-1] > 0:
        return (len(offsets) - 1) / offsets[-1]
    if len(offsets) < 2:
        return 1.0  # a single request: no gaps to scale
    everything = trace.offsets_s()
    if len(everything) >= 2 and everything[-1] > 0:
        return (len(everything) - 1) / everything[-1]
    raise ValueError(f"{trace.path}: every request arrives at once: there is no rate to scale")


def _describe_trace_class(ref: SloReference, name: str) -> str:
    if name == "tool-calling":
        return (
            f"per round: {ref.describe(TOOL_LOOP)}; "
            f"last round of a session: {ref.describe(TOOL_FINAL)}"
        )
    return ref.describe(TRACE_CLASSES[name])


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
    "reasoning-burst": reasoning_burst,
    "coding-burst": coding_burst,
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

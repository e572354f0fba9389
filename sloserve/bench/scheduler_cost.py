"""What the SLO scheduler costs per engine step, beside vLLM's own (`sloserve bench scheduler`).

Everything sloserve adds to a step runs inside vLLM's engine-core loop, where no token is
computed meanwhile: admission of the requests that arrived (`add_request`) and the whole
`schedule()` (expiry, planning, the glue around vLLM's own schedule, vLLM's schedule itself).
This drives the real schedulers in process (scheduler_loop.py): sloserve's and vLLM's own, with
the same engine configuration and the same seeded request stream, at a steady number of
requests in flight, and times those calls per step, in wall time and in CPU time (which leaves
out the time the operating system gave another process: on a shared machine, most outliers).
The contenders take turns step by step, so the machine's noise falls on all of them alike.

The engine: the KV cache an H100 holds for Llama-3-8B (KV_TOKENS), vLLM's GPU defaults for
the batch, and steps that take the time a GPU step profile predicts for their shape (plus the
profile's host time per step, if it gives one), on a virtual clock (VirtualClock): decodes fall
due, and deadlines come near, as on a GPU, and the same run plans the same steps on any machine
(or under valgrind). sloserve plans with that same profile.

The load: `running` requests held (running or waiting), each replaced when it finishes, of the
methodology's SLO classes (docs/slo.md §4). Two things are fitted to each load so that the
engine can hold it at all: lengths shrink where the KV cache could not hold that many requests
at full length, and budgets keep the methodology's proportion to the engine's step (its GPU
TPOTs of 50 and 100 ms are 2x and 4x a 25 ms decode step; an 8B engine with 1,024 requests
in flight takes several times that). Every request accepts best effort, so what sloserve cannot
serve in time runs as best effort and both schedulers hold the same number of requests.
"""

from __future__ import annotations

import gc
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sloserve.bench.scheduler_loop import (
    LoopConfig,
    Meter,
    SchedulerLoop,
    VirtualClock,
    unmetered,
)
from sloserve.replica.policy import PolicyCounters
from sloserve.replica.scheduler import SloPolicyMixin
from sloserve.slo import Budgets, RequestSlo
from sloserve.stepmodel import StepShape, StepTimeModel, shipped_profile_path

_T = TypeVar("_T")

# 56 GiB of KV cache at 128 KiB a token (Llama-3-8B: 32 layers x 8 KV heads x 128 x K and V
# x 2 bytes): an H100's 80 GiB at vLLM's 0.9 memory utilization, less 16 GiB of weights.
KV_TOKENS = 56 * 1024**3 // (128 * 1024)
MAX_NUM_BATCHED_TOKENS = 8192  # vLLM's default on a GPU
MAX_NUM_SEQS = 1024  # at least every load measured
# The tiny model's max_position_embeddings: the model folder is read for its config only.
MAX_MODEL_LEN = 1024
DEFAULT_LOADS = (16, 64, 256, 1024)
# GPU profiles to plan with, most wanted first: the target hardware is an H100, but only an
# A100 profile of Llama-3-8B may be shipped (Vidur publishes no H100 timings of it).
PREFERRED_PROFILES = (
    "gpu-llama-3-8b-h100-vidur",
    "gpu-llama-3-8b-a100-vidur",
)
# The decode step the methodology's GPU budgets are set against (docs/slo.md §4).
REFERENCE_STEP_S = 0.025
# At most this share of the KV cache holds the requests in flight, at full length; lengths
# shrink where it could not.
KV_FILL = 0.75
# Leading prompt tokens every request of a class shares (a system prompt: prefix-cache hits).
SHARED_PREFIX_TOKENS = 32
# At most target / RAMP_STEPS requests arrive per step: the load builds up over some RAMP_STEPS
# steps rather than landing in one (in steady state fewer than that finish per step).
RAMP_STEPS = 50

SLOSERVE_ASYNC = "sloserve-async"
VLLM_ASYNC = "vllm-async"
SLOSERVE_SYNC = "sloserve-sync"
VLLM_SYNC = "vllm-sync"
SCHEDULERS = (SLOSERVE_ASYNC, VLLM_ASYNC, SLOSERVE_SYNC, VLLM_SYNC)
# sloserve's scheduler and the vLLM scheduler it subclasses.
PAIRS = ((SLOSERVE_ASYNC, VLLM_ASYNC), (SLOSERVE_SYNC, VLLM_SYNC))


@dataclass(frozen=True)
class SloTier:
    """One SLO class of the load, with the methodology's GPU budgets (docs/slo.md §4)."""

    name: str
    prompt: tuple[int, int]  # tokens, drawn uniformly (before the load's length factor)
    output: tuple[int, int]
    budgets: Budgets


TIERS: tuple[SloTier, ...] = (
    SloTier("chatbot", (64, 768), (32, 384), Budgets(ttft_s=1.0, tpot_s=0.1)),
    SloTier("coding", (128, 896), (16, 256), Budgets(ttft_s=0.5, tpot_s=0.05)),
    SloTier("summarization", (512, 896), (32, 128), Budgets(ttft_s=1.0, tpot_s=0.1)),
    SloTier(
        "reasoning",
        (32, 256),
        (128, 768),
        Budgets(ttft_s=0.5, tpot_s=0.1, thinking_tpot_s=0.05, thinking_tokens=128),
    ),
    SloTier("tool_calling", (256, 768), (8, 64), Budgets(ttft_s=0.3, tpot_s=0.05)),
)


def step_overhead_s(model: StepTimeModel) -> float:
    """The engine's host time per step that the profile gives apart from its step times."""
    return float(model.metadata.get("step_overhead_s", 0.0))


def default_profile_name() -> str:
    """The GPU step profile shipped now: the H100 one where there is one."""
    for name in PREFERRED_PROFILES:
        try:
            shipped_profile_path(name)
        except FileNotFoundError:
            continue
        return name
    shipped = sorted(p.stem for p in shipped_profile_path("cpu-bench").parent.glob("gpu-*.json"))
    if not shipped:
        raise FileNotFoundError("no GPU step profile is shipped in sloserve/profiles/")
    return shipped[0]


# -- the load ----------------------------------------------------------------------------------


def _mean(bounds: tuple[int, int]) -> float:
    return (bounds[0] + bounds[1]) / 2


@dataclass(frozen=True)
class LoadShape:
    """How the request stream is fitted to one load (see the module's docstring)."""

    running: int
    length_factor: float  # prompt and output lengths are multiplied by this
    budget_factor: float  # TTFT and TPOT budgets are multiplied by this
    steady_step_s: float  # the profile's step at this load, arrivals' prefills included

    @classmethod
    def fit(cls, running: int, model: StepTimeModel, kv_tokens: int) -> LoadShape:
        prompt = sum(_mean(t.prompt) for t in TIERS) / len(TIERS)
        output = sum(_mean(t.output) for t in TIERS) / len(TIERS)
        length_factor = min(1.0, KV_FILL * kv_tokens / (running * (prompt + output)))
        prompt, output = prompt * length_factor, output * length_factor
        # In steady state one request in `output` finishes per step, and one arrives.
        arrivals = running / output
        shape = StepShape(
            tokens=round(running + arrivals * prompt),
            requests=round(running + arrivals),
            context_tokens=round(running * (prompt + output / 2) + arrivals * prompt),
        )
        step_s = model.predict(shape)
        return cls(running, length_factor, max(1.0, step_s / REFERENCE_STEP_S), step_s)


@dataclass(frozen=True)
class RequestSpec:
    tier: SloTier
    prompt: list[int]
    output_tokens: int
    budgets: Budgets


class RequestStream:
    """The seeded requests of a load, in arrival order: the same for every scheduler."""

    def __init__(self, shape: LoadShape, seed: int, vocab: int) -> None:
        self._shape = shape
        self._rng = random.Random(seed)
        self._vocab = vocab
        self._specs: list[RequestSpec] = []
        prefix_rng = random.Random(seed + 1)
        self._prefixes = {
            tier.name: [prefix_rng.randrange(4, vocab) for _ in range(SHARED_PREFIX_TOKENS)]
            for tier in TIERS
        }

    def __getitem__(self, index: int) -> RequestSpec:
        while len(self._specs) <= index:
            self._specs.append(self._draw())
        return self._specs[index]

    def _draw(self) -> RequestSpec:
        rng, f = self._rng, self._shape.length_factor
        tier = rng.choice(TIERS)
        prompt_tokens = max(SHARED_PREFIX_TOKENS + 1, round(rng.randint(*tier.prompt) * f))
        output_tokens = max(1, round(rng.randint(*tier.output) * f))
        output_tokens = min(output_tokens, MAX_MODEL_LEN - prompt_tokens)
        prefix = self._prefixes[tier.name]
        rest = [rng.randrange(4, self._vocab) for _ in range(prompt_tokens - len(prefix))]
        b, k = tier.budgets, self._shape.budget_factor
        budgets = Budgets(
            ttft_s=b.ttft_s * k,
            tpot_s=b.tpot_s * k,
            thinking_tpot_s=b.thinking_tpot_s * k if b.thinking_tpot_s is not None else None,
            thinking_tokens=b.thinking_tokens,
        )
        return RequestSpec(tier, prefix + rest, output_tokens, budgets)


# -- measuring -------------------------------------------------------------------------------


@dataclass
class _Step:
    """What one timed step cost, and what it did."""

    arrivals: int = 0
    admission_s: list[float] = field(default_factory=list)  # one per arrival
    schedule_s: float = 0.0
    update_s: float = 0.0
    # The process's CPU time in admission and schedule(): the wall time less any time the
    # operating system gave the CPU to another process (on a shared machine, most outliers).
    cpu_s: float = 0.0
    tokens: int = 0
    prefill: bool = False  # some request computed more than one token: a prefill chunk
    running: int = 0
    waiting: int = 0
    # Seconds in parts of sloserve's scheduler (see _BREAKDOWN), when broken down.
    parts: dict[str, float] = field(default_factory=dict)


class _Recorder:
    """The loop's meter: times the calls of timed steps, through `wrap` (a profiler's or
    callgrind's marker, or none), in wall time and in this thread's CPU time; calls of the
    warm-up pass through untouched."""

    def __init__(self, wrap: Meter) -> None:
        self.wrap = wrap
        self.step: _Step | None = None  # set while a timed step runs

    def __call__(self, phase: str, call: Callable[[], _T]) -> _T:
        step = self.step
        if step is None:
            return call()
        cpu_started = time.thread_time()
        started = time.perf_counter()
        result = self.wrap(phase, call)
        elapsed = time.perf_counter() - started
        cpu = time.thread_time() - cpu_started
        if phase == "add":
            step.admission_s.append(elapsed)
            step.cpu_s += cpu
        elif phase == "schedule":
            step.schedule_s += elapsed
            step.cpu_s += cpu
        else:
            step.update_s += elapsed
        return result


# The parts of sloserve's scheduler timed on their own, when asked: (attribute of the scheduler
# or of its policy, part). A method is replaced on the instance by a timed one, so each timed
# call costs two clock reads more (about a microsecond, beside milliseconds).
_BREAKDOWN = (
    ("scheduler", "_plan", "plan_glue"),  # with expiry and planner inside, taken out below
    ("scheduler", "_apply_expiry", "expiry"),
    ("policy", "plan", "planner"),
    ("scheduler", "_arrange", "arrange"),
    ("scheduler", "_shape_of", "shape_of"),
    ("policy", "arrive", "admission_policy"),
)


# The parts a step is broken into, as reported: schedule()'s, then admission's.
PARTS = (
    "expiry",
    "planner",
    "plan_glue",
    "arrange",
    "shape_of",
    "vllm_schedule_and_rest",
    "admission_policy",
    "admission_glue",
)


def _timed_part(recorder: _Recorder, part: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        step = recorder.step
        if step is None:
            return method(*args, **kwargs)
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            step.parts[part] = step.parts.get(part, 0.0) + time.perf_counter() - started

    return timed


def _parts_of_step(step: _Step) -> dict[str, float]:
    """The step's parts, nested ones taken out of the part around them: the rest of
    schedule() is vLLM's own schedule() and what the glue does around it."""
    parts = dict(step.parts)
    if not parts:
        return {}
    inner = parts.get("expiry", 0.0) + parts.get("planner", 0.0)
    parts["plan_glue"] = parts.get("plan_glue", 0.0) - inner
    around = sum(
        parts.get(p, 0.0) for p in ("plan_glue", "expiry", "planner", "arrange", "shape_of")
    )
    parts["vllm_schedule_and_rest"] = step.schedule_s - around
    parts["admission_glue"] = sum(step.admission_s) - parts.get("admission_policy", 0.0)
    return parts


class Contender:
    """One scheduler under the load: its loop and clock, its arrivals and timed steps."""

    def __init__(
        self,
        name: str,
        model: StepTimeModel,
        profile: dict[str, Any],
        model_dir: Path,
        stream: RequestStream,
        target: int,
        wrap: Meter,
        breakdown: bool = False,
    ) -> None:
        self.name = name
        self._stream = stream
        self._target = target
        self._ramp = max(1, math.ceil(target / RAMP_STEPS))
        self._recorder = _Recorder(wrap)
        config = LoopConfig(
            model=model_dir,
            kv_tokens=KV_TOKENS,
            max_num_seqs=max(MAX_NUM_SEQS, target),
            max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
            max_model_len=MAX_MODEL_LEN,
            async_scheduling=name.endswith("-async"),
            profile=profile if name.startswith("sloserve") else None,
        )
        self.clock = VirtualClock(model, step_overhead_s(model))
        self.loop = SchedulerLoop(config, self.clock, self._recorder, keep_outputs=False)
        self.arrived = 0
        self.steps: list[_Step] = []
        self._started_at = self.clock.now
        self._counters_at_start: dict[str, int] = {}
        scheduler = self.loop.scheduler
        self._policy = scheduler.slo_policy if isinstance(scheduler, SloPolicyMixin) else None
        if breakdown and self._policy is not None:
            owners = {"scheduler": scheduler, "policy": self._policy}
            for owner, attribute, part in _BREAKDOWN:
                method = getattr(owners[owner], attribute)
                setattr(owners[owner], attribute, _timed_part(self._recorder, part, method))

    @property
    def policy_counters(self) -> PolicyCounters | None:
        return self._policy.counters if self._policy is not None else None

    def start_timing(self) -> None:
        self._started_at = self.clock.now
        self._counters_at_start = self.verdicts()

    def run_step(self, timed: bool) -> None:
        """Admits this step's arrivals and schedules a step (completing the oldest in flight,
        as the engine core does)."""
        loop = self.loop
        held = len(loop.scheduler.requests)
        arrivals = max(0, min(self._target - held, self._ramp))
        requests = []
        for _ in range(arrivals):
            spec = self._stream[self.arrived]
            request_id = f"r{self.arrived}"
            self.arrived += 1
            slo = RequestSlo(request_id, spec.tier.name, spec.budgets, True, loop.now())
            requests.append(
                loop.request(request_id, len(spec.prompt), spec.output_tokens, slo,
                             prompt=spec.prompt)
            )  # fmt: skip
        step = _Step(arrivals=arrivals) if timed else None
        self._recorder.step = step
        loop.add(requests)
        output = loop.step()
        self._recorder.step = None
        if step is not None:
            step.tokens = output.total_num_scheduled_tokens
            step.prefill = step.tokens > len(output.num_scheduled_tokens)
            step.running = len(loop.scheduler.running)
            step.waiting = len(loop.scheduler.waiting)
            self.steps.append(step)

    def verdicts(self) -> dict[str, int]:
        """sloserve's decisions so far (none for vLLM's scheduler)."""
        counters = self.policy_counters
        if counters is None:
            return {}
        return {
            "admitted": sum(counters.admitted.values()),
            "best_effort": sum(counters.best_effort.values()),
            "rejected": sum(counters.rejected.values()),
            "expired": sum(counters.expired.values()),
        }

    def result(self) -> SchedulerCost:
        steps = self.steps
        at_start = self._counters_at_start
        verdicts = {k: v - at_start.get(k, 0) for k, v in self.verdicts().items()}
        admissions = [s for step in steps for s in step.admission_s]
        # Every part over every step (0 where a step had none of it: admission, in a step
        # without arrivals), so that the parts' quantiles count the same steps.
        by_step = [_parts_of_step(step) for step in steps]
        names = [name for name in PARTS if any(name in parts for parts in by_step)]
        parts = {name: [p.get(name, 0.0) for p in by_step] for name in names}
        return SchedulerCost(
            scheduler=self.name,
            steps=len(steps),
            arrivals=sum(step.arrivals for step in steps),
            step_ms=Quantiles.of([sum(s.admission_s) + s.schedule_s for s in steps]),
            step_cpu_ms=Quantiles.of([s.cpu_s for s in steps]),
            schedule_ms=Quantiles.of([s.schedule_s for s in steps]),
            admission_ms=Quantiles.of(admissions) if admissions else None,
            update_ms=Quantiles.of([s.update_s for s in steps]),
            running_mean=float(np.mean([s.running for s in steps])),
            waiting_mean=float(np.mean([s.waiting for s in steps])),
            tokens_mean=float(np.mean([s.tokens for s in steps])),
            prefill_step_share=float(np.mean([s.prefill for s in steps])),
            engine_s=self.clock.now - self._started_at,
            verdicts=verdicts,
            parts_ms={part: Quantiles.of(seconds) for part, seconds in parts.items()},
        )


@dataclass(frozen=True)
class Quantiles:
    """Milliseconds."""

    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Quantiles:
        ms = np.asarray(seconds, dtype=float) * 1000
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(p50=p50, p90=p90, p99=p99, max=float(ms.max()), mean=float(ms.mean()))


@dataclass(frozen=True)
class SchedulerCost:
    """One scheduler's cost per step at one load."""

    scheduler: str
    steps: int
    arrivals: int
    step_ms: Quantiles  # admission of the step's arrivals plus schedule(): the headline
    step_cpu_ms: Quantiles  # the same in CPU time (see _Step.cpu_s)
    schedule_ms: Quantiles
    admission_ms: Quantiles | None  # per arriving request (None: none arrived)
    update_ms: Quantiles  # update_from_output, for completeness
    running_mean: float
    waiting_mean: float
    tokens_mean: float
    prefill_step_share: float  # of steps that computed a prefill chunk
    engine_s: float  # virtual engine time the timed steps took
    verdicts: dict[str, int]  # sloserve's, over the timed steps
    # Per step, sloserve's scheduler part by part (see _BREAKDOWN), when broken down.
    parts_ms: dict[str, Quantiles] = field(default_factory=dict)

    @property
    def arrivals_per_step(self) -> float:
        return self.arrivals / self.steps if self.steps else 0.0

    @property
    def engine_share(self) -> float:
        """The scheduler's time (admission + schedule()) over the engine time the steps
        took: the schedulers plan steps of different lengths, so this compares them per
        second of serving where a per-step figure cannot."""
        return self.step_ms.mean * self.steps / 1000 / self.engine_s if self.engine_s else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "arrivals_per_step": self.arrivals_per_step,
            "engine_share": self.engine_share,
        }


@dataclass(frozen=True)
class LoadResult:
    shape: LoadShape
    schedulers: list[SchedulerCost]

    def cost(self, name: str) -> SchedulerCost | None:
        return next((c for c in self.schedulers if c.scheduler == name), None)

    def extra(self) -> dict[str, dict[str, dict[str, float]]]:
        """sloserve's cost per step beyond vLLM's own scheduler's, per pair measured: the
        difference (ms) and ratio of each quantile, in wall time and in CPU time."""
        extra: dict[str, dict[str, dict[str, float]]] = {}
        for slo, vllm in PAIRS:
            a, b = self.cost(slo), self.cost(vllm)
            if a is None or b is None:
                continue
            extra[slo] = {}
            for prefix, ours, theirs in (
                ("", asdict(a.step_ms), asdict(b.step_ms)),
                ("cpu_", asdict(a.step_cpu_ms), asdict(b.step_cpu_ms)),
            ):
                extra[slo][f"{prefix}minus_vllm_ms"] = {q: ours[q] - theirs[q] for q in ours}
                extra[slo][f"{prefix}over_vllm"] = {
                    q: ours[q] / theirs[q] if theirs[q] > 0 else math.inf for q in ours
                }
        return extra

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self.shape),
            "schedulers": [c.to_json() for c in self.schedulers],
            "extra": self.extra(),
        }


def measure_load(
    running: int,
    model: StepTimeModel,
    model_dir: Path,
    steps: int,
    warmup: int,
    schedulers: Sequence[str] = SCHEDULERS,
    seed: int = 0,
    vocab: int = 400,
    wrap_for: Callable[[str], Meter] = lambda name: unmetered,
    before_timing: Callable[[], None] | None = None,
    breakdown: bool = False,
) -> LoadResult:
    """Drives every scheduler named at `running` requests held: `warmup` steps to build the
    load, then `steps` timed ones, taking turns step by step. `wrap_for(name)` runs every
    timed call of that scheduler (a profiler's, or a marker for one); `before_timing` runs
    once the warm-up is over. `breakdown`: time the parts of sloserve's scheduler too."""
    shape = LoadShape.fit(running, model, KV_TOKENS)
    stream = RequestStream(shape, seed, vocab)
    profile = model.to_json()
    contenders = [
        Contender(name, model, profile, model_dir, stream, running, wrap_for(name), breakdown)
        for name in schedulers
    ]
    # As vLLM's engine core does once it has started: what start-up built is never collected.
    gc.collect()
    gc.freeze()
    try:
        for index in range(warmup):
            for contender in _in_turn(contenders, index):
                contender.run_step(timed=False)
        for contender in contenders:
            contender.start_timing()
        if before_timing is not None:
            before_timing()
        for index in range(steps):
            for contender in _in_turn(contenders, index):
                contender.run_step(timed=True)
    finally:
        gc.unfreeze()
    return LoadResult(shape, [c.result() for c in contenders])


def _in_turn(contenders: list[Contender], index: int) -> list[Contender]:
    """The contenders in an order that rotates each step: none always runs right after
    another (whose garbage, or cache footprint, it would inherit)."""
    k = index % len(contenders)
    return contenders[k:] + contenders[:k]

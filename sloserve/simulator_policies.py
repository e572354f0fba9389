"""The policies the virtual engine (sloserve/simulator.py) can drive, and the engine limits
they plan within.

"sloserve" is the replica's own SloPolicy, built as the vLLM scheduler builds it. The "vllm-*"
policies stand in for stock vLLM 0.32's scheduler (VllmScheduler): its default for online
serving on the profile's hardware, and the tuned variants methodology §5 compares against
(token budget, priority policy, long-prefill cap, queue admission, running batch), so a
simulated capacity ratio is against vLLM at its best, not a strawman.

References to vLLM are to the installed 0.32.0 (site-packages/vllm/...): `scheduler.py` is
v1/core/sched/scheduler.py, `request_queue.py` v1/core/sched/request_queue.py.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from sloserve.bench.vllm_knobs import VllmKnob, vllm_priority
from sloserve.replica.admission import ADMIT, Verdict
from sloserve.replica.planner import StepPlan, settings_for
from sloserve.replica.policy import Expiry, PolicyCounters, SloPolicy
from sloserve.replica.slo_request import Reason, SloRequest
from sloserve.stepmodel import StepTimeModel


class Policy(Protocol):
    """What the engine drives: SloPolicy's interface, so stand-ins plug in beside it."""

    counters: PolicyCounters
    last_plan_s: float

    def arrive(self, now: float, request: SloRequest) -> Verdict: ...

    def expire(self, now: float) -> list[Expiry]: ...

    def plan(
        self, now: float, decoding: Sequence[SloRequest], prefilling: Sequence[SloRequest]
    ) -> StepPlan: ...

    def finish(self, request_id: str, completed: bool) -> SloRequest | None: ...

    def observe_step(
        self, predicted_s: float, actual_s: float, decode_only: bool = False
    ) -> None: ...


@runtime_checkable
class PreemptingPolicy(Protocol):
    """A policy that picks its own preemption victims while it plans, as vLLM's scheduler
    does (without this, the engine picks them when a step overflows the KV cache)."""

    def take_preempted(self) -> list[str]:
        """The requests to preempt before the step just planned runs (their KV freed, to be
        recomputed); each is named once."""
        ...


@dataclass(frozen=True)
class EngineLimits:
    max_step_tokens: int  # vLLM's max_num_batched_tokens
    max_running: int  # vLLM's max_num_seqs
    kv_capacity_tokens: int  # tokens the KV cache holds

    @classmethod
    def from_profile(cls, model: StepTimeModel, kv_capacity_tokens: int) -> EngineLimits:
        """The limits the profile was measured under, so the model is not extrapolated."""
        engine = model.metadata.get("engine", {})
        return cls(
            max_step_tokens=int(engine.get("max_num_batched_tokens", 2048)),
            max_running=int(engine.get("max_num_seqs", 256)),
            kv_capacity_tokens=kv_capacity_tokens,
        )


# -- stock vLLM 0.32's scheduler ---------------------------------------------------------------


class SchedulingPolicy(enum.Enum):
    """vLLM's `--scheduling-policy` (request_queue.py:13)."""

    FCFS = "fcfs"
    PRIORITY = "priority"


@dataclass(frozen=True)
class VllmConfig:
    """The vLLM scheduler settings that shape SLOs (vllm/config/scheduler.py's SchedulerConfig).

    Chunked prefill is on, as vLLM enables it for every generative model it supports
    (arg_utils.py `_set_default_chunked_prefill_and_prefix_caching_args`).
    """

    max_num_batched_tokens: int  # the token budget of one step
    max_num_seqs: int  # requests in the running list
    policy: SchedulingPolicy = SchedulingPolicy.FCFS
    # A request's prefill chunk per step is cut to this when more than one request is in the
    # engine (0: no cap); adaptive floors it at max_num_batched_tokens / requests.
    long_prefill_token_threshold: int = 0
    long_prefill_token_threshold_adaptive: bool = False
    # The API server answers 503 while requests with no output yet hold at least this many
    # prompt tokens (None: no limit).
    max_num_queued_tokens: int | None = None

    def __post_init__(self) -> None:
        # What vLLM refuses to start with (config/scheduler.py:328 and the fields' bounds).
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}), which must be at least 1"
            )
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must not be negative")
        if self.max_num_queued_tokens is not None and self.max_num_queued_tokens < 0:
            raise ValueError("max_num_queued_tokens must not be negative")

    def flags(self) -> list[str]:
        """The `vllm serve` flags that set this configuration (every one, defaults too)."""
        flags = [
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--max-num-seqs", str(self.max_num_seqs),
            "--scheduling-policy", self.policy.value,
        ]  # fmt: skip
        if self.long_prefill_token_threshold:
            flags += ["--long-prefill-token-threshold", str(self.long_prefill_token_threshold)]
        if self.long_prefill_token_threshold_adaptive:
            flags.append("--long-prefill-token-threshold-adaptive")
        if self.max_num_queued_tokens is not None:
            flags += ["--max-num-queued-tokens", str(self.max_num_queued_tokens)]
        return flags


# GPU memory of the cards a profile may name, in GiB as vLLM's platform reports it; vLLM picks
# its defaults by memory (and by name for the A100). A name inside another comes after it, so
# an "H200" is not taken for an "H20", nor a "GH200" for an "H200".
_CARD_MEMORY_GIB = (
    ("gb200", 186.0), ("b300", 268.0), ("b200", 179.0), ("gh200", 95.0), ("h200", 140.0),
    ("h20", 95.0), ("h100", 79.6), ("h800", 79.6), ("a100", 79.2),
)  # fmt: skip


def vllm_serving_default(hardware: str) -> VllmConfig:
    """vLLM 0.32's defaults for its OpenAI server (UsageContext.OPENAI_API_SERVER) on one
    device of `hardware` (a profile's `hardware`: "NVIDIA A100-SXM4-80GB", "CPU ...").

    As arg_utils.py `get_batch_defaults` (:2894) picks them: >= 160 GiB of device memory:
    16384 tokens, 1024 requests; >= 70 GiB and not an A100 (H100, H200): 8192 and 1024; any
    other GPU, the A100 included (vLLM PR #17885: larger budgets cost the A100 throughput):
    2048 and 256; a CPU: 2048 and 128 (world size 1). A card this table does not know gets the
    other-GPU defaults, as vLLM does when it cannot read the device.
    """
    name = hardware.lower()
    if "cpu" in name:
        return VllmConfig(max_num_batched_tokens=2048, max_num_seqs=128)
    memory_gib = next((gib for card, gib in _CARD_MEMORY_GIB if card in name), 0.0)
    if memory_gib >= 160:
        return VllmConfig(max_num_batched_tokens=16384, max_num_seqs=1024)
    if memory_gib >= 70 and "a100" not in name:
        return VllmConfig(max_num_batched_tokens=8192, max_num_seqs=1024)
    return VllmConfig(max_num_batched_tokens=2048, max_num_seqs=256)


# vLLM orders its priority queue by (priority, arrival_time, request_id) (request.py:357);
# here the arrival's sequence number breaks exact ties, as an id would.
_QueueKey = tuple[int, float, int]


class _RequestQueue(Protocol):
    """The operations vLLM's scheduler uses on its waiting queue (request_queue.py)."""

    def add(self, request: SloRequest) -> None: ...

    def prepend(self, request: SloRequest) -> None:
        """A preempted request goes back: to the front (FCFS), or by its key (priority)."""

    def peek(self) -> SloRequest: ...

    def pop(self) -> SloRequest: ...

    def remove(self, request: SloRequest) -> None: ...

    def __len__(self) -> int: ...


class _FcfsQueue:
    """FCFSRequestQueue (request_queue.py:75): arrival order, preempted requests in front."""

    def __init__(self) -> None:
        self._queue: deque[SloRequest] = deque()

    def add(self, request: SloRequest) -> None:
        self._queue.append(request)

    def prepend(self, request: SloRequest) -> None:
        self._queue.appendleft(request)

    def peek(self) -> SloRequest:
        return self._queue[0]

    def pop(self) -> SloRequest:
        return self._queue.popleft()

    def remove(self, request: SloRequest) -> None:
        # By identity: SloRequest compares by value, field by field.
        self._queue = deque(r for r in self._queue if r is not request)

    def __len__(self) -> int:
        return len(self._queue)


class _PriorityQueue:
    """PriorityRequestQueue (request_queue.py:131): a heap on (priority, arrival); a
    preempted request goes back by its key, not to the front."""

    def __init__(self, keys: dict[str, _QueueKey]) -> None:
        self._keys = keys  # the scheduler's, filled in at arrival
        self._heap: list[tuple[_QueueKey, SloRequest]] = []

    def add(self, request: SloRequest) -> None:
        heapq.heappush(self._heap, (self._keys[request.request_id], request))

    prepend = add

    def peek(self) -> SloRequest:
        return self._heap[0][1]

    def pop(self) -> SloRequest:
        return heapq.heappop(self._heap)[1]

    def remove(self, request: SloRequest) -> None:
        self._heap = [entry for entry in self._heap if entry[1] is not request]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)


def _index(requests: Sequence[SloRequest], request: SloRequest) -> int | None:
    """Where `request` itself is in `requests` (SloRequest compares by value)."""
    return next((i for i, r in enumerate(requests) if r is request), None)


def create_request_queue(policy: SchedulingPolicy, keys: dict[str, _QueueKey]) -> _RequestQueue:
    """The waiting queue for `policy`, as request_queue.py:200 makes it."""
    if policy is SchedulingPolicy.PRIORITY:
        return _PriorityQueue(keys)
    return _FcfsQueue()


class VllmScheduler:
    """Stock vLLM 0.32's scheduler (scheduler.py `schedule()`, :591), step for step, on the
    virtual engine: what decides who runs, and when, as far as SLOs go.

    Each step, with a token budget of max_num_batched_tokens:
    1. The running list, in its order (the order requests were admitted into it): each gets
       what it has left to compute, one token for a decode, its prompt (chunked) for a
       prefill, cut to long_prefill_token_threshold (:708) and to the budget left. A request
       the KV cache cannot take preempts the last request of the running list (FCFS), or the
       one of lowest priority, latest arrival first (priority policy, which may unschedule
       one already scheduled this step), until it fits or is itself the victim (:788-844);
       then the running pass stops (:846). Victims lose their KV (recomputation) and go back
       to the waiting queue (:1613).
    2. Only when the step preempted nobody (:900): waiting requests in queue order (arrival,
       or (priority, arrival)) while the budget lasts and the running list has fewer than
       max_num_seqs requests (:923), each needing room in the KV cache for its whole prompt
       (scheduler_reserve_full_isl, on by default: kv_cache_manager.py:522); the first that
       does not fit stops the pass. Its chunk is cut as in 1 (:1155).
    The long-prefill cap is off when only one request is in the engine (:645), and adaptive,
    floored at max_num_batched_tokens / requests in the engine (:650).

    max_num_queued_tokens is checked in vLLM's API server before the engine sees the request
    (async_llm.py `check_admission`, :316): while requests with no output yet hold at least
    that many prompt tokens (their whole prompts, chunks done or not: output_processor.py:532),
    it answers 503: a rejection, a miss (methodology §2).

    It never sees a request's true output length: only the `max_tokens` cap (which vLLM's
    scheduler does not plan with either), and nothing of its SLO but the priority the client
    sends under the priority policy. Not modelled: KV blocks (tokens here), prefix caching,
    async scheduling's one step in flight, the one-step-earlier first token of a resumed
    request (it samples in its recompute step; the virtual engine a step later).
    """

    def __init__(self, config: VllmConfig, kv_capacity_tokens: int) -> None:
        self.config = config
        self.kv_capacity_tokens = kv_capacity_tokens
        self.counters = PolicyCounters()
        self.last_plan_s = 0.0
        self.requests: dict[str, SloRequest] = {}  # every request in the engine
        self.running: list[SloRequest] = []  # vLLM's running list, in its order
        self._keys: dict[str, _QueueKey] = {}
        self.waiting = create_request_queue(config.policy, self._keys)
        self._arrivals = itertools.count()
        self._preempted: list[str] = []  # victims of the step last planned

    # -- the Policy interface --------------------------------------------------------------

    def arrive(self, now: float, request: SloRequest) -> Verdict:
        name = request.slo.class_name
        limit = self.config.max_num_queued_tokens
        if limit is not None and self.queued_prompt_tokens() >= limit:
            # vLLM's 503: the prefill backlog is vLLM's TTFT knob, so "COMPUTE" (no time to
            # compute it), the reason sloserve's own admission gives for the same.
            self.counters.count(self.counters.rejected, (name, Reason.COMPUTE.value))
            return Verdict(None, Reason.COMPUTE, check="max_num_queued_tokens")
        self.counters.admitted[name] = self.counters.admitted.get(name, 0) + 1
        rid = request.request_id
        self.requests[rid] = request
        self._keys[rid] = (vllm_priority(request.budgets), now, next(self._arrivals))
        self.waiting.add(request)
        return ADMIT

    def expire(self, now: float) -> list[Expiry]:
        """vLLM never ends a request for being late."""
        return []

    def finish(self, request_id: str, completed: bool) -> SloRequest | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        del self._keys[request_id]
        at = _index(self.running, request)
        if at is None:
            self.waiting.remove(request)
        else:
            del self.running[at]
        return request

    def observe_step(self, predicted_s: float, actual_s: float, decode_only: bool = False) -> None:
        """vLLM plans no step against the clock, so it learns nothing from one."""

    def take_preempted(self) -> list[str]:
        preempted, self._preempted = self._preempted, []
        return preempted

    def plan(
        self, now: float, decoding: Sequence[SloRequest], prefilling: Sequence[SloRequest]
    ) -> StepPlan:
        started = time.perf_counter()
        if len(decoding) + len(prefilling) != len(self.requests):
            raise RuntimeError(
                f"the engine holds {len(decoding) + len(prefilling)} requests, the scheduler "
                f"{len(self.requests)}"
            )
        plan = self._schedule()
        self.last_plan_s = time.perf_counter() - started
        return plan

    # -- vLLM's schedule() -----------------------------------------------------------------

    def queued_prompt_tokens(self) -> int:
        """Prompt tokens of the requests with no output yet, as the API server counts them."""
        return sum(r.prompt_tokens for r in self.requests.values() if r.output_tokens == 0)

    def long_prefill_threshold(self) -> int:
        """The cap on one request's prefill chunk this step (0: none); scheduler.py:640-656."""
        threshold = self.config.long_prefill_token_threshold
        in_engine = len(self.running) + len(self.waiting)
        if threshold == 0 or in_engine <= 1:
            return 0
        if self.config.long_prefill_token_threshold_adaptive:
            return max(threshold, self.config.max_num_batched_tokens // in_engine)
        return threshold

    def _schedule(self) -> StepPlan:
        """One call of vLLM's schedule(): the tokens of each request, in scheduling order.

        It may schedule nothing and only preempt (the priority policy, when the first running
        request is its own victim); the engine then runs no step, as vLLM runs an empty one.
        """
        budget = self.config.max_num_batched_tokens
        # Only running requests hold KV: a waiting one never ran, or was preempted (its KV
        # freed by the engine before the step).
        free = self.kv_capacity_tokens - sum(r.computed_tokens for r in self.running)
        threshold = self.long_prefill_threshold()
        scheduled: dict[str, int] = {}
        preempted = False

        def chunk(request: SloRequest) -> int:
            tokens = request.prefill_left or 1  # nothing left to prefill: a decode token
            if 0 < threshold < tokens:
                tokens = threshold
            return min(tokens, budget)

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            tokens = chunk(request)
            stalled = False
            while tokens > free:
                victim = self._victim()
                at = _index(self.running, victim)
                assert at is not None
                del self.running[at]
                if at < index:
                    index -= 1
                restored = scheduled.pop(victim.request_id, 0)  # priority policy only
                budget += restored
                free += restored + victim.computed_tokens
                self._preempt(victim)
                preempted = True
                stalled = victim is request
                if stalled:
                    break
            if stalled:
                break  # it could not be scheduled: the running pass ends (:846)
            scheduled[request.request_id] = tokens
            budget -= tokens
            free -= tokens
            index += 1

        while not preempted and budget > 0 and self.waiting:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting.peek()
            # Its whole sequence must fit the free KV, not only its first chunk; a resumed
            # request's sequence holds its output so far too.
            if request.prompt_tokens + request.output_tokens > free:
                break
            tokens = chunk(request)
            self.running.append(self.waiting.pop())
            scheduled[request.request_id] = tokens
            budget -= tokens
            free -= tokens

        plan = StepPlan()
        for rid, tokens in scheduled.items():
            request = self.requests[rid]
            if request.decoding:
                plan.decodes.append(rid)
            else:
                plan.prefills.append((rid, tokens))
        return plan

    def _victim(self) -> SloRequest:
        """Whom vLLM preempts when a running request cannot get KV (scheduler.py:796-802)."""
        if self.config.policy is SchedulingPolicy.PRIORITY:
            return max(self.running, key=lambda r: self._keys[r.request_id])
        return self.running[-1]

    def _preempt(self, request: SloRequest) -> None:
        """Back to the waiting queue; the engine frees its KV (take_preempted)."""
        self._preempted.append(request.request_id)
        self.waiting.prepend(request)


# -- the stand-ins: vLLM's default and its tuned variants ----------------------------------------


@dataclass(frozen=True)
class VllmVariant:
    name: str
    knob: VllmKnob
    config: VllmConfig
    note: str = ""  # where the configuration departs from what its name says, and why

    def to_json(self) -> dict[str, Any]:
        return {"knob": self.knob.value, "flags": self.config.flags(), "note": self.note}


VLLM_DEFAULT = "vllm-default"
# The tuned values, for GPU-scale workloads (a 7-13B model on one datacenter GPU, methodology
# §4: chat prompts ~1,000 tokens at the median, summarization ~3,000, up to 8,192; prefill
# runs at ~10,000 tokens/s on an A100 and 2-3x that on an H100):
# - token budgets 256, 512, 2048 (§5); a budget under the default max_num_seqs brings
#   max_num_seqs down to it, as vLLM refuses a budget under max_num_seqs;
# - long prefill cap 256 and 512 tokens (a quarter and a half of a median chat prompt: a long
#   prompt prefills beside the others in chunks of that size), and 256 adaptive;
# - queued prefill tokens 4096 and 16384: vLLM's rule is target TTFT x prefill throughput, and
#   TTFT budgets run from ~0.1 s to ~1.5 s (3x/5x zero-load) at ~10,000 tokens/s;
# - running batch 64 and 128 (the default is 256 on an A100, 1024 on an H100).
TOKEN_BUDGETS = (256, 512, 2048)
LONG_PREFILL_THRESHOLDS = (256, 512)
ADAPTIVE_LONG_PREFILL_THRESHOLD = 256
QUEUED_TOKEN_LIMITS = (4096, 16384)
MAX_SEQS = (64, 128)


def vllm_variants(default: VllmConfig) -> dict[str, VllmVariant]:
    """The default and every tuned variant of it, each turning one knob (methodology §5)."""
    variants = [VllmVariant(VLLM_DEFAULT, VllmKnob.DEFAULT, default)]
    for n in TOKEN_BUDGETS:
        config = replace(
            default, max_num_batched_tokens=n, max_num_seqs=min(default.max_num_seqs, n)
        )
        variants.append(VllmVariant(f"vllm-budget-{n}", VllmKnob.TOKEN_BUDGET, config))
    variants.append(
        VllmVariant(
            "vllm-priority", VllmKnob.PRIORITY, replace(default, policy=SchedulingPolicy.PRIORITY)
        )
    )
    for n in LONG_PREFILL_THRESHOLDS:
        config = replace(default, long_prefill_token_threshold=n)
        variants.append(VllmVariant(f"vllm-long-prefill-{n}", VllmKnob.LONG_PREFILL, config))
    n = ADAPTIVE_LONG_PREFILL_THRESHOLD
    config = replace(
        default, long_prefill_token_threshold=n, long_prefill_token_threshold_adaptive=True
    )
    variants.append(VllmVariant(f"vllm-long-prefill-{n}-adaptive", VllmKnob.LONG_PREFILL, config))
    for n in QUEUED_TOKEN_LIMITS:
        config = replace(default, max_num_queued_tokens=n)
        variants.append(VllmVariant(f"vllm-queued-tokens-{n}", VllmKnob.QUEUED_TOKENS, config))
    for n in MAX_SEQS:
        config = replace(default, max_num_seqs=min(n, default.max_num_batched_tokens))
        variants.append(VllmVariant(f"vllm-max-seqs-{n}", VllmKnob.MAX_SEQS, config))
    return {v.name: v for v in variants}


def _within_profile(variant: VllmVariant, max_step_tokens: int) -> VllmVariant:
    """A budget over the profile's fitted range would extrapolate the step-time model: it is
    capped at the range, and the variant says so."""
    config = variant.config
    if config.max_num_batched_tokens <= max_step_tokens:
        return variant
    capped = replace(
        config,
        max_num_batched_tokens=max_step_tokens,
        max_num_seqs=min(config.max_num_seqs, max_step_tokens),
    )
    note = (
        f"vLLM's budget of {config.max_num_batched_tokens} tokens is capped at "
        f"{max_step_tokens}, the most tokens per step the profile was fitted to"
    )
    return replace(variant, config=capped, note=note)


def vllm_standins(model: StepTimeModel, limits: EngineLimits) -> dict[str, VllmVariant]:
    """The stand-ins for the profile's hardware: vLLM's serving default there, and its tuned
    variants, within the token range the profile covers."""
    default = vllm_serving_default(str(model.metadata.get("hardware", "")))
    return {
        name: _within_profile(variant, limits.max_step_tokens)
        for name, variant in vllm_variants(default).items()
    }


# The names do not depend on the hardware, only the settings behind them.
VLLM_STANDINS = tuple(vllm_variants(VllmConfig(2048, 256)))
VLLM_TUNED = tuple(name for name in VLLM_STANDINS if name != VLLM_DEFAULT)
POLICIES = ("sloserve", *VLLM_STANDINS)


def make_policy(name: str, model: StepTimeModel, limits: EngineLimits) -> Policy:
    """A fresh policy: each run starts from an empty request table and empty counters."""
    if name == "sloserve":
        # As the replica's scheduler builds it (scheduler.py), so the simulation plans alike.
        settings = settings_for(model, limits.max_step_tokens, limits.max_running)
        return SloPolicy(model, settings, limits.kv_capacity_tokens)
    standins = vllm_standins(model, limits)
    if name in standins:
        return VllmScheduler(standins[name].config, limits.kv_capacity_tokens)
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")

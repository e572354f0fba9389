"""The simulator's stand-ins for stock vLLM 0.32 (simulator_policies.VllmScheduler): each knob
on tiny hand-built workloads, and step for step against vLLM's own scheduler, driven in process
(sloserve/bench/scheduler_loop.py) on the same arrivals.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from sloserve.bench import report, scheduler_loop
from sloserve.bench.cli import CPU_LENGTH_SCALE
from sloserve.bench.types import BenchRequest, client_cap
from sloserve.bench.vllm_knobs import VllmKnob, vllm_priority
from sloserve.bench.workloads import build_scenario
from sloserve.cli import main as cli_main
from sloserve.replica.admission import Verdict
from sloserve.replica.planner import StepPlan
from sloserve.replica.slo_request import SloRequest
from sloserve.simulate_cli import _policies
from sloserve.simulator import VirtualEngine
from sloserve.simulator_policies import (
    POLICIES,
    VLLM_DEFAULT,
    VLLM_STANDINS,
    VLLM_TUNED,
    EngineLimits,
    SchedulingPolicy,
    VllmConfig,
    VllmScheduler,
    make_policy,
    vllm_serving_default,
    vllm_standins,
)
from sloserve.slo import Budgets, RequestSlo
from sloserve.stepmodel import StepTimeModel, shipped_profile

LOOSE = Budgets(ttft_s=5.0, tpot_s=0.1)  # priority 100,000
TIGHT = Budgets(ttft_s=5.0, tpot_s=0.05)  # priority 50,000: runs first under the priority policy
ROOMY_KV = 1 << 20
ADAPTIVE = VllmConfig(
    256, 8, long_prefill_token_threshold=32, long_prefill_token_threshold_adaptive=True
)


@cache
def _cpu() -> StepTimeModel:
    return shipped_profile("cpu-bench")


@cache
def _a100() -> StepTimeModel:
    return shipped_profile("gpu-llama-3-8b-a100-vidur")


class _Driver:
    """Steps a VllmScheduler as the virtual engine does (simulator.py `_step`, `_advance`),
    one step at a time with no clock: arrivals land between steps, at the step count."""

    def __init__(self, config: VllmConfig, kv_tokens: int = ROOMY_KV) -> None:
        self.policy = VllmScheduler(config, kv_tokens)
        self.kv_tokens = kv_tokens
        self.views: dict[str, SloRequest] = {}
        self.lengths: dict[str, int] = {}  # true output lengths: the driver's, not the policy's
        self.steps = 0
        self.preempted: list[str] = []  # in the last step

    def add(self, rid: str, prompt: int, output: int, budgets: Budgets = LOOSE) -> Verdict:
        now = float(self.steps)
        view = SloRequest(rid, RequestSlo(rid, "c", budgets, False, now), prompt, client_cap(64))
        verdict = self.policy.arrive(now, view)
        if not verdict.rejected:
            self.views[rid] = view
            self.lengths[rid] = output
        return verdict

    def step(self) -> dict[str, int]:
        views = list(self.views.values())
        plan = self.policy.plan(
            float(self.steps),
            [v for v in views if v.decoding],
            [v for v in views if not v.decoding],
        )
        self.preempted = self.policy.take_preempted()
        for rid in self.preempted:
            self.views[rid].computed_tokens = 0
        scheduled = dict.fromkeys(plan.decodes, 1) | dict(plan.prefills)
        assert sum(v.computed_tokens for v in views) + sum(scheduled.values()) <= self.kv_tokens
        self.steps += 1
        for rid, tokens in scheduled.items():
            view = self.views[rid]
            was_decoding = view.decoding
            view.computed_tokens += tokens
            if was_decoding or (view.output_tokens == 0 and view.prefill_left == 0):
                view.on_tokens(1, float(self.steps))
            if view.output_tokens >= self.lengths[rid]:
                self.policy.finish(rid, completed=True)
                del self.views[rid]
        return scheduled

    def running(self) -> list[str]:
        return [r.request_id for r in self.policy.running]


# -- vLLM's settings ---------------------------------------------------------------------------


def test_serving_defaults_follow_vllms_per_device_table() -> None:
    # arg_utils.py get_batch_defaults, UsageContext.OPENAI_API_SERVER
    assert vllm_serving_default("NVIDIA A100-SXM4-80GB") == VllmConfig(2048, 256)
    assert vllm_serving_default("NVIDIA H100 80GB HBM3") == VllmConfig(8192, 1024)
    assert vllm_serving_default("NVIDIA H200") == VllmConfig(8192, 1024)
    assert vllm_serving_default("NVIDIA GH200 480GB") == VllmConfig(8192, 1024)
    assert vllm_serving_default("NVIDIA H20") == VllmConfig(8192, 1024)
    assert vllm_serving_default("NVIDIA B200") == VllmConfig(16384, 1024)
    assert vllm_serving_default("NVIDIA L4") == VllmConfig(2048, 256)
    assert vllm_serving_default("CPU AMD EPYC (2 cores)") == VllmConfig(2048, 128)


def test_the_a100_default_is_2048_tokens_and_256_requests_within_the_profile() -> None:
    model = _a100()
    limits = EngineLimits.from_profile(model, 400_000)
    standins = vllm_standins(model, limits)
    assert set(standins) == set(VLLM_STANDINS)
    default = standins[VLLM_DEFAULT]
    assert default.config == VllmConfig(2048, 256) and default.note == ""
    assert {v.knob for v in standins.values()} == set(VllmKnob)
    budgets = [v.config for v in standins.values() if v.knob is VllmKnob.TOKEN_BUDGET]
    assert [(c.max_num_batched_tokens, c.max_num_seqs) for c in budgets] == [
        (256, 256), (512, 256), (2048, 256)
    ]  # fmt: skip
    priority = standins["vllm-priority"].config
    assert priority == replace(default.config, policy=SchedulingPolicy.PRIORITY)


def test_a_budget_past_the_profiles_range_is_capped_and_says_so() -> None:
    # An H100's default budget (8192) on a profile fitted up to 4096 tokens a step.
    model = StepTimeModel.from_json(_a100().to_json() | {"hardware": "NVIDIA H100 80GB HBM3"})
    standins = vllm_standins(model, EngineLimits.from_profile(model, 400_000))
    default = standins[VLLM_DEFAULT]
    assert default.config == VllmConfig(4096, 1024)
    assert "8192" in default.note and "4096" in default.note
    assert standins["vllm-budget-512"].config == VllmConfig(512, 512)  # seats <= budget
    assert standins["vllm-budget-512"].note == ""


def test_vllm_refuses_a_budget_under_max_num_seqs() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        VllmConfig(max_num_batched_tokens=128, max_num_seqs=256)


def test_the_variants_flags_are_vllms_own() -> None:
    """Every stand-in's settings, as `vllm serve` flags, parse with vLLM's own server parser
    into the same scheduler configuration."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
    model = _a100()
    for variant in vllm_standins(model, EngineLimits.from_profile(model, 400_000)).values():
        args = parser.parse_args(["--model", "m", *variant.config.flags()])
        parsed = VllmConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            policy=SchedulingPolicy(args.scheduling_policy),
            long_prefill_token_threshold=args.long_prefill_token_threshold,
            long_prefill_token_threshold_adaptive=args.long_prefill_token_threshold_adaptive,
            max_num_queued_tokens=args.max_num_queued_tokens,
        )
        assert parsed == variant.config, variant.name


def test_priority_is_the_binding_budget() -> None:
    assert vllm_priority(Budgets(1.0, 0.1)) == 100_000
    assert vllm_priority(Budgets(1.0, 0.1, 0.05)) == 50_000  # reasoning: its thinking TPOT
    assert vllm_priority(Budgets(0.02, 0.1)) == 20_000  # a TTFT tighter than the TPOT binds


# -- each knob on hand-built workloads ---------------------------------------------------------


def test_running_requests_go_first_in_running_order_then_waiting_ones() -> None:
    driver = _Driver(VllmConfig(max_num_batched_tokens=256, max_num_seqs=8))
    driver.add("a", prompt=100, output=3)
    assert driver.step() == {"a": 100}
    driver.add("long", prompt=1000, output=2)
    assert driver.step() == {"a": 1, "long": 255}
    driver.add("b", prompt=50, output=5)
    # "long" is running: its next chunk takes what "a" leaves, and "b" waits for a budget.
    assert driver.step() == {"a": 1, "long": 255}
    assert driver.running() == ["long"]  # "a" finished
    assert driver.step() == {"long": 256}
    assert driver.step() == {"long": 234, "b": 22}  # the rest of "long", then "b" starts
    assert driver.step() == {"long": 1, "b": 28}  # in running order: "long" decodes first


def test_the_long_prefill_threshold_caps_running_and_waiting_chunks() -> None:
    driver = _Driver(VllmConfig(256, 8, long_prefill_token_threshold=64))
    driver.add("alone", prompt=300, output=2)
    assert driver.step() == {"alone": 256}  # alone in the engine: no cap (nobody to starve)
    driver.add("x", prompt=200, output=2)
    driver.add("y", prompt=30, output=2)
    assert driver.step() == {"alone": 44, "x": 64, "y": 30}  # waiting chunks cut to 64
    assert driver.step() == {"alone": 1, "x": 64, "y": 1}  # a running chunk too
    assert driver.step() == {"x": 72}  # alone again ("alone" and "y" are done): no cap


def test_the_adaptive_threshold_floors_at_a_fair_share_of_the_budget() -> None:
    config = VllmConfig(256, 8, long_prefill_token_threshold=16)
    adaptive = replace(config, long_prefill_token_threshold_adaptive=True)
    for cfg, chunk in ((config, 16), (adaptive, 256 // 4)):
        driver = _Driver(cfg)
        for rid in "abcd":
            driver.add(rid, prompt=500, output=1)
        assert driver.policy.long_prefill_threshold() == chunk
        assert driver.step() == dict.fromkeys("abcd", chunk)


def test_max_num_seqs_bounds_the_running_list() -> None:
    driver = _Driver(VllmConfig(256, max_num_seqs=2))
    for rid in "abc":
        driver.add(rid, prompt=10, output=3)
    assert driver.step() == {"a": 10, "b": 10}
    assert driver.running() == ["a", "b"] and len(driver.policy.waiting) == 1
    assert driver.step() == {"a": 1, "b": 1}
    assert driver.step() == {"a": 1, "b": 1}  # both finish here
    assert driver.step() == {"c": 10}


def test_the_priority_policy_orders_waiting_requests_by_binding_deadline() -> None:
    for policy, first in ((SchedulingPolicy.FCFS, "loose"), (SchedulingPolicy.PRIORITY, "tight")):
        driver = _Driver(VllmConfig(256, 1, policy=policy))
        driver.add("loose", prompt=10, output=1, budgets=LOOSE)
        driver.add("tight", prompt=10, output=1, budgets=TIGHT)
        assert driver.step() == {first: 10}, policy
    # Equal priorities: arrival order. Running requests keep their order whatever their
    # priority (vLLM sorts only its waiting queue).
    driver = _Driver(VllmConfig(256, 8, policy=SchedulingPolicy.PRIORITY))
    driver.add("loose", prompt=10, output=4, budgets=LOOSE)
    driver.step()
    for rid in ("t1", "t2"):
        driver.add(rid, prompt=10, output=4, budgets=TIGHT)
    assert list(driver.step()) == ["loose", "t1", "t2"]
    assert driver.running() == ["loose", "t1", "t2"]


# Three requests whose decodes outgrow the KV cache, the last with the tightest budget. The
# sizes are whole KV blocks of vLLM on a CPU (128 tokens), so vLLM admits all three too.
SQUEEZE = (("first", LOOSE), ("second", LOOSE), ("third", TIGHT))
SQUEEZE_PROMPT, SQUEEZE_OUTPUT, SQUEEZE_KV = 256, 300, 1024


def _kv_squeeze(policy: SchedulingPolicy) -> _Driver:
    driver = _Driver(VllmConfig(512, 8, policy=policy), kv_tokens=SQUEEZE_KV)
    for rid, budgets in SQUEEZE:
        driver.add(rid, prompt=SQUEEZE_PROMPT, output=SQUEEZE_OUTPUT, budgets=budgets)
    return driver


def test_kv_exhaustion_preempts_from_the_end_of_the_running_list() -> None:
    driver = _kv_squeeze(SchedulingPolicy.FCFS)
    while not driver.preempted:
        step = driver.step()
    assert driver.preempted == ["third"]  # the last in running order, whatever its priority
    assert driver.running() == ["first", "second"] and set(step) == {"first", "second"}
    assert driver.views["third"].computed_tokens == 0  # to be recomputed
    assert driver.policy.waiting.peek().request_id == "third"  # first to go back in


def test_the_priority_policy_preempts_its_lowest_priority_request() -> None:
    driver = _kv_squeeze(SchedulingPolicy.PRIORITY)
    added = False
    while True:
        free = SQUEEZE_KV - sum(v.computed_tokens for v in driver.views.values())
        if free < 20 and not added:  # waits: its prompt does not fit
            driver.add("small", prompt=20, output=1, budgets=TIGHT)
            added = True
        step = driver.step()
        if driver.preempted:
            break
        assert "small" not in step
    # The tight "third" was admitted first; (priority, arrival) is highest for "second":
    # loose, and later than "first".
    assert driver.preempted == ["second"]
    assert driver.running() == ["third", "first"]
    # A step that preempts admits nobody, though "small" now fits; the next one does, ahead
    # of the victim (the queue is by priority).
    assert "small" not in step
    assert driver.step() == {"third": 1, "first": 1, "small": 20}


def test_the_queued_token_limit_rejects_at_arrival() -> None:
    driver = _Driver(VllmConfig(256, 8, max_num_queued_tokens=500))
    assert not driver.add("a", prompt=400, output=2).rejected
    assert not driver.add("b", prompt=400, output=2).rejected  # 400 queued, under the limit
    rejected = driver.add("c", prompt=10, output=2)  # 800 queued: at or over it
    assert rejected.rejected and rejected.check == "max_num_queued_tokens"
    assert driver.policy.counters.rejected == {("c", "COMPUTE"): 1}
    driver.step()
    driver.step()  # "a" has its first token: its prompt leaves the count, chunks do not
    assert driver.policy.queued_prompt_tokens() == 400
    assert not driver.add("d", prompt=10, output=2).rejected


def test_the_engine_counts_a_queue_rejection_as_a_miss() -> None:
    model = _cpu()
    limits = EngineLimits.from_profile(model, 100_000)
    config = VllmConfig(2048, 128, max_num_queued_tokens=1000)
    requests = [BenchRequest(i, "chat", LOOSE, 600, 4, arrival_s=0.0) for i in range(3)]
    result = VirtualEngine(model, limits, VllmScheduler(config, 100_000)).run(requests)
    assert [r.rejected for r in result.records] == [False, False, True]
    assert result.records[2].reject_reason == "COMPUTE" and not result.records[2].completed


# -- on the virtual engine ---------------------------------------------------------------------


class _StrictEngine(VirtualEngine):
    """Fails if a stand-in's plan does not fit the KV cache as planned: vLLM's victims are
    the policy's, never the engine's."""

    def _fit_kv(self, work: Any) -> Any:
        fitted = super()._fit_kv(work)
        assert fitted == work, "the engine had to cut the plan to fit the KV cache"
        return fitted


@pytest.mark.parametrize("name", ["vllm-default", "vllm-priority", "vllm-long-prefill-256"])
def test_a_stand_in_preempts_within_its_own_plan(name: str) -> None:
    model = _cpu()
    requests = build_scenario(
        "mixed", model=model, rate=6.0, count=100, seed=0, scale=CPU_LENGTH_SCALE
    ).requests
    largest = max(r.prompt_tokens + r.output_tokens for r in requests)
    limits = EngineLimits.from_profile(model, largest + 64)
    engine = _StrictEngine(model, limits, make_policy(name, model, limits), name)
    result = engine.run(requests)
    assert result.stats.preemptions["admitted"] > 0
    assert all(r.completed for r in result.records), "a stand-in never turns a request away"
    assert engine.held_tokens == 0


def test_a_step_that_only_preempts_runs_nothing_and_takes_no_time() -> None:
    """Under the priority policy the first running request can be its own victim: vLLM's
    step then schedules nothing, and the next one runs in the room it left."""

    class Counting(VllmScheduler):
        empty_steps = 0

        def plan(
            self, now: float, decoding: Sequence[SloRequest], prefilling: Sequence[SloRequest]
        ) -> StepPlan:
            plan = super().plan(now, decoding, prefilling)
            self.empty_steps += not plan.tokens and bool(self._preempted)
            return plan

    model = _cpu()
    kv = 601  # so that the loose request, first in running order, is the one short of KV
    limits = EngineLimits.from_profile(model, kv)
    policy = Counting(VllmConfig(512, 8, policy=SchedulingPolicy.PRIORITY), kv)
    requests = [
        BenchRequest(0, "loose", LOOSE, 256, 200, arrival_s=0.0),  # runs first, preempted
        BenchRequest(1, "tight", TIGHT, 256, 200, arrival_s=0.001),
    ]
    result = _StrictEngine(model, limits, policy, "vllm-priority").run(requests)
    assert policy.empty_steps == 1 and result.stats.preemptions["admitted"] == 1
    loose, tight = result.records
    assert loose.completed and tight.completed
    assert tight.finished_at is not None and loose.finished_at is not None
    assert tight.finished_at < loose.finished_at


def _longer(request: BenchRequest, by: int) -> BenchRequest:
    return replace(request, output_tokens=request.output_tokens + by)


@pytest.mark.parametrize("name", VLLM_STANDINS)
def test_a_stand_in_never_sees_the_true_output_length(name: str) -> None:
    """Two runs that differ only in one request's true length (the same max_tokens) are
    the same run until that request's shorter version ends."""
    model = _cpu()
    requests = build_scenario(
        "chatbot", model=model, rate=4.0, count=40, seed=3, scale=CPU_LENGTH_SCALE
    ).requests
    limits = EngineLimits.from_profile(model, 100_000)
    runs = [
        VirtualEngine(model, limits, make_policy(name, model, limits)).run(workload).records
        for workload in (requests, [_longer(r, 7) if r.index == 5 else r for r in requests])
    ]
    ended = runs[0][5].finished_at
    assert ended is not None
    for short, long in zip(*runs, strict=True):
        assert [t for t in short.token_times if t <= ended] == [
            t for t in long.token_times if t <= ended
        ]


# -- against vLLM's own scheduler --------------------------------------------------------------


def _vllm_loop(
    tiny_model: Path, config: VllmConfig, kv_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> scheduler_loop.SchedulerLoop:
    """vLLM 0.32's Scheduler (sync scheduling, no prefix caching) with `config`'s knobs."""
    from vllm.engine.arg_utils import EngineArgs

    # LoopConfig carries the budget and the seats; the other knobs go to its EngineArgs.
    engine_args = functools.partial(
        EngineArgs,
        scheduling_policy=config.policy.value,
        long_prefill_token_threshold=config.long_prefill_token_threshold,
        long_prefill_token_threshold_adaptive=config.long_prefill_token_threshold_adaptive,
        enable_prefix_caching=False,
    )
    monkeypatch.setattr(scheduler_loop, "EngineArgs", engine_args)
    loop_config = scheduler_loop.LoopConfig(
        model=tiny_model,
        kv_tokens=kv_tokens,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=1024,
    )
    return scheduler_loop.SchedulerLoop(loop_config)


def _arrivals(seed: int) -> dict[int, list[tuple[str, int, int, Budgets]]]:
    """Requests by the step they arrive before: prompts of 16-900 tokens, outputs of 1-40,
    loose and tight budgets, several arriving together."""
    rng = random.Random(seed)
    arrivals: dict[int, list[tuple[str, int, int, Budgets]]] = {}
    for i in range(24):
        step = rng.choice(range(0, 40, 3))
        request = (
            f"r{i:02d}",
            rng.randint(16, 900),
            rng.randint(1, 40),
            rng.choice([LOOSE, TIGHT]),
        )
        arrivals.setdefault(step, []).append(request)
    return arrivals


def _steps_side_by_side(
    loop: scheduler_loop.SchedulerLoop, driver: _Driver, seed: int
) -> Iterator[tuple[dict[str, int], dict[str, int]]]:
    arrivals = _arrivals(seed)
    scheduler: Any = loop.scheduler
    for step in range(2000):
        for rid, prompt, length, budgets in arrivals.get(step, []):
            request = loop.request(rid, prompt, max_tokens=length, first_token=10 + step)
            request.priority = vllm_priority(budgets)
            request.arrival_time = float(step)
            loop.add([request])
            driver.add(rid, prompt, length, budgets)
        if step > max(arrivals) and not scheduler.has_requests():
            assert not driver.views
            return
        scheduled = loop.step()
        assert not scheduled.preempted_req_ids, "the KV cache is meant to be roomy here"
        yield dict(scheduled.num_scheduled_tokens), driver.step()
    pytest.fail("vLLM's scheduler did not drain in 2,000 steps")


@pytest.mark.parametrize(
    "config",
    [
        VllmConfig(256, 8),
        VllmConfig(256, 3),
        VllmConfig(256, 8, long_prefill_token_threshold=64),
        ADAPTIVE,
        VllmConfig(256, 8, policy=SchedulingPolicy.PRIORITY),
        VllmConfig(128, 4, policy=SchedulingPolicy.PRIORITY, long_prefill_token_threshold=48),
    ],
    ids=["fcfs", "max-seqs-3", "long-prefill-64", "long-prefill-32-adaptive", "priority",
         "priority-long-prefill"],
)  # fmt: skip
def test_every_step_matches_vllms_scheduler(
    tiny_model: Path, config: VllmConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = _vllm_loop(tiny_model, config, kv_tokens=64 * 1024, monkeypatch=monkeypatch)
    driver = _Driver(config)
    steps = 0
    for steps, (vllm, ours) in enumerate(_steps_side_by_side(loop, driver, seed=11), 1):
        assert ours == vllm, f"step {steps}"
    assert steps > 50


@pytest.mark.parametrize(
    ("policy", "victim"), [(SchedulingPolicy.FCFS, "third"), (SchedulingPolicy.PRIORITY, "second")]
)
def test_vllm_picks_the_same_first_victim(
    tiny_model: Path, policy: SchedulingPolicy, victim: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM counts KV in blocks (of 128 tokens on a CPU), so it runs out steps apart from
    the token count; the request it preempts first is the same."""
    config = VllmConfig(512, 8, policy=policy)
    loop = _vllm_loop(tiny_model, config, SQUEEZE_KV, monkeypatch)
    for step, (rid, budgets) in enumerate(SQUEEZE):
        request = loop.request(rid, SQUEEZE_PROMPT, SQUEEZE_OUTPUT, first_token=10 + step)
        request.priority = vllm_priority(budgets)
        request.arrival_time = float(step)
        loop.add([request])
    for _ in range(300):
        preempted = loop.step().preempted_req_ids
        if preempted:
            assert preempted == {victim}
            break
    else:
        pytest.fail("vLLM never preempted")
    driver = _kv_squeeze(policy)
    while not driver.preempted:
        driver.step()
    assert driver.preempted == [victim]


# -- the command line and the report ------------------------------------------------------------


def test_policy_groups_on_the_command_line() -> None:
    assert _policies("all") == list(POLICIES)
    assert _policies("vllm") == list(VLLM_STANDINS)
    assert _policies("sloserve,vllm-tuned") == ["sloserve", *VLLM_TUNED]
    assert _policies("vllm-default, vllm-budget-512,vllm-default") == [
        "vllm-default", "vllm-budget-512"
    ]  # fmt: skip
    with pytest.raises(Exception, match="unknown policy 'vllm-fcfs-2048'"):
        _policies("vllm-fcfs-2048")


def test_the_capacity_table_names_the_best_tuned_variant() -> None:
    rows = [
        report.CapacityRow("sloserve", 6.0),
        report.CapacityRow("vllm-default", 2.0),
        report.CapacityRow("vllm-budget-512", 3.0),
        report.CapacityRow("vllm-priority", 1.5),
    ]
    table = report.capacity_table(
        rows, baselines=["vllm-default"], best_of=["vllm-budget-512", "vllm-priority"]
    )
    assert "| vs vllm-default | vs best tuned (vllm-budget-512) |" in table
    assert "| sloserve | 6 | - | - | 3.00x | 2.00x |" in table


def test_cli_sweep_reports_the_default_and_the_best_tuned(tmp_path: Path) -> None:
    import json

    out = tmp_path / "sweep"
    argv = ["simulate", "--scenario", "chatbot", "--sweep", "--requests", "40"]
    argv += ["--policy", "vllm-default,vllm-budget-512,vllm-long-prefill-256"]
    assert cli_main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capacity = {name: p["capacity_rps"] for name, p in summary["policies"].items()}
    tuned = ["vllm-budget-512", "vllm-long-prefill-256"]
    assert summary["best_tuned_vllm"] == max(tuned, key=lambda n: capacity[n])
    assert summary["vllm_standins"]["vllm-default"]["flags"][:4] == [
        "--max-num-batched-tokens",
        "2048",
        "--max-num-seqs",
        "128",
    ]  # fmt: skip  (the CPU profile: vLLM's CPU defaults)
    markdown = (out / "summary.md").read_text()
    assert f"vs best tuned ({summary['best_tuned_vllm']})" in markdown

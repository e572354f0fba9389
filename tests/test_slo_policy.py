"""The SLO policy on its own (no engine): deadlines, step planning, admission, expiry."""

from __future__ import annotations

import math

import pytest

from sloserve.replica.admission import (
    FORECAST_ERROR_MIN_SAMPLES,
    QUEUE_LATE_ALLOWANCE,
    AdmissionController,
    ForecastErrors,
    GroupedForecastErrors,
    OutputLengths,
    _DecodeBatch,
)
from sloserve.replica.planner import PlannerSettings, StepPlanner, stretched_cap_s
from sloserve.replica.policy import BEARABLE_STRETCH, SloPolicy
from sloserve.replica.slo_request import Mode, Reason, SloRequest
from sloserve.slo import Budgets, RequestSlo, judge
from sloserve.stepmodel import StepShape, StepTimeModel

# One piece: 5 ms per step + 0.1 ms per token (no request or context cost), so the arithmetic
# below can be checked by hand.
MODEL = StepTimeModel(pieces=[(0.005, 0.0001, 0.0, 0.0)])
SETTINGS = PlannerSettings(max_step_tokens=2048, max_running=64, safety_factor=1.0, delivery_s=0.0)
TIGHT = Budgets(ttft_s=0.2, tpot_s=0.010)
LOOSE = Budgets(ttft_s=1.0, tpot_s=0.040)


def make(
    request_id: str,
    budgets: Budgets,
    arrival: float = 0.0,
    prompt: int = 100,
    max_tokens: int = 50,
    best_effort_ok: bool = False,
    strict: bool = False,
    class_name: str = "",
    already_waited: float = 0.0,
) -> SloRequest:
    name = class_name or ("tight" if budgets is TIGHT else "loose")
    slo = RequestSlo(
        request_id, name, budgets, best_effort_ok, arrival, strict=strict,
        already_waited_s=already_waited,
    )  # fmt: skip
    return SloRequest(request_id, slo, prompt_tokens=prompt, max_tokens=max_tokens)


def decoding(request: SloRequest, first_token_at: float, tokens: int = 1) -> SloRequest:
    request.computed_tokens = request.prompt_tokens + tokens - 1
    request.on_tokens(1, first_token_at)
    for _ in range(tokens - 1):
        request.on_tokens(1, first_token_at)
    return request


# -- deadlines -----------------------------------------------------------------------------


def test_next_deadline_follows_the_judge() -> None:
    """A stream whose every token lands exactly on next_deadline() is judged on time, and
    one a hair later is not."""
    budgets = Budgets(ttft_s=0.5, tpot_s=0.05, thinking_tpot_s=0.02, thinking_tokens=3)
    request = make("r", budgets, arrival=10.0)
    times: list[float] = []
    for k in range(8):
        due = request.next_deadline()
        # the first token comes early, which gives decode no slack (the clock starts at a+F)
        t = due - 0.3 if k == 0 else due
        times.append(t)
        request.on_tokens(1, t)
    assert judge(10.0, times, budgets).met
    late = [*times[:-1], times[-1] + 0.06 * budgets.tpot_s * 7]
    assert not judge(10.0, late, budgets).met


def test_delivery_moves_deadlines_counted_from_arrival_not_from_the_first_token() -> None:
    """The client sees each token `delivery` after its step, the first one too: a deadline
    counted from the arrival comes that much earlier on the engine's clock, one counted from
    the first token does not (its anchor moves with it)."""
    budgets = Budgets(ttft_s=1.0, tpot_s=0.1)
    early = decoding(make("early", budgets, arrival=0.0), first_token_at=0.5)
    assert early.next_deadline(1.05, delivery_s=0.01) == pytest.approx(1.0 - 0.01 + 0.105)
    late = decoding(make("late", budgets, arrival=0.0), first_token_at=1.02)
    assert late.next_deadline(1.05, delivery_s=0.01) == pytest.approx(1.02 + 0.105)
    waiting = make("waiting", budgets, arrival=0.0)
    assert waiting.planning_deadline(delivery_s=0.01) == pytest.approx(0.99)
    # Planned for, a TPOT of reserve before the judge's line, from the same anchor.
    assert late.planning_deadline(delivery_s=0.01) == pytest.approx(1.02 + 0.105 - 0.1)


def test_an_early_first_token_gives_planned_decodes_no_slack_a_client_would_not_count() -> None:
    """The judge's decode clock starts at the TTFT deadline when the first token comes
    early; a client judging the mean TPOT from the first token (vLLM's `bench serve
    --goodput`) counts from the first token. Tokens landing on the planned line pass both."""
    budgets = Budgets(ttft_s=1.0, tpot_s=0.1)
    request = decoding(make("r", budgets, arrival=0.0), first_token_at=0.2)
    assert request.next_deadline(1.05) == pytest.approx(1.0 + 0.105)  # the judge's
    assert request.planning_deadline() == pytest.approx(0.2 + 0.1 - 0.025)
    times = [0.2]
    for _ in range(99):
        times.append(request.planning_deadline())
        request.on_tokens(1, times[-1])
    mean_tpot = (times[-1] - times[0]) / (len(times) - 1)
    assert mean_tpot <= budgets.tpot_s
    assert judge(0.0, times, budgets).met


def test_time_already_waited_moves_every_deadline_earlier() -> None:
    """A request that waited 0.3 s upstream (a gateway, a replica that turned it away)
    arrives here at 10.0 with its SLO clock started at 9.7: its first token is due at
    9.7 + F, and the decode clock starts from that deadline, as the judge counts them from the
    arrival upstream."""
    budgets = Budgets(ttft_s=1.0, tpot_s=0.04, thinking_tpot_s=0.02, thinking_tokens=2)
    request = make("r", budgets, arrival=10.0, already_waited=0.3)
    assert request.arrival == pytest.approx(9.7)
    assert request.ttft_deadline == pytest.approx(10.7)
    assert request.next_deadline() == pytest.approx(10.7)
    assert request.next_deadline(1.05) == pytest.approx(9.7 + 1.05)
    assert request.planning_deadline() == pytest.approx(10.7)
    times: list[float] = []
    for k in range(6):
        due = request.next_deadline()
        t = due - 0.2 if k == 0 else due  # an early first token gives decode no slack
        times.append(t)
        request.on_tokens(1, t)
    # Token 2 is due one thinking TPOT after the TTFT deadline (10.7), not after 11.0.
    assert times[1] == pytest.approx(10.7 + 0.02)
    assert judge(request.slo.origin_time, times, budgets).met
    # Judged from the arrival here instead, the first token would look 0.3 s faster.
    assert judge(10.0, times, budgets).ttft_s == pytest.approx(0.5)
    assert judge(request.slo.origin_time, times, budgets).ttft_s == pytest.approx(0.8)


def test_admission_and_expiry_count_what_a_request_already_waited() -> None:
    """100 tokens take 15 ms to prefill: on time with the full 200 ms budget (210 ms with the
    judge's 5%), hopeless with 11 ms of it left, though the budgets (and the class) are the
    same."""
    policy = SloPolicy(MODEL, SETTINGS, kv_capacity_tokens=100_000)
    assert policy.arrive(5.0, make("fresh", TIGHT, arrival=5.0)).mode is Mode.ADMITTED
    late = make("late", TIGHT, arrival=5.0, already_waited=0.199)
    verdict = policy.arrive(5.0, late)
    assert verdict.rejected and verdict.reason is Reason.COMPUTE and verdict.check == "hopeless"
    assert policy.counters.rejected == {("tight", "COMPUTE"): 1}  # counted in its class
    # Expiry uses the same deadline: admitted with 60 ms left (judge's line at 6.06), it
    # expires once a 15 ms prefill can no longer end before it.
    policy = SloPolicy(MODEL, SETTINGS, kv_capacity_tokens=100_000)
    retried = make("retried", TIGHT, arrival=6.0, already_waited=0.15)
    assert policy.arrive(6.0, retried).mode is Mode.ADMITTED
    assert policy.expire(6.02) == []
    assert [e.request for e in policy.expire(6.05)] == [retried]


def test_prefill_left_counts_recomputation_after_preemption() -> None:
    request = decoding(make("r", TIGHT, prompt=100), first_token_at=0.1, tokens=5)
    assert request.decoding and request.prefill_left == 0
    request.computed_tokens = 0  # preempted: its KV is gone
    assert request.prefill_left == 104 and not request.decoding


# -- planning ------------------------------------------------------------------------------


def test_no_deadline_due_runs_full_steps() -> None:
    planner = StepPlanner(MODEL, SETTINGS)
    waiting = [make(f"w{i}", LOOSE, prompt=1500) for i in range(3)]
    plan = planner.plan(0.0, [], waiting)
    assert plan.tokens == SETTINGS.max_step_tokens
    # w0 completes in this step: the step is bound by its first token's deadline, far away
    assert plan.time_limit_s == pytest.approx(1.0) and plan.predicted_s < 1.0
    planner.limits.max_step_s = math.inf
    assert math.isinf(planner.plan(0.0, [], [make("w", LOOSE, prompt=5000)]).time_limit_s)


def test_a_completing_prefill_shortens_the_step_to_its_ttft() -> None:
    planner = StepPlanner(MODEL, SETTINGS)
    long = make("long", Budgets(ttft_s=0.5, tpot_s=0.04), prompt=1800)
    short = make("short", Budgets(ttft_s=0.05, tpot_s=0.04), prompt=100)
    plan = planner.plan(0.0, [], [long, short])
    # short (due in 50 ms) goes first and completes, so the step ends within 50 ms: 450 tokens
    assert plan.prefills == [("short", 100), ("long", 350)]
    assert plan.predicted_s <= 0.05 + 1e-9


def test_the_policy_caps_steps_at_the_wait_the_tightest_recent_request_could_bear() -> None:
    policy = SloPolicy(MODEL, SETTINGS, kv_capacity_tokens=1_000_000)
    # 4,000 tokens prefill alone in two steps, 5 ms + 204.8 ms and 5 ms + 195.2 ms: of its
    # 2 s budget, 1.59 s could go to waiting for a step to end; steps may last 1.5 x that.
    policy.arrive(0.0, make("a", Budgets(ttft_s=2.0, tpot_s=0.05), prompt=4000))
    assert policy.limits.max_step_s == pytest.approx((2.0 - 0.41) * BEARABLE_STRETCH)
    # 10 tokens prefill in 6 ms of a 60 ms budget: 54 ms to bear.
    policy.arrive(0.0, make("b", Budgets(ttft_s=0.06, tpot_s=0.05), prompt=10))
    cap = 0.054 * BEARABLE_STRETCH
    assert policy.limits.max_step_s == pytest.approx(cap)
    plan = policy.plan(0.0, [], [policy.requests["a"]])
    assert plan.predicted_s <= cap + 1e-9 and plan.tokens == math.floor((cap - 0.005) / 0.0001)


def test_a_prompt_that_needs_longer_steps_than_the_cap_gets_them() -> None:
    """In steps of the cap (81 ms: 760 tokens), 3,000 tokens take 4 steps, 320 ms; with
    315 ms left, 3 steps of 1,000 tokens (105 ms each) are the fewest that end in time."""
    planner = StepPlanner(MODEL, SETTINGS)
    planner.limits.max_step_s = 0.081
    prompt = make("p", Budgets(ttft_s=2.0, tpot_s=0.05), prompt=3000)
    plan = planner.plan(0.0, [], [prompt])
    assert plan.tokens == 760  # plenty of time: the cap holds
    plan = planner.plan(2.0 - 0.315, [], [prompt])
    assert plan.tokens == 1000 and plan.predicted_s == pytest.approx(0.105)
    # With no way to end in time even in one step, it keeps the cap: the requests still to
    # come are not spent on a first token that is late whatever happens.
    plan = planner.plan(2.0 - 0.2, [], [prompt])
    assert plan.tokens == 760


def test_stretched_cap_is_the_fewest_equal_steps_that_end_in_time() -> None:
    # c0 = 5 ms a step, c1 = 0.1 ms a token.
    assert stretched_cap_s(0.081, 3000, 1.0, 0.005, 0.0001) == 0.081  # in time capped
    assert stretched_cap_s(0.081, 3000, 0.315, 0.005, 0.0001) == pytest.approx(0.105)
    assert stretched_cap_s(0.081, 3000, 0.3, 0.005, 0.0001) == 0.081  # hopeless: no stretch
    assert stretched_cap_s(math.inf, 3000, 0.3, 0.005, 0.0001) == math.inf


def test_requests_not_admitted_leave_the_step_cap_alone() -> None:
    """An impossible TTFT is turned away (or served as best effort); it must not shrink the
    steps of everyone else, nor stall the engine."""
    policy = SloPolicy(MODEL, SETTINGS, kv_capacity_tokens=1_000_000)
    policy.arrive(0.0, make("a", Budgets(ttft_s=2.0, tpot_s=0.05), prompt=4000))
    hopeless = Budgets(ttft_s=0.0001, tpot_s=0.5)
    assert policy.arrive(0.0, make("no", hopeless, prompt=200)).rejected
    verdict = policy.arrive(0.0, make("be", hopeless, prompt=200, best_effort_ok=True))
    assert verdict.mode is Mode.BEST_EFFORT
    assert policy.limits.max_step_s == pytest.approx((2.0 - 0.41) * BEARABLE_STRETCH)


def test_a_step_never_plans_nothing_while_work_waits() -> None:
    planner = StepPlanner(MODEL, SETTINGS)
    planner.limits.max_step_s = 1e-6  # shorter than any step: the budget rounds to zero
    best_effort = make("be", LOOSE, prompt=200, best_effort_ok=True)
    best_effort.demote(Reason.COMPUTE)
    plan = planner.plan(0.0, [], [best_effort])
    assert plan.prefills == [("be", 16)]
    decoding(best_effort, first_token_at=0.1)
    plan = planner.plan(0.2, [best_effort], [])
    assert plan.decodes == ["be"] and plan.skipped == []


def test_a_prompt_that_must_run_whole_waits_for_room_or_rides_along_if_small() -> None:
    planner = StepPlanner(MODEL, SETTINGS)
    planner.limits.max_step_s = 0.00655  # 5 ms + 0.1 ms per token: 15 tokens fit
    whole = [make(f"w{i}", LOOSE, prompt=12) for i in range(2)]
    big = make("big", LOOSE, prompt=100)
    for request in (*whole, big):
        request.split_prefill = False
    split = make("split", LOOSE, prompt=100)
    plan = planner.plan(0.0, [], [big, split])
    assert plan.prefills == [("split", 15)]  # the whole 100 waits; the other is split
    plan = planner.plan(0.0, [], [*whole, split])
    assert plan.prefills == [("w0", 12), ("w1", 12)]  # w0 fits, w1 rides along over budget
    planner.limits.max_step_s = 0.00525  # 2 tokens fit
    plan = planner.plan(0.0, [], [*whole, split])
    assert plan.prefills == [("w0", 12)]  # one small whole prompt rides along, not two


def test_step_ends_before_the_earliest_due_decode() -> None:
    planner = StepPlanner(MODEL, SETTINGS)
    now = 0.98
    busy = decoding(make("d", TIGHT, arrival=0.79), first_token_at=0.98)
    # planned for: the client's line (its first token + 10 ms) less a quarter TPOT, earlier
    # than the judge's (0.99 + 1.05 * 10 ms, less one TPOT of reserve: 0.9905)
    assert busy.planning_deadline() == pytest.approx(0.9875)
    slack = busy.planning_deadline() - now
    waiting = [make("w", LOOSE, arrival=0.9, prompt=2000)]
    plan = planner.plan(now, [busy], waiting)
    assert plan.decodes == ["d"]
    assert plan.predicted_s <= slack + 1e-9
    # and it is as long as the slack allows: one more token would overrun
    one_more = MODEL.predict(StepShape(tokens=plan.tokens + 1, requests=2, context_tokens=0))
    assert one_more > slack


def test_prefills_go_earliest_deadline_first() -> None:
    planner = StepPlanner(MODEL, SETTINGS)
    late = make("late", LOOSE, arrival=0.0, prompt=3000)
    soon = make("soon", TIGHT, arrival=0.5, prompt=300)  # arrived later, due earlier
    plan = planner.plan(0.6, [], [late, soon])
    assert [request_id for request_id, _ in plan.prefills] == ["soon", "late"]
    assert plan.prefills[0][1] == 300


def test_decodes_far_ahead_sit_out_while_prefill_waits() -> None:
    planner = StepPlanner(MODEL, SETTINGS)
    due = decoding(make("due", TIGHT, arrival=0.0), first_token_at=0.2)  # next at 0.21
    # six tokens out at once: its next is due at 0.1 + 6 * 40 ms less a quarter TPOT, 0.33
    ahead = decoding(make("ahead", LOOSE, arrival=0.0), first_token_at=0.1, tokens=6)
    plan = planner.plan(0.2, [due, ahead], [make("w", TIGHT, arrival=0.19)])
    assert plan.decodes == ["due"] and plan.skipped == ["ahead"]
    # with no prefill waiting, nobody sits out
    assert planner.plan(0.2, [due, ahead], []).decodes == ["due", "ahead"]


def test_best_effort_gets_only_what_slo_work_leaves() -> None:
    planner = StepPlanner(MODEL, SETTINGS)
    slo = make("slo", TIGHT, arrival=0.0, prompt=5000)
    best = make("be", LOOSE, arrival=0.0, prompt=500)
    best.demote(Reason.COMPUTE)
    plan = planner.plan(0.0, [], [best, slo])
    assert plan.prefills == [("slo", SETTINGS.max_step_tokens)]


def test_best_effort_decodes_fit_the_step_at_their_context_cost() -> None:
    """A decode costs its context, not just its token: best effort fills only the time the
    step has left before the earliest due SLO decode, counted at full cost."""
    model = StepTimeModel(pieces=[(0.005, 0.0001, 0.0, 0.000002)])  # + 2 us a context token
    planner = StepPlanner(model, SETTINGS)
    now = 0.98
    busy = decoding(make("d", TIGHT, arrival=0.79, prompt=100), first_token_at=0.98)
    slack = busy.planning_deadline() - now  # 7.5 ms

    def best_effort(request_id: str, prompt: int) -> SloRequest:
        request = make(request_id, LOOSE, prompt=prompt)
        request.demote(Reason.COMPUTE)
        return decoding(request, first_token_at=0.5)

    # The SLO decode takes 5.3 ms; each best-effort decode over 1,000 tokens takes 2.1 ms:
    # one fits the 7.5 ms. Counted as tokens alone, all ten did (26 ms, 3.5x the slack).
    long_context = [best_effort(f"b{i}", prompt=1000) for i in range(10)]
    plan = planner.plan(now, [busy, *long_context], [])
    assert plan.decodes == ["d", "b0"]
    assert plan.skipped == [f"b{i}" for i in range(1, 10)]
    assert plan.predicted_s <= slack
    # Short contexts cost little: all ten ride along.
    short_context = [best_effort(f"s{i}", prompt=10) for i in range(10)]
    plan = planner.plan(now, [busy, *short_context], [])
    assert len(plan.decodes) == 11 and plan.predicted_s <= slack


def test_best_effort_prefill_fits_the_step_at_its_context_cost() -> None:
    model = StepTimeModel(pieces=[(0.005, 0.0001, 0.0, 0.000002)])
    planner = StepPlanner(model, SETTINGS)
    now = 0.98
    busy = decoding(make("d", TIGHT, arrival=0.79, prompt=100), first_token_at=0.98)
    slack = busy.planning_deadline() - now
    resumed = make("be", LOOSE, prompt=3000)  # best effort, 500 of its prompt done
    resumed.demote(Reason.COMPUTE)
    resumed.computed_tokens = 500
    plan = planner.plan(now, [busy], [resumed])
    ((request_id, tokens),) = plan.prefills
    # 2.2 ms left: 500 tokens of context take 1 ms, each new token 0.102 ms: 11 tokens.
    assert request_id == "be" and tokens == 11
    assert plan.predicted_s <= slack


# -- admission -----------------------------------------------------------------------------


def controller(kv_tokens: int = 1_000_000) -> AdmissionController:
    return AdmissionController(MODEL, SETTINGS, kv_tokens)


def test_admits_when_idle_and_rejects_an_impossible_ttft() -> None:
    admission = controller()
    assert admission.decide(0.0, make("ok", TIGHT), []).mode is Mode.ADMITTED
    # 2,000 tokens take at least 5 ms + 200 ms of compute: more than a 100 ms TTFT
    hopeless = make("no", Budgets(ttft_s=0.1, tpot_s=0.01), prompt=2000)
    verdict = admission.decide(0.0, hopeless, [])
    assert verdict.rejected and verdict.reason is Reason.COMPUTE and verdict.check == "hopeless"


def test_best_effort_instead_of_rejection_when_allowed() -> None:
    hopeless = make("no", Budgets(ttft_s=0.1, tpot_s=0.01), prompt=2000, best_effort_ok=True)
    verdict = controller().decide(0.0, hopeless, [])
    assert verdict.mode is Mode.BEST_EFFORT and verdict.reason is Reason.COMPUTE


def test_a_newcomer_may_not_make_an_admitted_request_late() -> None:
    admission = controller()
    # Admitted: a 1,500-token prompt due in 200 ms: about 155 ms of compute alone.
    first = make("first", Budgets(ttft_s=0.2, tpot_s=0.05), prompt=1500)
    assert admission.decide(0.0, first, []).mode is Mode.ADMITTED
    # A newcomer due sooner goes first in EDF order and would push `first` past its deadline
    # by about 75 ms, more than a quarter of its budget: turned away.
    pushy = make("pushy", Budgets(ttft_s=0.15, tpot_s=0.05), prompt=1200)
    verdict = admission.decide(0.0, pushy, [first])
    assert verdict.rejected and verdict.reason is Reason.COMPUTE and verdict.check == "others"
    # A smaller one makes `first` late by less than a quarter of its budget (the forecast's
    # pessimism): admitted.
    small = make("small", Budgets(ttft_s=0.15, tpot_s=0.05), prompt=600)
    assert admission.decide(0.0, small, [first]).mode is Mode.ADMITTED
    # The allowance is `first`'s in all: a second such newcomer would push it past it.
    again = make("again", Budgets(ttft_s=0.15, tpot_s=0.05), prompt=600)
    verdict = admission.decide(0.0, again, [first, small])
    assert verdict.rejected and verdict.check == "others"
    # The same newcomer with a later deadline than `first` fits behind it.
    patient = make("patient", Budgets(ttft_s=0.5, tpot_s=0.05), prompt=600)
    assert admission.decide(0.0, patient, [first]).mode is Mode.ADMITTED


def _late_requests(
    admission: AdmissionController, now: float, batch: _DecodeBatch, queue: list[SloRequest]
) -> dict[str, float] | None:
    """The requests of `queue` the forecast has late, by how much (s); None when the decode
    batch cannot keep its TPOT."""
    lateness = admission._forecast(now, batch, queue)
    if lateness is None:
        return None
    return {request_id: late for request_id, late in lateness.items() if late > 0}


def test_admission_counts_on_decode_slack_for_long_steps() -> None:
    admission = controller()
    # A decode 300 ms ahead of schedule lets the planner run full steps for a while: a
    # 2,000-token prompt due in 250 ms is on time (about 210 ms of compute) ...
    # (31 tokens out at once: its next is due at 31 * 10 ms, less a quarter TPOT)
    ahead = decoding(make("ahead", TIGHT, max_tokens=100), first_token_at=0.0, tokens=31)
    prompt = make("p", Budgets(ttft_s=0.25, tpot_s=0.05), prompt=2000)
    ahead_batch = _DecodeBatch(admission._decoders(0.0, [ahead]))
    assert _late_requests(admission, 0.0, ahead_batch, [prompt]) == {}
    # ... but not alongside a decode with no slack, whose 10 ms steps leave 50 tokens each.
    pressed = decoding(make("pressed", TIGHT, arrival=-0.5), first_token_at=-0.3)
    pressed.on_tokens(29, -0.01)  # next token due at -0.3 + 30 * 10 ms = 0.0
    pressed_batch = _DecodeBatch(admission._decoders(0.0, [pressed]))
    late = _late_requests(admission, 0.0, pressed_batch, [prompt])
    assert late is not None and list(late) == ["p"]
    # Late because of the decode beside it, with nothing queued ahead: admitted, the
    # simulation being pessimistic (expiry demotes it if it really falls behind).
    assert admission.decide(0.0, prompt, [pressed]).mode is Mode.ADMITTED
    # Queued behind two more prompts due first, it would be later by far more than a quarter
    # of its budget: the queue is real, so it is turned away.
    queued = [make(f"q{i}", Budgets(ttft_s=0.2, tpot_s=0.05), prompt=1000) for i in range(2)]
    verdict = admission.decide(0.0, prompt, [pressed, *queued])
    assert verdict.reason is Reason.COMPUTE and verdict.check == "queue"
    # A queue that delays it a little (a one-token prompt) does not.
    small = [make("q", Budgets(ttft_s=0.2, tpot_s=0.05), prompt=1)]
    late_alone = _late_requests(
        admission, 0.0, _DecodeBatch(admission._decoders(0.0, [pressed])), [prompt]
    )
    late_queued = _late_requests(
        admission, 0.0, _DecodeBatch(admission._decoders(0.0, [pressed])), [*small, prompt]
    )
    assert late_alone is not None and late_queued is not None
    assert 0 < late_queued["p"] - late_alone["p"] <= QUEUE_LATE_ALLOWANCE * 0.25
    assert admission.decide(0.0, prompt, [pressed, *small]).mode is Mode.ADMITTED


def measured(admission: AdmissionController, error: float) -> AdmissionController:
    """`admission` once it has seen enough first tokens come `error` TTFT budgets later
    than it forecast them, just now."""
    for _ in range(FORECAST_ERROR_MIN_SAMPLES):
        admission.errors.pooled.observe(0.0, error)
    return admission


def test_forecast_errors_answer_a_high_quantile_once_enough_recent_ones_are_known() -> None:
    errors = ForecastErrors(window=10, quantile=0.9, min_samples=5, max_age_s=30.0)
    for error in (0.0, 0.1, 0.2, 0.3):
        errors.observe(0.0, error)
    assert errors.quantile(0.0) is None  # 4 samples: not enough yet
    errors.observe(0.0, 0.4)
    assert errors.quantile(0.0) == pytest.approx(0.4)
    for _ in range(10):  # the window keeps the last 10: the old errors are gone
        errors.observe(1.0, -0.2)
    assert len(errors) == 10 and errors.quantile(1.0) == pytest.approx(-0.2)
    # Errors age out: 31 s on, nothing is known again.
    assert errors.quantile(31.5) is None


def test_allowance_is_what_the_measured_forecast_error_leaves() -> None:
    request = make("r", Budgets(ttft_s=0.2, tpot_s=0.05))
    # Unmeasured, the forecast is taken for pessimistic: a quarter of a budget late is fine.
    assert controller().allowance_s(0.0, request) == pytest.approx(QUEUE_LATE_ALLOWANCE * 0.2)
    # First tokens measured 0.4 budgets later than forecast: a forecast must now be 0.4
    # budgets early to be on time.
    assert measured(controller(), 0.4).allowance_s(0.0, request) == pytest.approx(-0.08)
    # A forecast measured pessimistic never earns more than the default allowance.
    assert measured(controller(), -0.6).allowance_s(0.0, request) == pytest.approx(0.05)
    # A margin learned in a burst does not outlive it: 30 s on, the errors are gone.
    assert measured(controller(), 0.4).allowance_s(31.0, request) == pytest.approx(0.05)


def test_a_length_group_with_errors_of_its_own_is_held_to_them() -> None:
    """One step of forecast error is a large part of a short TTFT budget and a small part of
    a long one: a class with errors of its own is held to those, the others to all pooled."""
    errors = GroupedForecastErrors(max_groups=2)
    for _ in range(FORECAST_ERROR_MIN_SAMPLES):
        errors.observe("short", 0.0, 0.4)
    for _ in range(FORECAST_ERROR_MIN_SAMPLES):
        errors.observe("long", 0.0, -0.1)
    assert errors.quantile("short", 0.0) == pytest.approx(0.4)
    assert errors.quantile("long", 0.0) == pytest.approx(-0.1)
    pooled = errors.pooled.quantile(0.0)
    assert errors.quantile("new", 0.0) == pooled  # too few of its own
    errors.observe("third", 0.0, 0.0)  # past max_groups: the least recently observed goes
    assert errors.quantile("short", 0.0) == errors.pooled.quantile(0.0)
    assert errors.quantile("long", 0.0) == pytest.approx(-0.1)


def test_a_forecast_measured_optimistic_admits_only_with_a_margin() -> None:
    # The cases admitted above by the allowance, once first tokens have been seen to come a
    # tenth of a TTFT budget later than forecast.
    pressed = decoding(make("pressed", TIGHT, arrival=-0.5), first_token_at=-0.3)
    pressed.on_tokens(29, -0.01)
    prompt = make("p", Budgets(ttft_s=0.25, tpot_s=0.05), prompt=2000)
    # Late beside the decode batch alone: no longer taken for the forecast's pessimism.
    assert controller().decide(0.0, prompt, [pressed]).mode is Mode.ADMITTED
    verdict = measured(controller(), 0.1).decide(0.0, prompt, [pressed])
    assert verdict.rejected and verdict.check == "late"
    # A newcomer pushing an admitted request a little past its deadline (within the
    # default allowance) now makes it late.
    first = make("first", Budgets(ttft_s=0.2, tpot_s=0.05), prompt=1500)
    small = make("small", Budgets(ttft_s=0.15, tpot_s=0.05), prompt=600)
    assert controller().decide(0.0, small, [first]).mode is Mode.ADMITTED
    verdict = measured(controller(), 0.1).decide(0.0, small, [first])
    assert verdict.rejected and verdict.check == "others"
    # `first` alone is forecast at 155 ms for a 210 ms line: 55 ms early, enough for an
    # error of 0.1 of its 200 ms budget (20 ms), not for one of 0.4 (80 ms).
    assert measured(controller(), 0.1).decide(0.0, first, []).mode is Mode.ADMITTED
    verdict = measured(controller(), 0.4).decide(0.0, first, [])
    assert verdict.rejected and verdict.check == "late"
    # A 100-token newcomer due sooner delays `first` by 15 ms, to 40 ms early: within a
    # margin of 20 ms, so admitted; past one of 50 ms, so not.
    tiny = make("tiny", Budgets(ttft_s=0.15, tpot_s=0.05), prompt=100)
    assert measured(controller(), 0.1).decide(0.0, tiny, [first]).mode is Mode.ADMITTED
    verdict = measured(controller(), 0.25).decide(0.0, tiny, [first])
    assert verdict.rejected and verdict.check == "others"
    # With a margin of 60 ms `first` is at risk already (admitted when the error was
    # smaller): a newcomer may not delay it at all, though it stays before its deadline.
    verdict = measured(controller(), 0.3).decide(0.0, tiny, [first])
    assert verdict.rejected and verdict.check == "others"
    assert measured(controller(), -0.3).decide(0.0, tiny, [first]).mode is Mode.ADMITTED


def test_policy_measures_the_forecast_error_on_first_tokens() -> None:
    policy = SloPolicy(MODEL, SETTINGS, kv_capacity_tokens=100_000)
    # Idle: a 100-token prompt is forecast to be done 15 ms after its arrival.
    on_time = make("a", TIGHT, arrival=0.0, prompt=100)
    assert policy.arrive(0.0, on_time).mode is Mode.ADMITTED
    assert policy.admission.waiting_for_first_token() == ["a"]
    on_time.computed_tokens = 100
    on_time.on_tokens(1, 0.055)  # 40 ms later than forecast
    policy.expire(0.06)
    assert policy.admission.waiting_for_first_token() == []
    policy.finish("a", completed=True)
    # One that expires waiting counts a miss: at least what serving it then would take.
    missed = make("b", TIGHT, arrival=0.0, prompt=100)
    assert policy.arrive(0.0, missed).mode is Mode.ADMITTED
    (expiry,) = policy.expire(0.205)
    assert expiry.request is missed
    # An admitted request that leaves before its first token teaches nothing.
    gone = make("c", TIGHT, arrival=0.3, prompt=100)
    policy.arrive(0.3, gone)
    policy.finish("c", completed=False)
    assert policy.admission.waiting_for_first_token() == []
    errors = policy.admission.errors.pooled
    assert len(errors) == 2
    # (55 ms - 15 ms) / 200 ms; the miss: (0.205 s + 15 ms of prefill - 15 ms) / 200 ms.
    assert sorted(error for _, error in errors._samples) == pytest.approx([0.2, 1.025])


def test_decode_batch_that_cannot_keep_its_tpot_is_refused() -> None:
    admission = controller()
    # A step of n decodes takes 5 ms + 0.1 ms * n. A 10 ms TPOT is judged at 10.5 ms (§2):
    # 55 decodes fit, 56 do not; 51 (10.1 ms) still keep their streams on time. The streams
    # got their first token right at their TTFT deadline: no lead to spend on slow steps.
    running = [decoding(make(f"d{i}", TIGHT, arrival=-0.2), first_token_at=0.0) for i in range(55)]
    verdict = admission.decide(0.0, make("one-more", TIGHT, arrival=0.0), running)
    assert verdict.rejected and verdict.reason is Reason.COMPUTE and verdict.check == "tpot"
    assert admission.decide(0.0, make("one", TIGHT), running[:50]).mode is Mode.ADMITTED
    # Streams 150 ms ahead of their line (15 tokens out at once) can spend that lead on steps
    # 0.1 ms too slow for the rest of their 50 tokens: the 56th is admitted. (A first token
    # early by as much is no lead: the client counts the mean TPOT from it.)
    ahead = [
        decoding(make(f"a{i}", TIGHT, arrival=-0.05), first_token_at=0.0, tokens=15)
        for i in range(55)
    ]
    assert admission.decide(0.0, make("one-more", TIGHT, arrival=0.0), ahead).mode is Mode.ADMITTED


def test_memory_bound_uses_learned_output_lengths() -> None:
    admission = controller(kv_tokens=10_000)
    held = [make(f"h{i}", LOOSE, prompt=1000, max_tokens=1000) for i in range(4)]  # 8,000
    big = make("big", LOOSE, prompt=1000, max_tokens=1500)  # 2,500 more: over
    verdict = admission.decide(0.0, big, held)
    assert verdict.rejected and verdict.reason is Reason.MEMORY
    for _ in range(50):  # the class turns out to stop after ~100 tokens
        admission.lengths.observe("loose", 100)
    assert admission.decide(0.0, big, held).mode is Mode.ADMITTED


def test_a_class_with_no_known_lengths_counts_what_its_requests_write() -> None:
    # A burst of a class never seen, each request capped at 16k tokens: counting the cap, the
    # KV cache would hold three; what is known of every class's lengths (and what each stream
    # has written, twice over) counts instead, until the class's own lengths are known.
    admission = controller(kv_tokens=60_000)
    for _ in range(50):
        admission.lengths.observe("loose", 400)  # another class's lengths are known
    burst = [make(f"r{i}", TIGHT, prompt=200, max_tokens=16_384) for i in range(20)]
    assert admission.kv_tokens(burst[0]) == 200 + 400
    decoding(burst[0], 0.1, tokens=3_000)
    assert admission.kv_tokens(burst[0]) == 200 + 6_000  # twice what it has written
    held: list[SloRequest] = []
    for request in burst[1:]:
        verdict = admission.decide(0.0, request, held)
        assert verdict.reason is not Reason.MEMORY
        held.append(request)

    def memory(request: SloRequest) -> Reason:
        return admission._memory(admission.kv_tokens(request), admission.load(0.0, held))

    assert memory(burst[0]) is Reason.NONE  # 19 x 600 + 6,200
    for _ in range(50):  # the class's own lengths, once known, replace the estimate
        admission.lengths.observe("tight", 16_000)
    assert admission.kv_tokens(burst[1]) == 200 + 16_000
    assert memory(burst[0]) is Reason.MEMORY


def test_with_no_lengths_known_at_all_a_request_counts_its_cap() -> None:
    admission = controller(kv_tokens=10_000)
    assert admission.kv_tokens(make("r", TIGHT, prompt=200, max_tokens=4_000)) == 4_200


def test_best_effort_requests_do_not_hold_memory() -> None:
    admission = controller(kv_tokens=3_000)
    hog = make("hog", LOOSE, prompt=2000, max_tokens=500)
    hog.demote(Reason.COMPUTE)
    assert admission.decide(0.0, make("new", LOOSE, prompt=1000, max_tokens=500), [hog]).mode is (
        Mode.ADMITTED
    )


def test_output_lengths_quantile() -> None:
    lengths = OutputLengths(window=100, quantile=0.9, min_samples=10)
    assert lengths.expected("c", 500) == 500  # nothing learned yet: max_tokens
    for n in range(1, 201):  # the window keeps 101..200
        lengths.observe("c", n)
    assert lengths.expected("c", 500) == 190
    assert lengths.expected("c", 150) == 150
    assert not lengths.known("d") and lengths.expected("d", 500) == 500
    for n in range(1, 21):
        lengths.observe("d", 1000 + n)
    # every group's last 100 together, c's 121..200 and d's 1001..1020: the 90th is d's 1010
    assert lengths.known("d") and lengths.expected_of_any(5000) == 1010
    assert lengths.expected("c", 500) == 190  # each group's own stay its own


def test_explicit_budgets_learn_output_lengths_per_budget_shape() -> None:
    """Requests without a class are grouped by tenant and TPOT budgets: short answers sent
    with loose budgets do not shorten the expected length of long ones sent with tight
    budgets, as they did when every explicit-budget request was pooled."""
    policy = SloPolicy(MODEL, SETTINGS, kv_capacity_tokens=1_000_000)

    def finish_explicit(request_id: str, budgets: Budgets, tokens: int, tenant: str = "") -> None:
        slo = RequestSlo(request_id, "", budgets, False, 0.0, tenant=tenant)
        request = decoding(SloRequest(request_id, slo, 10, max_tokens=5000), 0.0, tokens)
        policy.requests[request_id] = request
        policy.finish(request_id, completed=True)

    for i in range(30):
        finish_explicit(f"short{i}", LOOSE, 20)
        finish_explicit(f"long{i}", TIGHT, 1500)
    loose, tight = (RequestSlo("x", "", b, False, 0.0).length_group for b in (LOOSE, TIGHT))
    assert loose != tight
    assert policy.lengths.expected(loose, 5000) == 20
    assert policy.lengths.expected(tight, 5000) == 1500
    other_tenant = RequestSlo("x", "", TIGHT, False, 0.0, tenant="b").length_group
    assert policy.lengths.expected(other_tenant, 5000) == 5000  # nothing learned: max_tokens
    # A class keeps its own group, whatever its budgets.
    assert RequestSlo("x", "chat", TIGHT, False, 0.0).length_group == "chat"


# -- expiry --------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_expiry_demotes_or_aborts(strict: bool) -> None:
    policy = SloPolicy(MODEL, SETTINGS, kv_capacity_tokens=100_000)
    request = make("r", TIGHT, arrival=0.0, prompt=100, strict=strict)
    assert policy.arrive(0.0, request).mode is Mode.ADMITTED
    assert policy.expire(0.1) == []  # 100 ms to spare for a 15 ms prefill
    (expiry,) = policy.expire(0.205)  # past the 200 ms TTFT budget
    assert expiry.request is request and expiry.abort is strict
    assert request.mode is Mode.BEST_EFFORT and request.reason is Reason.EXPIRED
    assert policy.expire(0.3) == []  # once only
    action = "aborted" if strict else "demoted"
    assert policy.counters.expired == {("tight", action): 1}


def test_policy_counts_verdicts_and_learns_lengths() -> None:
    policy = SloPolicy(MODEL, SETTINGS, kv_capacity_tokens=100_000)
    policy.arrive(0.0, make("a", TIGHT))
    policy.arrive(0.0, make("b", Budgets(0.01, 0.01), prompt=2000, class_name="tight"))
    assert policy.counters.admitted == {"tight": 1}
    assert policy.counters.rejected == {("tight", "COMPUTE"): 1}
    assert set(policy.requests) == {"a"}
    policy.requests["a"].on_tokens(7, 0.1)
    policy.finish("a", completed=True)
    assert policy.requests == {}

"""`sloserve bench scheduler`: sloserve's scheduler and vLLM's own timed in the real loop, on a
virtual clock (tiny loads; the figures come from the benchmark command, not from tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from sloserve.bench import callgrind
from sloserve.bench.scheduler_loop import VIRTUAL_EPOCH, LoopConfig, SchedulerLoop, VirtualClock
from sloserve.replica.scheduler import SloPolicyMixin
from sloserve.slo import Budgets, RequestSlo
from sloserve.stepmodel import StepShape, shipped_profile


def test_cli_times_both_schedulers_at_every_load(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "scheduler"
    done = subprocess.run(
        [sys.executable, "-m", "sloserve", "bench", "scheduler", "--running", "8,16",
         "--steps", "50", "--warmup", "2", "--model", str(tiny_model), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    payload = json.loads((out / "results.json").read_text())
    assert payload["mode"] == "timing" and payload["profile"].startswith("gpu-")
    assert [load["running"] for load in payload["loads"]] == [8, 16]
    for load in payload["loads"]:
        costs = {c["scheduler"]: c for c in load["schedulers"]}
        assert set(costs) == {"sloserve-async", "vllm-async"}
        for cost in costs.values():
            assert cost["steps"] == 50 and cost["arrivals"] > 0
            for clock in ("step_ms", "step_cpu_ms"):  # wall time, and CPU time
                quantiles = cost[clock]
                assert 0 < quantiles["p50"] <= quantiles["p99"] <= quantiles["max"]
            assert cost["running_mean"] > 0 and cost["engine_s"] > 0
        # sloserve's own parts, and its verdicts; the pair's difference.
        assert "planner" in costs["sloserve-async"]["parts_ms"]
        assert costs["sloserve-async"]["verdicts"]["admitted"] > 0
        assert set(load["extra"]["sloserve-async"]) == {
            "minus_vllm_ms", "over_vllm", "cpu_minus_vllm_ms", "cpu_over_vllm",
        }  # fmt: skip
    summary = (out / "summary.md").read_text()
    assert "| 8 | sloserve-async |" in summary and "| 16 | vllm-async |" in summary


def test_the_scheduler_reads_the_loops_virtual_clock(tiny_model: Path) -> None:
    model = shipped_profile("cpu-bench")
    clock = VirtualClock(model)
    loop = SchedulerLoop(
        LoopConfig(model=tiny_model, kv_tokens=4096, async_scheduling=True,
                   profile=model.to_json()),
        clock,
    )  # fmt: skip
    scheduler = loop.scheduler
    assert isinstance(scheduler, SloPolicyMixin) and scheduler.slo_policy is not None
    slo = RequestSlo("a", "chat", Budgets(ttft_s=5.0, tpot_s=1.0), True, loop.now())
    loop.add([loop.request("a", 100, 4, slo)])
    tracked = scheduler.slo_policy.requests["a"]
    for _ in range(50):
        if not scheduler.has_requests():
            break
        loop.step()
    loop.drain()
    assert loop.finished == 1
    # The first step (the whole prompt) took the profile's time, and the scheduler saw the
    # first token come then, on the virtual clock, not the wall clock.
    first_step = model.predict(StepShape(tokens=100, requests=1, context_tokens=100))
    assert tracked.first_token_at is not None
    assert tracked.first_token_at - VIRTUAL_EPOCH >= first_step
    assert tracked.first_token_at <= clock.now < VIRTUAL_EPOCH + 60
    # A loop without a clock, and its scheduler, see the wall clock as before.
    plain = SchedulerLoop(LoopConfig(model=tiny_model, kv_tokens=4096))
    assert abs(plain.now() - time.time()) < 60


def test_region_counts_read_callgrinds_listing(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    out.write_text("events: Ir\nsummary: 1500\ntotals: 1500\n")
    listing = "\n".join(
        [
            "1,500 (100.0%)  PROGRAM TOTALS",
            "1,200 (80.00%)  ./Python/clinic/sysmodule.c.h:sys_call_tracing [libpython3.11.so]",
            "1,190 (79.33%)  ./Python/sysmodule.c:sys_call_tracing",
            "300 (20.00%)  Python/context.c:context_run'2 [libpython3.11.so]",
            "50 (3.33%)  Python/ceval.c:_PyEval_EvalFrameDefault",
        ]
    )
    counts = callgrind.region_counts(out, listing)
    assert counts == {"total": 1500, "sys_call_tracing": 1200, "context_run": 300}

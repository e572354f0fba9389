"""`sloserve bench scheduler`: the command around scheduler_cost.py.

Three ways to run it:
- timing (the default): each scheduler's admission + schedule() per step, in milliseconds,
  with sloserve's scheduler broken down part by part;
- `--cprofile`: where sloserve's time goes, function by function (timings inflated);
- `--callgrind`: instructions per step, each scheduler in a process of its own under valgrind
  (this command again, with `--callgrind-child`): the stable comparison on a noisy machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import vllm

from sloserve.bench import callgrind, report
from sloserve.bench.scheduler_cost import (
    DEFAULT_LOADS,
    KV_TOKENS,
    MAX_MODEL_LEN,
    MAX_NUM_BATCHED_TOKENS,
    MAX_NUM_SEQS,
    PAIRS,
    SCHEDULERS,
    SLOSERVE_ASYNC,
    VLLM_ASYNC,
    LoadResult,
    default_profile_name,
    measure_load,
    step_overhead_s,
)
from sloserve.bench.scheduler_loop import Meter, unmetered
from sloserve.machine import cpu_description
from sloserve.stepmodel import StepTimeModel, shipped_profile

_T = TypeVar("_T")

DEFAULT_MODEL = Path(".models/tiny")
DEFAULT_STEPS = 300
DEFAULT_WARMUP = 200
# The async pair is what a GPU engine runs (vLLM turns async scheduling on where it can); the
# sync pair doubles the run's time at 1,024 in flight, so it is measured when asked for.
DEFAULT_SCHEDULERS = (SLOSERVE_ASYNC, VLLM_ASYNC)
# Under valgrind a step runs some 50x slower: fewer steps, at one load.
CALLGRIND_STEPS = 100
CALLGRIND_LOADS = (256,)
# The targets for sloserve's p99 per step (admission + schedule()), ms, by load.
TARGETS_MS = {256: 1.0, 1024: 3.0}

DESCRIPTION = """\
Times the SLO scheduler's whole cost per engine step (admission of the step's arrivals and
schedule(): expiry, planning, the glue, vLLM's own schedule()) beside vLLM's own scheduler,
in the real scheduler loop (sloserve/bench/scheduler_loop.py), at steady loads of requests in
flight, alternating the schedulers step by step. Steps take the time the GPU profile predicts
(and its host time per step), on a virtual clock. Writes results.json and summary.md to --out.

Instruction counts (deterministic; valgrind must be installed), e.g.:
  sloserve bench scheduler --callgrind --out out/scheduler-callgrind
runs each scheduler under callgrind at 256 in flight for 100 steps (--running, --steps).
Function by function, where sloserve's time goes:
  sloserve bench scheduler --cprofile --running 256,1024 --steps 300 --out out/scheduler-cprofile
"""


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser(
        "scheduler",
        help="the SLO scheduler's cost per step beside vLLM's own, in the real loop",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--running",
        help="comma-separated requests in flight to measure at (default: "
        f"{','.join(map(str, DEFAULT_LOADS))}; with --callgrind, "
        f"{','.join(map(str, CALLGRIND_LOADS))})",
    )
    p.add_argument(
        "--steps",
        type=int,
        help=f"timed steps per load (default: {DEFAULT_STEPS}; with --callgrind, "
        f"{CALLGRIND_STEPS})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=DEFAULT_WARMUP,
        help="steps that build the load before timing starts",
    )
    p.add_argument(
        "--schedulers",
        default=",".join(DEFAULT_SCHEDULERS),
        help=f"comma-separated, of {','.join(SCHEDULERS)} (default: "
        f"{','.join(DEFAULT_SCHEDULERS)})",
    )
    p.add_argument(
        "--profile-name",
        help="shipped GPU step profile to plan and step with (default: the H100 one, else "
        "the GPU profile shipped)",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="model folder, for its config only (default: .models/tiny, built when missing)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="results directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--callgrind", action="store_true", help="count instructions under valgrind instead"
    )
    mode.add_argument(
        "--cprofile",
        action="store_true",
        help="profile each scheduler's timed calls function by function "
        "(cprofile-LOAD-SCHEDULER.txt); times inflated",
    )
    # A process of --callgrind's: run under valgrind, mark the timed calls for it.
    mode.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)


def command(args: argparse.Namespace) -> int:
    schedulers = [s for s in args.schedulers.split(",") if s]
    unknown = sorted(set(schedulers) - set(SCHEDULERS))
    if unknown or not schedulers:
        raise SystemExit(f"--schedulers: unknown {unknown}; known: {', '.join(SCHEDULERS)}")
    counting = args.callgrind or args.callgrind_child
    loads = [int(n) for n in args.running.split(",")] if args.running else None
    loads = loads or list(CALLGRIND_LOADS if counting else DEFAULT_LOADS)
    steps = args.steps or (CALLGRIND_STEPS if counting else DEFAULT_STEPS)
    profile_name = args.profile_name or default_profile_name()
    model_dir = _model_dir(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.callgrind:
        return _count_instructions(args, schedulers, loads, steps, profile_name)
    model = shipped_profile(profile_name)
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    results = []
    for running in loads:
        _progress(f"{running} in flight: {args.warmup} warm-up + {steps} timed steps each")
        started = time.perf_counter()
        profilers = {name: cProfile.Profile() for name in schedulers} if args.cprofile else {}
        wrap_for, before = _wrapping(args, profilers)
        results.append(
            measure_load(
                running, model, model_dir, steps, args.warmup, schedulers,
                seed=args.seed, vocab=vocab, wrap_for=wrap_for, before_timing=before,
                breakdown=not (counting or args.cprofile),
            )
        )  # fmt: skip
        _progress(f"{running} in flight: {time.perf_counter() - started:.0f} s")
        for name, profiler in profilers.items():
            _write_profile(profiler, args.out / f"cprofile-{running}-{name}.txt")
    payload = {
        **_describe(profile_name, model, steps, args.warmup, args.seed),
        "mode": "cprofile" if args.cprofile else "callgrind-child" if counting else "timing",
        "loads": [r.to_json() for r in results],
        "targets": _targets(results),
    }
    report.write_results(args.out / "results.json", payload)
    summary = timing_summary(payload, results)
    (args.out / "summary.md").write_text(summary)
    if not counting:
        print(summary)
    return 0


def _model_dir(path: Path) -> Path:
    if not (path / "config.json").exists():
        if path != DEFAULT_MODEL:
            raise SystemExit(f"no model config at {path / 'config.json'}")
        from sloserve.tiny_model import TINY, ensure_model

        ensure_model(path, TINY)
    return path


def _wrapping(
    args: argparse.Namespace, profilers: dict[str, cProfile.Profile]
) -> tuple[Callable[[str], Meter], Callable[[], None] | None]:
    """What runs each timed call of each scheduler, and what runs once timing starts, for
    this mode. Only admission and schedule() are marked or profiled, not update_from_output."""
    if args.callgrind_child:
        # schedule() in one region, each admission in the other.
        def mark(phase: str, call: Callable[[], _T]) -> _T:
            if phase == "schedule":
                return callgrind.in_primary(call)
            if phase == "add":
                return callgrind.in_secondary(call)
            return call()

        return (lambda name: mark), callgrind.start_instrumentation
    if profilers:
        return (lambda name: _profiled_by(profilers[name])), None
    return (lambda name: unmetered), None


def _profiled_by(profiler: cProfile.Profile) -> Meter:
    def profiled(phase: str, call: Callable[[], _T]) -> _T:
        if phase == "update":
            return call()
        result: _T = profiler.runcall(call)
        return result

    return profiled


def _write_profile(profiler: cProfile.Profile, out: Path) -> None:
    """The functions the timed calls spent most in, by own time and by time inside."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.strip_dirs()
    for order in ("tottime", "cumulative"):
        stats.sort_stats(order).print_stats(40)
    out.write_text(text.getvalue())


def _describe(
    profile_name: str, model: StepTimeModel, steps: int, warmup: int, seed: int
) -> dict[str, Any]:
    return {
        "command": " ".join(["sloserve", *sys.argv[1:]]),
        "machine": cpu_description(),
        "python": platform.python_version(),
        "vllm": vllm.__version__,
        "profile": profile_name,
        "profile_hardware": model.metadata.get("hardware"),
        "step_overhead_s": step_overhead_s(model),
        "engine": {
            "kv_tokens": KV_TOKENS,
            "max_num_seqs": MAX_NUM_SEQS,
            "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
            "max_model_len": MAX_MODEL_LEN,
        },
        "steps": steps,
        "warmup": warmup,
        "seed": seed,
    }


def _targets(results: list[LoadResult]) -> list[dict[str, Any]]:
    """The issue's targets against sloserve-async's p99 per step: its own, and beyond
    vLLM's own scheduler's at the same load."""
    rows = []
    for result in results:
        limit = TARGETS_MS.get(result.shape.running)
        ours = result.cost(SLOSERVE_ASYNC)
        if limit is None or ours is None:
            continue
        extra = result.extra().get(SLOSERVE_ASYNC)
        row: dict[str, Any] = {"running": result.shape.running, "target_p99_ms": limit}
        for clock, p99, key in (
            ("wall", ours.step_ms.p99, "minus_vllm_ms"),
            ("cpu", ours.step_cpu_ms.p99, "cpu_minus_vllm_ms"),
        ):
            beyond = extra[key]["p99"] if extra else None
            row[clock] = {
                "p99_ms": p99,
                "met": p99 <= limit,
                "p99_beyond_vllm_ms": beyond,
                "met_beyond_vllm": beyond is not None and beyond <= limit,
            }
        rows.append(row)
    return rows


def timing_summary(payload: dict[str, Any], results: list[LoadResult]) -> str:
    engine = payload["engine"]
    lines = [
        "# sloserve bench scheduler",
        "",
        f"`{payload['command']}`",
        "",
        f"{payload['machine']}, Python {payload['python']}, vLLM {payload['vllm']}; mode "
        f"{payload['mode']}. Profile `{payload['profile']}` ({payload['profile_hardware']}; "
        f"host time per step {payload['step_overhead_s'] * 1000:.2f} ms); "
        f"KV cache {engine['kv_tokens']:,} tokens, max_num_seqs {engine['max_num_seqs']}, "
        f"max_num_batched_tokens {engine['max_num_batched_tokens']}, max_model_len "
        f"{engine['max_model_len']}; {payload['warmup']} warm-up and {payload['steps']} timed "
        "steps per load.",
        "",
        "Per step: admission of the step's arrivals + schedule(), ms, wall time and CPU time "
        "(this machine's; shared and noisy: compare within a load; CPU time leaves out the "
        "time other processes had the CPU).",
        "",
        "| in flight | scheduler | p50 | p90 | p99 | max | CPU p50 | CPU p99 | schedule() p50 "
        "| admission p50 / arrival | arrivals / step | running | tokens / step | prefill steps "
        "| share of engine time |",
        "|---" * 15 + "|",
    ]
    for result in results:
        for c in result.schedulers:
            admission = f"{c.admission_ms.p50:.3f}" if c.admission_ms else "-"
            s, cpu = c.step_ms, c.step_cpu_ms
            lines.append(
                f"| {result.shape.running} | {c.scheduler} | {s.p50:.3f} | {s.p90:.3f} "
                f"| {s.p99:.3f} | {s.max:.3f} | {cpu.p50:.3f} | {cpu.p99:.3f} "
                f"| {c.schedule_ms.p50:.3f} | {admission} "
                f"| {c.arrivals_per_step:.2f} | {c.running_mean:.0f} | {c.tokens_mean:.0f} "
                f"| {c.prefill_step_share:.0%} | {c.engine_share:.1%} |"
            )
    lines += [
        "",
        "sloserve beyond vLLM's own scheduler (same load, same requests): difference (ms) "
        "and ratio, per quantile.",
        "",
        "| in flight | pair | p50 | p90 | p99 | max | ratio p50 | ratio p99 | CPU p50 | CPU p99 "
        "| CPU ratio p50 | CPU ratio p99 |",
        "|---" * 12 + "|",
    ]
    for result in results:
        for name, extra in result.extra().items():
            minus, over = extra["minus_vllm_ms"], extra["over_vllm"]
            cpu_minus, cpu_over = extra["cpu_minus_vllm_ms"], extra["cpu_over_vllm"]
            pair = f"{name} - {dict(PAIRS)[name]}"
            lines.append(
                f"| {result.shape.running} | {pair} | {minus['p50']:.3f} | {minus['p90']:.3f} "
                f"| {minus['p99']:.3f} | {minus['max']:.3f} | {over['p50']:.2f} "
                f"| {over['p99']:.2f} | {cpu_minus['p50']:.3f} | {cpu_minus['p99']:.3f} "
                f"| {cpu_over['p50']:.2f} | {cpu_over['p99']:.2f} |"
            )
    parts = [(r, c) for r in results for c in r.schedulers if c.parts_ms]
    if parts:
        names = list(parts[0][1].parts_ms)
        lines += [
            "",
            "sloserve's scheduler part by part, p50 / p99 per step, ms (vllm_schedule_and_rest: "
            "schedule() less the parts sloserve adds; admission_glue: add_request less the "
            "policy's decision).",
            "",
            "| in flight | scheduler | " + " | ".join(names) + " |",
            "|---" * (len(names) + 2) + "|",
        ]
        for result, c in parts:
            cells = [f"{c.parts_ms[n].p50:.3f} / {c.parts_ms[n].p99:.3f}" for n in names]
            lines.append(f"| {result.shape.running} | {c.scheduler} | " + " | ".join(cells) + " |")
    lines += ["", "Loads (lengths and budgets fitted to each, see scheduler_cost.py):", ""]
    for result in results:
        shape = result.shape
        decided = ", ".join(
            f"{c.scheduler}: " + ", ".join(f"{k} {v}" for k, v in c.verdicts.items())
            for c in result.schedulers
            if c.verdicts
        )
        lines.append(
            f"- {shape.running} in flight: lengths x{shape.length_factor:.2f}, budgets "
            f"x{shape.budget_factor:.2f} (profile step at this load "
            f"{shape.steady_step_s * 1000:.0f} ms); {decided or 'no sloserve verdicts'}"
        )
    if payload["targets"]:
        lines += ["", "Targets (sloserve-async p99 per step):", ""]
        for t in payload["targets"]:
            verdicts: list[str] = []
            for clock in ("wall", "cpu"):
                c = t[clock]
                beyond = c["p99_beyond_vllm_ms"]
                versus = "not measured"
                if beyond is not None:
                    versus = f"{beyond:.3f} ms ({'met' if c['met_beyond_vllm'] else 'missed'})"
                verdicts.append(
                    f"{clock} time p99 {c['p99_ms']:.3f} ms ({'met' if c['met'] else 'missed'}), "
                    f"beyond vLLM's own {versus}"
                )
            lines.append(
                f"- {t['running']} in flight, target {t['target_p99_ms']} ms: "
                + "; ".join(verdicts)
            )
    return "\n".join(lines) + "\n"


# -- instruction counts ------------------------------------------------------------------------


def _count_instructions(
    args: argparse.Namespace,
    schedulers: list[str],
    loads: list[int],
    steps: int,
    profile_name: str,
) -> int:
    missing = callgrind.missing_tools()
    if missing:
        raise SystemExit(f"--callgrind needs valgrind's tools on PATH: {', '.join(missing)}")
    runs = [(running, name) for running in loads for name in schedulers]
    _progress(f"{len(runs)} processes under valgrind, two at a time (minutes each)")
    with ThreadPoolExecutor(max_workers=2) as pool:
        counted = list(
            pool.map(lambda run: _counted_run(args, run[0], run[1], steps, profile_name), runs)
        )
    model = shipped_profile(profile_name)
    payload = {
        **_describe(profile_name, model, steps, args.warmup, args.seed),
        "mode": "callgrind",
        "counts": counted,
    }
    report.write_results(args.out / "results.json", payload)
    summary = callgrind_summary(payload)
    (args.out / "summary.md").write_text(summary)
    print(summary)
    return 0


def _counted_run(
    args: argparse.Namespace, running: int, name: str, steps: int, profile_name: str
) -> dict[str, Any]:
    """One scheduler at one load, under callgrind: instructions per step and per arrival."""
    out = args.out / f"{name}-{running}"
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "sloserve", "bench", "scheduler", "--callgrind-child",
        "--running", str(running), "--steps", str(steps), "--warmup", str(args.warmup),
        "--schedulers", name, "--profile-name", profile_name, "--model", str(args.model),
        "--seed", str(args.seed), "--out", str(out),
    ]  # fmt: skip
    out_file = out / "callgrind.out"
    started = time.perf_counter()
    done = subprocess.run(
        callgrind.command(argv, out_file),
        env=callgrind.environment(),
        capture_output=True,
        text=True,
    )
    (out / "valgrind.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{name} at {running} under valgrind failed: see {out / 'valgrind.log'}")
    _progress(f"{name} at {running}: {time.perf_counter() - started:.0f} s under valgrind")
    listing = callgrind.annotate(out_file)
    (out / "annotate.txt").write_text(listing)
    counts = callgrind.region_counts(out_file, listing)
    cost = json.loads((out / "results.json").read_text())["loads"][0]["schedulers"][0]
    measured_steps, arrivals = cost["steps"], cost["arrivals"]
    return {
        "running": running,
        "scheduler": name,
        "steps": measured_steps,
        "arrivals": arrivals,
        "instructions": counts["total"],
        "per_step": counts["total"] / measured_steps,
        "schedule_per_step": counts[callgrind.PRIMARY] / measured_steps,
        "admission_per_arrival": counts[callgrind.SECONDARY] / arrivals if arrivals else None,
        "files": str(out),
    }


def callgrind_summary(payload: dict[str, Any]) -> str:
    lines = [
        "# sloserve bench scheduler --callgrind",
        "",
        f"`{payload['command']}`",
        "",
        f"Instructions (valgrind callgrind, Ir) per step of admission + schedule(); "
        f"{payload['warmup']} warm-up steps uncounted, then {payload['steps']} counted. "
        f"Profile `{payload['profile']}`; vLLM {payload['vllm']}, Python {payload['python']}.",
        "",
        "| in flight | scheduler | per step (M) | schedule() per step (M) "
        "| admission per arrival (M) | arrivals | steps |",
        "|---" * 7 + "|",
    ]
    counts = payload["counts"]
    for c in counts:
        admission = c["admission_per_arrival"]
        lines.append(
            f"| {c['running']} | {c['scheduler']} | {c['per_step'] / 1e6:.3f} "
            f"| {c['schedule_per_step'] / 1e6:.3f} "
            f"| {admission / 1e6 if admission is not None else 0:.3f} "
            f"| {c['arrivals']} | {c['steps']} |"
        )
    by_key = {(c["running"], c["scheduler"]): c for c in counts}
    pairs = [
        (running, slo, vllm_name)
        for running, slo in by_key
        for slo_name, vllm_name in PAIRS
        if slo == slo_name and (running, vllm_name) in by_key
    ]
    if pairs:
        lines += ["", "| in flight | pair | extra per step (M) | ratio |", "|---" * 4 + "|"]
        for running, slo, vllm_name in pairs:
            ours, theirs = (
                by_key[(running, slo)]["per_step"],
                by_key[(running, vllm_name)]["per_step"],
            )
            lines.append(
                f"| {running} | {slo} - {vllm_name} | {(ours - theirs) / 1e6:.3f} "
                f"| {ours / theirs:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)

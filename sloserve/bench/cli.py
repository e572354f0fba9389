"""`sloserve bench run` and `sloserve bench compare`: every figure re-runnable by anyone."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sloserve.bench import (
    planner_overhead,
    referee,
    report,
    scenario_table,
    scheduler_cost_cli,
    workload_options,
)
from sloserve.bench.analysis import RunStats, analyze
from sloserve.bench.capacity import CapacityResult, find_capacity, fluid_bound
from sloserve.bench.overload import overload_report, overload_table
from sloserve.bench.presets import LengthScale
from sloserve.bench.protocol import (
    RatioEstimate,
    SystemCapacity,
    best_of,
    ratio,
    run_protocol,
)
from sloserve.bench.request_log import write_request_log
from sloserve.bench.runner import PromptBook, run
from sloserve.bench.systems import (
    BASELINE,
    ROUTING_SYSTEM,
    ROUTING_VARIANTS,
    SYSTEMS,
    VLLM_TUNED,
    VLLM_VARIANTS,
    EngineShape,
    SystemSpec,
    best_tuned_vllm,
    running,
    running_gateway,
    running_replicas,
)
from sloserve.bench.targets import make_target
from sloserve.bench.types import RequestRecord
from sloserve.bench.workloads import Workload
from sloserve.machine import cpu_description
from sloserve.stepmodel import StepTimeModel, shipped_profile, shipped_profile_path

DEFAULT_MODEL = Path(".models/bench")
DEFAULT_PROFILE = "cpu-bench"
BENCH_MAX_MODEL_LEN = 4096
# The bench model on a CPU computes far fewer tokens per second than a 7-13B model on a GPU.
# Scaling prompts and outputs by the same factor keeps each request's balance of prefill and
# decode work, while bringing capacities to a few requests per second, so a load point of a
# quick run takes seconds, not minutes. Recorded in every result.
CPU_LENGTH_SCALE = LengthScale(
    prompt_factor=0.125, output_factor=0.125, max_model_len=BENCH_MAX_MODEL_LEN
)


@dataclass(frozen=True)
class Mode:
    name: str
    requests: int  # per load point
    resolution: float
    max_trials: int
    # The search starts at this fraction of the fluid bound (unless --start-rate is given) and
    # steps up by `growth`: low rates are the slowest trials (40 requests at 1 req/s take 40 s),
    # and measured capacities sit at 10-50% of the bound, so starting there saves most of them.
    start_fraction: float
    growth: float


WARMUP_REQUESTS = 10
QUICK = Mode("quick", requests=40, resolution=0.10, max_trials=7, start_fraction=0.25, growth=1.5)
FULL = Mode("full", requests=1000, resolution=0.025, max_trials=20, start_fraction=0.25, growth=1.5)


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _profile_path(given: Path | None) -> Path:
    """The step profile of a run: the one given, else the shipped bench profile."""
    return given if given is not None else shipped_profile_path(DEFAULT_PROFILE)


def _load_profile(path: Path | None) -> StepTimeModel:
    resolved = _profile_path(path)
    model = StepTimeModel.load(resolved)
    if "request_overhead_s" not in model.metadata:
        # TTFT presets are multiples of the zero-load TTFT, of which this cost is part.
        _progress(
            f"warning: {resolved} has no request_overhead_s (profiles from `sloserve profile` "
            "measure it): TTFT budgets count the prefill alone, and come out tighter"
        )
    return model


def _workload(args: argparse.Namespace, model: StepTimeModel, rate: float, count: int) -> Workload:
    # A scenario or a --trace-file, with any --burst-* (workload_options.py).
    workload = workload_options.resolve(args).build(
        model=model,
        rate=rate,
        count=count,
        seed=args.seed,
        scale=CPU_LENGTH_SCALE,
        trace_dir=args.trace_dir,
        chunk_tokens=int(model.metadata.get("engine", {}).get("max_num_batched_tokens", 2048)),
    )
    if getattr(args, "best_effort", False):
        # Every request accepts best effort: what a gateway cannot admit waits in its
        # spillover queue instead of being turned away.
        requests = [replace(r, allow_best_effort=True) for r in workload.requests]
        workload = replace(workload, requests=requests)
    return workload


def _run_once(
    target_spec: str, workload: Workload, vocab: int, use_priority: bool, prompt_seed: int
) -> list[RequestRecord]:
    """One pass of the workload. `prompt_seed` picks the prompt tokens: each load point gets
    its own, so the prefix cache never serves one load point's prompts to another, and a
    load point gets the same prompts on every system."""
    done = [0]
    total = len(workload.requests)
    started = time.monotonic()

    def tick(_: RequestRecord) -> None:
        done[0] += 1
        if done[0] % max(1, total // 10) == 0 or done[0] == total:
            bar = "#" * (20 * done[0] // total)
            print(
                f"\r  [{bar:<20}] {done[0]}/{total} requests, {time.monotonic() - started:.0f} s",
                end="",
                file=sys.stderr,
                flush=True,
            )

    # The client's long-lived objects (imports, the workload) stay out of the collector's way:
    # a full collection mid-run would delay every stream's timestamps at once.
    gc.collect()
    gc.freeze()

    async def go() -> list[RequestRecord]:
        target = make_target(target_spec, use_priority=use_priority)
        try:
            prompts = PromptBook(vocab, prompt_seed, workload.prefixes)
            return await run(target, workload.requests, prompts, on_done=tick)
        finally:
            await target.close()

    records = asyncio.run(go())
    print(file=sys.stderr)
    return records


def _prompt_seed(seed: int, rate: float) -> int:
    return seed * 1_000_003 + round(rate * 1e6)


def _fluid(model: StepTimeModel, workload: Workload) -> float:
    requests = workload.requests
    prompt = sum(r.prompt_tokens for r in requests) / len(requests)
    output = sum(r.output_tokens for r in requests) / len(requests)
    tightest = min(min(r.budgets.tpot_s, r.budgets.thinking_tpot_s or 1e9) for r in requests)
    max_batch = int(model.metadata.get("engine", {}).get("max_num_seqs", 256))
    return fluid_bound(model, prompt, output, tightest, max_batch, prompt + output / 2)


def parse_start_rates(text: str) -> dict[str | None, float]:
    """`--start-rate`: one rate for every system ("2.5"), or a rate per system
    ("vllm-default=1.7,sloserve=5.6"; key None is the rate for all). Searches at many requests
    a load point spend most of their time on the trials that find the bracket, so a system's
    own start near its capacity (from an earlier run) saves the most time."""
    rates: dict[str | None, float] = {}
    for part in text.split(","):
        name, _, value = part.strip().rpartition("=")
        if name and name not in SYSTEMS:
            raise argparse.ArgumentTypeError(f"unknown system {name!r}; known: {sorted(SYSTEMS)}")
        try:
            rate = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a rate in req/s") from None
        if not rate > 0:
            raise argparse.ArgumentTypeError(f"a start rate must be positive, got {value}")
        rates[name or None] = rate
    return rates


def _start_rate(args: argparse.Namespace, mode: Mode, fluid: float, system: str | None) -> float:
    given: dict[str | None, float] = args.start_rate or {}
    if system in given:
        return given[system]
    if None in given:
        return given[None]
    # Two significant figures: the rates tried stay readable and are the same on every system.
    return float(f"{max(fluid * mode.start_fraction, 0.01):.2g}")


def _search(
    args: argparse.Namespace,
    mode: Mode,
    model: StepTimeModel,
    target_spec: str,
    use_priority: bool,
    start_rate: float,
    prompt_salt: int = 0,
) -> tuple[CapacityResult, dict[float, list[RequestRecord]]]:
    """The capacity search. `prompt_salt` shifts every prompt seed: systems that share
    replicas (the routing variants) each get prompts of their own, so no variant finds its
    prompts in a prefix cache another variant filled."""
    records_by_rate: dict[float, list[RequestRecord]] = {}

    def run_at(rate: float) -> RunStats:
        workload = _workload(args, model, rate, mode.requests)
        seed = _prompt_seed(args.seed, rate) + prompt_salt
        records = _run_once(target_spec, workload, args.vocab, use_priority, seed)
        records_by_rate[rate] = records
        return analyze(records)

    _warm_up(args, model, target_spec, use_priority, start_rate, prompt_salt)
    result = find_capacity(
        run_at,
        low=start_rate,
        resolution=mode.resolution,
        max_trials=mode.max_trials,
        progress=_progress,
        growth=mode.growth,
        min_rate=args.min_rate,
    )
    return result, records_by_rate


def _warm_up(
    args: argparse.Namespace,
    model: StepTimeModel,
    target_spec: str,
    use_priority: bool,
    rate: float,
    prompt_salt: int = 0,
) -> None:
    # A fresh server's first requests are slow (allocator, caches, lazy imports); without a
    # warm-up the first load point of every search would fail for that reason alone.
    _progress(f"warm-up: {WARMUP_REQUESTS} requests, not recorded")
    warmup = _workload(args, model, rate, WARMUP_REQUESTS)
    seed = -1 - args.seed + prompt_salt
    _run_once(target_spec, warmup, args.vocab, use_priority, prompt_seed=seed)


# Routing variant k's prompt seeds are shifted by k times this (see _search).
ROUTED_PROMPT_SALT = 7_919


def _mode(args: argparse.Namespace) -> Mode:
    mode = QUICK if args.quick else FULL
    if args.growth:
        mode = replace(mode, growth=args.growth)
    if args.load_point_requests:
        # Quick mode's 40 requests give a class 6-8 per load point: one miss fails it. More
        # requests per point keep quick mode's search settings but judge on more requests.
        n = args.load_point_requests
        return replace(mode, name=f"{mode.name}, {n} requests per load point", requests=n)
    return mode


def _mode_note(mode: Mode) -> str:
    """Where the search departs from the methodology's (1,000 requests a point, 2.5%
    resolution); quick mode with 1,000 requests a point still bisects only to 10%."""
    departures = []
    if mode.requests < FULL.requests:
        departures.append(f"{mode.requests} requests per load point, fewer than {FULL.requests:,}")
    if mode.resolution > FULL.resolution:
        departures.append(f"{mode.resolution:.1%} resolution, coarser than {FULL.resolution:.1%}")
    described = "; ".join(departures) if departures else "the methodology's search"
    return f"{described}; one seed, where the methodology asks for 3"


def _describe_run(
    args: argparse.Namespace, mode: Mode, model: StepTimeModel, reference: Workload
) -> dict[str, Any]:
    """What was run; `reference` is the workload at 1 req/s (lengths and classes are the same
    at every rate, only arrivals scale)."""
    return {
        "scenario": args.scenario,
        "mode": mode.name,
        "search_settings": asdict(mode),
        "requests_per_load_point": mode.requests,
        "mode_note": _mode_note(mode),
        "seed": args.seed,
        "workload": reference.describe(),
        "profile": model.to_json(),
        "command": " ".join(["sloserve", *sys.argv[1:]]),
    }


def _engine_shape(args: argparse.Namespace) -> EngineShape:
    return EngineShape(
        model=args.model,
        max_model_len=BENCH_MAX_MODEL_LEN,
        kv_cache_gib=args.kv_cache_gib,
        profile=_profile_path(args.profile),
    )


class SharedReplicas:
    """sloserve replicas for gateways: started on first use, stopped when the block ends,
    so every routing variant of a comparison runs over the same replicas."""

    def __init__(self, shape: EngineShape, count: int, log_dir: Path) -> None:
        self._shape, self._count, self._log_dir = shape, count, log_dir
        self._stack = ExitStack()
        self._endpoints: list[str] | None = None

    def endpoints(self) -> list[str]:
        if self._endpoints is None:
            _progress(f"starting {self._count} sloserve replica(s)")
            replicas = running_replicas(self._shape, self._count, self._log_dir)
            self._endpoints = self._stack.enter_context(replicas)
        return self._endpoints

    def __enter__(self) -> SharedReplicas:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


@contextmanager
def _system(
    spec: SystemSpec, shape: EngineShape, out: Path, replicas: SharedReplicas
) -> Iterator[str]:
    """Starts `spec` and yields its target; a gateway goes in front of `replicas`."""
    if spec.routed:
        with running_gateway(spec, replicas.endpoints(), out / f"{spec.name}.log") as target:
            yield target
    else:
        with running(spec, shape, out / f"{spec.name}.log") as target:
            yield target


def run_command(args: argparse.Namespace) -> int:
    mode = _mode(args)
    model = _load_profile(args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    reference = _workload(args, model, 1.0, mode.requests)
    payload = _describe_run(args, mode, model, reference)
    use_priority = args.priority
    shape = _engine_shape(args)
    with SharedReplicas(shape, args.replicas, args.out) as replicas, ExitStack() as stack:
        target_spec = args.target
        if args.system is not None:
            spec = SYSTEMS[args.system]
            use_priority = use_priority or spec.use_priority
            _progress(f"== {spec.name}: {spec.description}")
            target_spec = stack.enter_context(_system(spec, shape, args.out, replicas))
            payload |= {"system": spec.name, "replicas": args.replicas if spec.routed else 1}
        label = args.system or target_spec
        if args.rate is not None:
            # A search warms up on its own. A --target may be as fresh as a --system.
            _warm_up(args, model, target_spec, use_priority, args.rate)
            table = _single_run(args, mode, model, target_spec, use_priority, label, payload)
        else:
            fluid = _fluid(model, reference) * _replicas_of(args)
            start = _start_rate(args, mode, fluid, args.system)
            result, by_rate = _search(args, mode, model, target_spec, use_priority, start)
            payload |= {"capacity": result.to_json(), "fluid_bound": fluid}
            rows = report.rows_from_capacity(label, result)
            table = report.markdown_table(rows)
            report.plot_attainment(
                args.out / "attainment.png",
                {label: [(r.rate, dict(r.attainment)) for r in rows]},
            )
            if by_rate:
                report.plot_latency_distributions(
                    args.out / "latency.png", {label: by_rate[max(by_rate)]}
                )
    report.write_results(args.out / "results.json", payload)
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    return 0


def _replicas_of(args: argparse.Namespace) -> int:
    """Replicas behind the target, when this command started them (else one)."""
    if args.system is not None and SYSTEMS[args.system].routed:
        return int(args.replicas)
    return 1


def _single_run(
    args: argparse.Namespace,
    mode: Mode,
    model: StepTimeModel,
    target_spec: str,
    use_priority: bool,
    label: str,
    payload: dict[str, Any],
) -> str:
    """One run at --rate; fills `payload`; returns the markdown tables."""
    count = args.requests or (round(args.rate * args.duration) if args.duration else 0)
    workload = _workload(args, model, args.rate, count or mode.requests)
    seed = _prompt_seed(args.seed, args.rate)
    records = _run_once(target_spec, workload, args.vocab, use_priority, seed)
    stats = analyze(records)
    overload = overload_report(records)
    payload |= {
        "rate": args.rate,
        "best_effort_accepted": bool(args.best_effort),
        "stats": stats.to_json(),
        "overload": overload.to_json(),
    }
    report.plot_latency_distributions(args.out / "latency.png", {label: records})
    write_request_log(args.out / "requests.jsonl", records)
    row = report.AttainmentRow(
        label, args.rate, stats.attainment, stats.drain.drained, stats.meets()
    )
    return (
        report.markdown_table([row])
        + "\n"
        + report.outcome_table(stats)
        + "\n"
        + overload_table(overload)
    )


def _compare_systems(args: argparse.Namespace) -> list[str]:
    """The systems to compare, single-replica systems first: the routing variants share
    replicas that are started once and stay up until the end."""
    if args.systems:
        systems = args.systems.split(",")
    elif args.replicas is not None:
        systems = list(ROUTING_VARIANTS)
    else:
        systems = [*VLLM_VARIANTS, "sloserve"]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {sorted(SYSTEMS)}")
    single = [s for s in systems if not SYSTEMS[s].routed]
    if single and (args.replicas or 1) > 1:
        raise SystemExit(
            f"--replicas {args.replicas} applies to gateway systems ({', '.join(ROUTING_VARIANTS)})"
            f"; {single} run on one replica each: compare them without --replicas"
        )
    return [*single, *(s for s in systems if SYSTEMS[s].routed)]


def seed_list(text: str) -> list[int]:
    """A --seeds value: distinct integers, comma-separated."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must differ, got {text!r}")
    return seeds


def compare_command(args: argparse.Namespace) -> int:
    if args.seeds is not None:
        return _compare_over_seeds(args)
    mode = _mode(args)
    model = _load_profile(args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    systems = _compare_systems(args)
    replicas = args.replicas or 1
    routed = [name for name in systems if SYSTEMS[name].routed]
    shape = _engine_shape(args)
    reference = _workload(args, model, 1.0, mode.requests)
    # The bound of one replica; a routed system's search starts from its replicas' sum.
    fluid = _fluid(model, reference)
    results: dict[str, CapacityResult] = {}
    last_records: dict[str, list[RequestRecord]] = {}
    markdown = ""
    with SharedReplicas(shape, replicas, args.out) as shared:
        for name in systems:
            spec = SYSTEMS[name]
            system_fluid = fluid * (replicas if spec.routed else 1)
            start = _start_rate(args, mode, system_fluid, name)
            salt = ROUTED_PROMPT_SALT * (routed.index(name) + 1) if spec.routed else 0
            _progress(f"== {name}: {spec.description}")
            with _system(spec, shape, args.out, shared) as target_spec:
                result, by_rate = _search(
                    args, mode, model, target_spec, spec.use_priority, start, salt
                )
            results[name] = result
            if by_rate:
                last_records[name] = by_rate[max(by_rate)]
            _progress(f"== {name}: capacity {result.capacity:.3f} req/s ({result.status})")
            # Written after every system, not only at the end: a comparison at 1,000 requests
            # a load point runs for hours, and one cut short still leaves the systems it
            # finished on record (summary.json names the ones still pending).
            markdown = _write_compare(
                args, mode, model, reference, results, fluid, replicas, last_records, systems
            )
    print(markdown)
    return 0


def _compare_over_seeds(args: argparse.Namespace) -> int:
    """`bench compare --seeds`: each system's capacity on every seed's stream (protocol.py),
    each search on a freshly started system; summary.json after every search."""
    mode = _mode(args)
    model = _load_profile(args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    systems = _compare_systems(args)
    if any(SYSTEMS[name].routed for name in systems):
        raise SystemExit("--seeds compares single-replica systems; leave out the gateway-* ones")
    shape = _engine_shape(args)
    reference = _workload(args, model, 1.0, mode.requests)
    fluid = _fluid(model, reference)
    starts = {name: _start_rate(args, mode, fluid, name) for name in systems}

    def search(name: str, seed: int, start: float) -> CapacityResult:
        spec = SYSTEMS[name]
        seeded = argparse.Namespace(**{**vars(args), "seed": seed})
        _progress(f"== {name}, seed {seed}, from {start:.4g} req/s: {spec.description}")
        with (
            SharedReplicas(shape, 1, args.out) as shared,
            _system(spec, shape, args.out, shared) as target_spec,
        ):
            result, _ = _search(seeded, mode, model, target_spec, spec.use_priority, start)
        _progress(f"== {name}, seed {seed}: capacity {result.capacity:.3f} req/s")
        return result

    def write(results: dict[str, SystemCapacity]) -> None:
        (args.out / "summary.md").write_text(
            _write_over_seeds(args, mode, model, reference, systems, results, fluid)
        )

    results = run_protocol(systems, args.seeds, starts, search, on_result=write)
    print((args.out / "summary.md").read_text())
    return 0 if results else 1


def _write_over_seeds(
    args: argparse.Namespace,
    mode: Mode,
    model: StepTimeModel,
    reference: Workload,
    planned: list[str],
    results: dict[str, SystemCapacity],
    fluid: float,
) -> str:
    """Writes summary.json for the searches so far; returns the markdown."""
    seeds: list[int] = args.seeds
    tuned = [results[name] for name in planned if name in VLLM_TUNED and results[name].by_seed]
    best = best_of(tuned)
    estimates: dict[str, RatioEstimate] = {}
    if "sloserve" in results:
        for label, other in (("vllm_default", results.get(BASELINE)), ("best_tuned_vllm", best)):
            if other is not None:
                estimates[f"sloserve_vs_{label}"] = ratio(results["sloserve"], other)
    summary = {
        **_describe_run(args, mode, model, reference),
        "mode_note": _mode_note(mode).replace("one seed", f"{len(seeds)} seed(s)"),
        "seeds": seeds,
        "machine": model.metadata.get("hardware"),
        "fluid_bound_rps": fluid,
        "systems": {
            name: {"description": SYSTEMS[name].description, **capacity.to_json()}
            for name, capacity in results.items()
        },
        "best_tuned_vllm": best.system if best else None,
        "headline": {key: estimate.to_json() for key, estimate in estimates.items()},
        "searches_pending": [
            f"{name}/{seed}" for name in planned for seed in seeds
            if seed not in results[name].by_seed
        ],
    }  # fmt: skip
    report.write_results(args.out / "summary.json", summary)
    header = " | ".join(f"seed {seed}" for seed in seeds)
    lines = [
        f"### {args.scenario} ({mode.name} mode, {len(seeds)} seeds)\n",
        f"| system | capacity (median, req/s) | min-max | {header} |",
        "| --- | --- | --- |" + " --- |" * len(seeds),
    ]
    for name in planned:
        capacity = results[name]
        cells = [
            f"{capacity.by_seed[seed].capacity:.3g}" if seed in capacity.by_seed else "-"
            for seed in seeds
        ]
        values = capacity.capacities
        spread = f"{min(values):.3g}-{max(values):.3g}" if values else "-"
        median = f"{capacity.median:.3g}" if values else "-"
        lines.append(f"| {name} | {median} | {spread} | {' | '.join(cells)} |")
    lines.append("")
    for key, estimate in estimates.items():
        lines.append(f"- {key.replace('_', ' ')} ({estimate.denominator}): {estimate.describe()}")
    return "\n".join(lines) + "\n"


def _write_compare(
    args: argparse.Namespace,
    mode: Mode,
    model: StepTimeModel,
    reference: Workload,
    results: dict[str, CapacityResult],
    fluid: float,
    replicas: int,
    last_records: dict[str, list[RequestRecord]],
    planned: list[str],
) -> str:
    """Writes summary.json, summary.md and the plots for the systems in `results` so far;
    returns the markdown."""
    systems = [name for name in planned if name in results]
    summary = _summary(args, mode, model, reference, systems, results, fluid, replicas)
    summary["systems_pending"] = [name for name in planned if name not in results]
    report.write_results(args.out / "summary.json", summary)
    routed = any(SYSTEMS[name].routed for name in systems)
    total_fluid = fluid * replicas  # only routed systems run with several replicas
    rows = [row for name in systems for row in report.rows_from_capacity(name, results[name])]
    capacity_rows = [report.CapacityRow.from_result(name, results[name]) for name in systems]
    baselines = [b for b in (BASELINE, *ROUTING_VARIANTS[1:]) if b in systems]
    routed_note = (
        f"{replicas} sloserve replica(s) behind each gateway; the fluid bound is theirs\n\n"
        if routed
        else ""
    )
    pending = summary["systems_pending"]
    pending_note = f"Still to run: {', '.join(pending)}\n\n" if pending else ""
    markdown = (
        f"### {args.scenario} ({mode.name} mode)\n\n"
        + routed_note
        + pending_note
        + report.capacity_table(capacity_rows, fluid_bound=total_fluid, baselines=baselines)
        + "\n\n"
        + report.markdown_table(rows)
        + "\n"
    )
    (args.out / "summary.md").write_text(markdown)
    report.plot_attainment(
        args.out / "attainment.png",
        {
            name: [
                (r.rate, dict(r.attainment)) for r in report.rows_from_capacity(name, results[name])
            ]
            for name in systems
        },
    )
    if last_records:
        report.plot_latency_distributions(args.out / "latency.png", last_records)
    return markdown


def _summary(
    args: argparse.Namespace,
    mode: Mode,
    model: StepTimeModel,
    reference: Workload,
    systems: list[str],
    results: dict[str, CapacityResult],
    fluid: float,
    replicas: int = 1,
) -> dict[str, Any]:
    """`fluid` is one replica's bound; a routed system's is `replicas` times it."""
    capacity = {name: results[name].capacity for name in systems}
    ratios: dict[str, float | None] = {}
    for a in systems:
        for b in systems:
            if a != b:
                ratios[f"{a}/{b}"] = capacity[a] / capacity[b] if capacity[b] > 0 else None
    tuned = [s for s in systems if s in VLLM_TUNED]
    best_tuned = best_tuned_vllm(capacity)
    return {
        **_describe_run(args, mode, model, reference),
        "machine": model.metadata.get("hardware"),
        "fluid_bound_rps": fluid,
        "systems": {
            name: {
                "description": SYSTEMS[name].description,
                "replicas": replicas if SYSTEMS[name].routed else 1,
                "capacity_rps": results[name].capacity,
                "capacity_99_rps": results[name].capacity_99,
                "capacity_fraction_of_fluid_bound": results[name].capacity
                / (fluid * (replicas if SYSTEMS[name].routed else 1))
                if fluid
                else None,
                "search": results[name].to_json(),
                "attainment_by_rate": {
                    f"{t.rate:.4f}": t.stats.attainment for t in results[name].trials
                },
            }
            for name in systems
        },
        "capacity_ratios": ratios,
        "best_tuned_vllm": best_tuned,
        "headline": _headline(capacity, best_tuned) | _headline_floors(results, tuned),
        "routing": _routing_headline(capacity, replicas),
    }


def _routing_headline(capacity: dict[str, float], replicas: int) -> dict[str, Any]:
    """The routing variants' capacities and sloserve routing's ratio to each baseline."""
    variants = {name: capacity[name] for name in ROUTING_VARIANTS if name in capacity}
    if not variants:
        return {}
    ours = variants.get(ROUTING_SYSTEM)

    def ratio(baseline: str) -> float | None:
        theirs = variants.get(baseline)
        if ours is None or not theirs:
            return None
        return ours / theirs

    return {
        "replicas": replicas,
        "capacity_rps": variants,
        "capacity_per_replica_rps": {name: c / replicas for name, c in variants.items()},
        "sloserve/round-robin": ratio("gateway-round-robin"),
        "sloserve/least-outstanding": ratio("gateway-least-outstanding"),
    }


def _headline_floors(
    results: dict[str, CapacityResult], tuned: list[str]
) -> dict[str, float | None]:
    """Where stock vLLM failed every rate down to the search's floor, its capacity is below the
    lowest rate it tried, so sloserve's ratio to it is at least capacity / that rate. Against
    the tuned variants the floor is the smallest of theirs (the best variant's), and only
    when none of them passed a rate."""
    if "sloserve" not in results:
        return {}
    ours = results["sloserve"].capacity

    def floor(name: str) -> float | None:
        theirs = results.get(name)
        if theirs is None or theirs.status != "below_min_rate" or not theirs.lowest_failing:
            return None
        # sloserve with no passing rate of its own bounds nothing (a floor of 0 says nothing).
        return ours / theirs.lowest_failing if ours > 0 else None

    tuned_floors = [floor(name) for name in tuned]
    best_tuned_floor = (
        min(f for f in tuned_floors if f is not None)
        if tuned_floors and all(f is not None for f in tuned_floors)
        else None
    )
    return {
        "sloserve_vs_vllm_default_at_least": floor(BASELINE),
        "sloserve_vs_best_tuned_vllm_at_least": best_tuned_floor,
    }


def _headline(capacity: dict[str, float], best_tuned: str | None) -> dict[str, float | None]:
    """sloserve's capacity against stock vLLM's defaults and its best tuned variant."""
    if "sloserve" not in capacity:
        return {}

    def ratio(other: str | None) -> float | None:
        if other is None or other not in capacity or capacity[other] <= 0:
            return None
        return capacity["sloserve"] / capacity[other]

    return {
        "sloserve_vs_vllm_default": ratio(BASELINE),
        "sloserve_vs_best_tuned_vllm": ratio(best_tuned),
    }


def _growth(text: str) -> float:
    growth = float(text)
    if not growth > 1:
        raise argparse.ArgumentTypeError(f"growth must be above 1, got {text}")
    return growth


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="measure SLO attainment and capacity")
    verbs = bench.add_subparsers(dest="verb", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        workload_options.add_arguments(p)  # --scenario, or --trace-file; --burst-*
        p.add_argument("--quick", action="store_true", help="CI mode: 40 requests per load point")
        p.add_argument(
            "--load-point-requests",
            type=int,
            metavar="N",
            help="requests per load point of a search (default: 40 with --quick, else 1000)",
        )
        p.add_argument("--out", type=Path, required=True, help="results directory")
        p.add_argument(
            "--profile", type=Path, help=f"step profile (default: shipped {DEFAULT_PROFILE})"
        )
        p.add_argument(
            "--trace-dir",
            type=Path,
            help="folder of the Azure LLM traces (chatbot, coding, coding-burst, "
            "reasoning-burst, mixed)",
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="bench model directory")
        p.add_argument(
            "--vocab", type=int, help="prompt token ids are drawn below this (default: model's)"
        )
        p.add_argument(
            "--start-rate",
            type=parse_start_rates,
            metavar="RATE|SYSTEM=RATE,...",
            help="first rate of the capacity search, for all systems or per system "
            "(default: a quarter of the fluid bound)",
        )
        p.add_argument(
            "--min-rate",
            type=float,
            help="a search that fails down to this rate stops there and reports capacity below "
            "the lowest rate it tried (default: its start rate / 64)",
        )
        p.add_argument(
            "--growth",
            type=_growth,
            help="factor the search steps up by from a passing start (default: 1.5)",
        )

    run_p = verbs.add_parser("run", help="run one target at a rate, or search its capacity")
    common(run_p)
    system = run_p.add_mutually_exclusive_group(required=True)
    system.add_argument(
        "--target",
        help="sloserve:HOST:PORT (gRPC), openai:URL, or sloserve-openai:URL (a sloserve "
        "gateway's OpenAI API, sent SLO budgets), already running",
    )
    system.add_argument(
        "--system",
        choices=sorted(SYSTEMS),
        help="start this system (as bench compare does), warm it up, run, stop it",
    )
    run_p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="with a gateway --system: sloserve replicas behind it (default: 1)",
    )
    run_p.add_argument("--kv-cache-gib", type=float, default=1.0, help="with --system")
    run_p.add_argument(
        "--best-effort",
        action="store_true",
        help="every request accepts best effort (a gateway queues what it cannot admit)",
    )
    run_p.add_argument("--rate", type=float, help="requests per second (default: --sweep)")
    run_p.add_argument("--sweep", action="store_true", help="search capacity by bisection")
    sized = run_p.add_mutually_exclusive_group()
    sized.add_argument("--requests", type=int, help="requests for a single --rate run")
    sized.add_argument(
        "--duration", type=float, help="seconds of arrivals for a single --rate run (overload)"
    )
    run_p.add_argument("--priority", action="store_true", help="send vLLM priorities (openai)")

    planner_p = verbs.add_parser("planner", help="time the SLO policy per step and per arrival")
    planner_p.add_argument(
        "--profile-name", default="gpu-llama-3-8b-a100-vidur", help="a shipped step profile"
    )
    planner_p.add_argument("--profile", type=Path, help="a step profile file (instead)")
    planner_p.add_argument(
        "--running", default="256,1024", help="comma-separated requests in flight to measure at"
    )
    planner_p.add_argument("--steps", type=int, default=2000, help="steps timed per load")
    planner_p.add_argument("--out", type=Path, required=True, help="results directory")

    scheduler_cost_cli.add_parser(verbs)
    referee.add_parser(verbs)

    table_p = verbs.add_parser(
        "table", help="one table of several scenarios' `bench compare` results, with means"
    )
    table_p.add_argument("runs", nargs="+", type=Path, help="`bench compare` --out folders")
    table_p.add_argument("--out", type=Path, help="also write table.md and table.json here")

    compare_p = verbs.add_parser("compare", help="start each system and compare capacities")
    common(compare_p)
    compare_p.add_argument("--kv-cache-gib", type=float, default=1.0)
    compare_p.add_argument(
        "--systems",
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: the stock vLLM "
        "variants and sloserve; with --replicas, the gateway routing variants)",
    )
    compare_p.add_argument(
        "--replicas",
        type=int,
        help="sloserve replicas behind each gateway-* system, started once for all of them",
    )
    compare_p.add_argument(
        "--seeds",
        type=seed_list,
        metavar="LIST",
        help="search every system on each seed's stream (e.g. 0,1,2, the methodology's 3), "
        "systems rotated per seed, each later search from its last capacity; ratios paired "
        "by seed, with their spread (summary.json's headline)",
    )


def planner_command(args: argparse.Namespace) -> int:
    model = StepTimeModel.load(args.profile) if args.profile else shipped_profile(args.profile_name)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for in_flight in (int(n) for n in args.running.split(",")):
        _progress(f"{in_flight} requests in flight: timing {args.steps} steps")
        results.append(planner_overhead.measure(model, in_flight, args.steps))
    header = "| running | steps | plan p50 (ms) | plan p99 (ms) | plan max (ms) "
    header += "| arrivals | admission p50 (ms) | admission p99 (ms) |\n"
    lines = [header + "|---" * 8 + "|"]
    for r in results:
        lines.append(
            f"| {r.running} | {r.steps} | {r.plan_ms['p50']:.3f} | {r.plan_ms['p99']:.3f} "
            f"| {r.plan_ms['max']:.3f} | {r.arrivals} | {r.admission_ms['p50']:.3f} "
            f"| {r.admission_ms['p99']:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    payload = {
        "profile": model.to_json(),
        "machine": cpu_description(),
        "python": platform.python_version(),
        "command": " ".join(["sloserve", *sys.argv[1:]]),
        "results": [r.to_json() for r in results],
    }
    report.write_results(args.out / "planner.json", payload)
    (args.out / "planner.md").write_text(table)
    print(table)
    return 0


def table_command(args: argparse.Namespace) -> int:
    try:
        rows = [scenario_table.load_row(folder) for folder in args.runs]
    except scenario_table.TableError as error:
        raise SystemExit(f"sloserve bench table: {error}") from None
    table = scenario_table.markdown(rows)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        report.write_results(args.out / "table.json", scenario_table.to_json(rows))
        (args.out / "table.md").write_text(table)
    print(table, end="")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.verb == "planner":
        return planner_command(args)
    if args.verb == "scheduler":
        return scheduler_cost_cli.command(args)
    if args.verb == "referee":
        return referee.command(args)
    if args.verb == "table":
        return table_command(args)
    workload_options.resolve(args)  # a bad --trace-file or --burst-* fails before any start
    if args.vocab is None:
        config = args.model / "config.json"
        if not config.exists():
            raise SystemExit(f"no {config}: give --model or --vocab")
        args.vocab = int(json.loads(config.read_text())["vocab_size"])
    if getattr(args, "replicas", None) is not None and args.replicas < 1:
        raise SystemExit("--replicas must be at least 1")
    if args.verb == "run":
        if args.rate is None and not args.sweep:
            args.sweep = True
        return run_command(args)
    return compare_command(args)

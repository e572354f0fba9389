"""`sloserve simulate`: the benchmark's workloads and capacity search, on the virtual engine.

The same scenarios, analysis and capacity search as `sloserve bench`, so a simulated capacity
reads like a measured one; only the engine is the step-time model. Simulation is cheap, so a
load point defaults to the methodology's full 1,000 requests.

`--replicas 1,2,4,8` measures scaling instead: each routing policy of the gateway in front of
N virtual engines (simulator_cluster.py), capacity per N, and the scaling efficiency
capacity(N) / (N x capacity(1)) of methodology §3. A load point then has N times `--requests`
requests, so each replica sees as many as one replica alone does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sloserve.bench import report, workload_options
from sloserve.bench.analysis import RunStats, analyze
from sloserve.bench.capacity import CapacityResult, find_capacity, fluid_bound
from sloserve.bench.cli import CPU_LENGTH_SCALE, FULL, seed_list
from sloserve.bench.presets import LengthScale
from sloserve.bench.protocol import RatioEstimate, best_of, ratio, run_protocol
from sloserve.bench.workloads import Workload
from sloserve.gateway.routing import POLICIES as ROUTINGS
from sloserve.simulator import SimResult, SimStats, simulate
from sloserve.simulator_cluster import simulate_cluster
from sloserve.simulator_policies import (
    POLICIES,
    VLLM_DEFAULT,
    VLLM_STANDINS,
    VLLM_TUNED,
    EngineLimits,
    vllm_standins,
)
from sloserve.stepmodel import StepTimeModel, shipped_profile

DEFAULT_PROFILE = "cpu-bench"
DEFAULT_REQUESTS = 1000
# KV capacity when neither --kv-tokens nor the profile (engine.kv_capacity_tokens) says: the
# bench model (6 layers x 384 hidden, bf16: 2 x 6 x 384 x 2 = 9,216 bytes per token) in the
# 1 GiB cache that `bench compare` gives every system.
DEFAULT_KV_TOKENS = (1 << 30) // 9216
# `--policy` names these groups as well as single policies: every policy, every stand-in for
# stock vLLM (its default and its tuned variants), the tuned variants alone.
POLICY_GROUPS = {"all": POLICIES, "vllm": VLLM_STANDINS, "vllm-tuned": VLLM_TUNED}


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _profile(args: argparse.Namespace) -> tuple[StepTimeModel, str]:
    if args.profile is not None:
        return StepTimeModel.load(args.profile), str(args.profile)
    name = args.profile_name or DEFAULT_PROFILE
    return shipped_profile(name), name


def _policies(text: str) -> list[str]:
    """`--policy`: comma-separated policies and groups (POLICY_GROUPS), in the order given."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part not in POLICIES and part not in POLICY_GROUPS:
            known = ", ".join([*POLICY_GROUPS, *POLICIES])
            raise argparse.ArgumentTypeError(f"unknown policy {part!r}; known: {known}")
        names += POLICY_GROUPS.get(part, (part,))
    return list(dict.fromkeys(names))


def _length_scale(args: argparse.Namespace, model: StepTimeModel) -> LengthScale:
    """The bench's CPU scaling for a CPU profile (its capacities are what `bench` measures),
    full lengths for a GPU one; --length-scale overrides both."""
    if args.length_scale is not None:
        max_len = model.metadata.get("engine", {}).get("max_model_len")
        factor = float(args.length_scale)
        return LengthScale(factor, factor, max_model_len=int(max_len) if max_len else None)
    if "cpu" in str(model.metadata.get("hardware", "")).lower():
        return CPU_LENGTH_SCALE
    return LengthScale()


@dataclass
class _Run:
    """The settings every load point shares, and the workloads built so far (each rate's
    workload is built once and served to every policy, so they see the same requests)."""

    args: argparse.Namespace
    model: StepTimeModel
    limits: EngineLimits
    scale: LengthScale
    workloads: dict[tuple[float, int, int], Workload] = field(default_factory=dict)
    simulated: int = 0  # requests simulated, for the speed report
    wall_s: float = 0.0

    def workload(self, rate: float, count: int, seed: int | None = None) -> Workload:
        seed = self.args.seed if seed is None else seed
        key = (rate, count, seed)
        if key not in self.workloads:
            # A scenario or a --trace-file, with any --burst-* (workload_options.py).
            self.workloads[key] = workload_options.resolve(self.args).build(
                model=self.model,
                rate=rate,
                count=count,
                seed=seed,
                scale=self.scale,
                trace_dir=self.args.trace_dir,
                chunk_tokens=self.limits.max_step_tokens,
            )
        return self.workloads[key]

    def run(
        self,
        policy: str,
        rate: float,
        count: int,
        replicas: int = 0,
        routing: str = "",
        seed: int | None = None,
    ) -> tuple[RunStats, SimStats]:
        """One load point on one engine, or, with `replicas`, on that many behind a router;
        `seed` picks the request stream (default --seed)."""
        seed = self.args.seed if seed is None else seed
        requests = self.workload(rate, count, seed).requests
        noise_seed = seed if self.args.noise else None
        overhead_s = self.args.step_overhead_ms / 1000
        result: SimResult
        if replicas:
            result = simulate_cluster(
                requests,
                self.model,
                self.limits,
                replicas,
                routing,
                policy,
                noise_seed=noise_seed,
                step_overhead_s=overhead_s,
            )
        else:
            result = simulate(
                requests,
                self.model,
                self.limits,
                policy,
                noise_seed=noise_seed,
                step_overhead_s=overhead_s,
                reasoning_end_visible=self.reasoning_end_visible,
            )
        self.simulated += len(result.records)
        self.wall_s += result.stats.wall_s
        return analyze(result.records), result.stats

    @property
    def reasoning_end_visible(self) -> bool:
        """Whether the policy learns where a reasoning request's thinking ends: a GPU
        profile stands for a real reasoning model served with its reasoning parser; the CPU
        bench model is random weights, which end no thinking a parser could see."""
        if self.args.reasoning_parser is not None:
            return bool(self.args.reasoning_parser)
        return not self.model.on_cpu

    def fluid(self) -> float:
        """The §6 bound for the scenario, as `bench` computes it."""
        requests = self.workload(1.0, self.args.requests).requests
        prompt = sum(r.prompt_tokens for r in requests) / len(requests)
        output = sum(r.output_tokens for r in requests) / len(requests)
        tightest = min(min(r.budgets.tpot_s, r.budgets.thinking_tpot_s or 1e9) for r in requests)
        return fluid_bound(
            self.model, prompt, output, tightest, self.limits.max_running, prompt + output / 2
        )


def _describe(run: _Run, policies: list[str], profile_name: str) -> dict[str, Any]:
    args = run.args
    reference = run.workload(1.0, args.requests)
    return {
        "scenario": args.scenario,
        "simulated": True,
        "policies": policies,
        "requests_per_load_point": args.requests,
        "seed": args.seed,
        "noise": args.noise,
        "step_overhead_s": args.step_overhead_ms / 1000,
        "engine_limits": {
            "max_step_tokens": run.limits.max_step_tokens,
            "max_running": run.limits.max_running,
            "kv_capacity_tokens": run.limits.kv_capacity_tokens,
        },
        "length_scale": run.scale.describe(),
        # What each stand-in for stock vLLM runs with on this profile's hardware.
        "vllm_standins": {
            name: variant.to_json()
            for name, variant in vllm_standins(run.model, run.limits).items()
            if name in policies
        },
        "workload": reference.describe(),
        "profile_name": profile_name,
        "profile": run.model.to_json(),
        "command": " ".join(["sloserve", *sys.argv[1:]]),
    }


def _speed_table(rows: list[tuple[str, list[SimStats]]]) -> str:
    header = "| policy | load points | requests | steps | wall (s) | requests / wall s | "
    header += "preempted (admitted / best effort) |\n|" + " --- |" * 7 + "\n"
    lines = []
    for name, stats in rows:
        requests = sum(s.requests for s in stats)
        wall = sum(s.wall_s for s in stats)
        admitted = sum(s.preemptions["admitted"] for s in stats)
        best_effort = sum(s.preemptions["best_effort"] for s in stats)
        speed = f"{requests / wall:.0f}" if wall > 0 else report.MISSING
        lines.append(
            f"| {name} | {len(stats)} | {requests} | {sum(s.steps for s in stats)} | "
            f"{wall:.2f} | {speed} | {admitted} / {best_effort} |"
        )
    return header + "\n".join(lines) + "\n"


def _at_rate(run: _Run, policies: list[str]) -> tuple[dict[str, Any], str]:
    rate, count = float(run.args.rate), run.args.requests
    per_policy: dict[str, Any] = {}
    rows, speed = [], []
    for name in policies:
        stats, sim = run.run(name, rate, count)
        per_policy[name] = {"stats": stats.to_json(), "simulator": sim.to_json()}
        rows.append(
            report.AttainmentRow(name, rate, stats.attainment, stats.drain.drained, stats.meets())
        )
        speed.append((name, [sim]))
    markdown = (
        f"### {run.args.scenario} at {rate:g} req/s (simulated)\n\n"
        + report.markdown_table(rows)
        + "\n"
        + _speed_table(speed)
    )
    return {"rate": rate, "policies": per_policy}, markdown


def _sweep(run: _Run, policies: list[str]) -> tuple[dict[str, Any], str]:
    fluid = run.fluid()
    start = float(f"{max(fluid * FULL.start_fraction, 0.01):.2g}")
    results: dict[str, CapacityResult] = {}
    sims: dict[str, list[SimStats]] = {}
    for name in policies:
        _progress(f"== {name}")
        sims[name] = []

        def run_at(rate: float, name: str = name) -> RunStats:
            stats, sim = run.run(name, rate, run.args.requests)
            sims[name].append(sim)
            return stats

        results[name] = _search(run, start, run_at)
        _progress(f"== {name}: capacity {results[name].capacity:.3f} req/s")
    capacity = {name: results[name].capacity for name in policies}
    ratios = {
        f"sloserve/{base}": capacity["sloserve"] / capacity[base] if capacity[base] > 0 else None
        for base in policies
        if base != "sloserve" and "sloserve" in policies
    }
    # Stock vLLM as shipped, and at its best on this scenario (methodology §5).
    baselines = [VLLM_DEFAULT] if VLLM_DEFAULT in policies else []
    tuned = [name for name in policies if name in VLLM_TUNED]
    best_tuned = max(tuned, key=lambda name: capacity[name]) if tuned else None
    payload = {
        "fluid_bound_rps": fluid,
        "start_rate_rps": start,
        "capacity_ratios": ratios,
        "best_tuned_vllm": best_tuned,
        "policies": {
            name: {
                "capacity_rps": results[name].capacity,
                "capacity_99_rps": results[name].capacity_99,
                "capacity_fraction_of_fluid_bound": capacity[name] / fluid if fluid else None,
                "search": results[name].to_json(),
                "simulator_by_trial": [s.to_json() for s in sims[name]],
            }
            for name in policies
        },
    }
    capacity_rows = [report.CapacityRow.from_result(n, results[n]) for n in policies]
    trial_rows = [row for n in policies for row in report.rows_from_capacity(n, results[n])]
    markdown = (
        f"### {run.args.scenario} (simulated, {run.args.requests} requests per load point)\n\n"
        + report.capacity_table(
            capacity_rows, fluid_bound=fluid, baselines=baselines, best_of=tuned
        )
        + "\n"
        + report.markdown_table(trial_rows)
        + "\n"
        + _speed_table([(name, sims[name]) for name in policies])
    )
    return payload, markdown


def _protocol(run: _Run, policies: list[str], seeds: list[int]) -> tuple[dict[str, Any], str]:
    """Each policy's capacity on every seed's stream (bench/protocol.py), and sloserve's
    ratios to stock vLLM's default and to its best tuned variant, paired by seed."""
    fluid = run.fluid()
    start = float(f"{max(fluid * FULL.start_fraction, 0.01):.2g}")

    def search(name: str, seed: int, low: float) -> CapacityResult:
        _progress(f"== {name}, seed {seed}, from {low:.4g} req/s")

        def run_at(rate: float) -> RunStats:
            return run.run(name, rate, run.args.requests, seed=seed)[0]

        result = _search(run, low, run_at)
        _progress(f"== {name}, seed {seed}: capacity {result.capacity:.3f} req/s")
        return result

    results = run_protocol(policies, seeds, dict.fromkeys(policies, start), search)
    tuned = [results[name] for name in policies if name in VLLM_TUNED]
    best = best_of(tuned)
    estimates: dict[str, RatioEstimate] = {}
    if "sloserve" in results:
        for label, other in (("vllm_default", results.get(VLLM_DEFAULT)), ("best_tuned", best)):
            if other is not None:
                estimates[f"sloserve_vs_{label}"] = ratio(results["sloserve"], other)
    payload = {
        "fluid_bound_rps": fluid,
        "start_rate_rps": start,
        "seeds": seeds,
        "best_tuned_vllm": best.system if best else None,
        "headline": {key: e.to_json() for key, e in estimates.items()},
        "policies": {name: capacity.to_json() for name, capacity in results.items()},
    }
    header = " | ".join(f"seed {seed}" for seed in seeds)
    lines = [
        f"### {run.args.scenario} (simulated, {run.args.requests} requests per load point, "
        f"{len(seeds)} seeds)\n",
        f"| policy | capacity (median, req/s) | min-max | {header} |",
        "| --- | --- | --- |" + " --- |" * len(seeds),
    ]
    for name, capacity in results.items():
        per_seed = " | ".join(f"{capacity.by_seed[seed].capacity:.3g}" for seed in seeds)
        values = capacity.capacities
        lines.append(
            f"| {name} | {capacity.median:.3g} | {min(values):.3g}-{max(values):.3g} | {per_seed} |"
        )
    lines.append("")
    for key, estimate in estimates.items():
        lines.append(f"- {key.replace('_', ' ')} ({estimate.denominator}): {estimate.describe()}")
    return payload, "\n".join(lines) + "\n"


def _search(run: _Run, start: float, run_at: Callable[[float], RunStats]) -> CapacityResult:
    return find_capacity(
        run_at,
        low=start,
        resolution=FULL.resolution,
        max_trials=FULL.max_trials,
        progress=_progress,
        growth=FULL.growth,
    )


def _scaling(
    run: _Run, policy: str, replica_counts: list[int], routings: list[str]
) -> tuple[dict[str, Any], str]:
    """Capacity of each routing at each replica count, and its scaling efficiency.

    One replica is routed alike by every policy, so capacity(1) is searched once and is
    every policy's denominator."""
    fluid = run.fluid()
    results: dict[tuple[int, str], CapacityResult] = {}
    for n in sorted(set([1, *replica_counts])):
        for routing in routings if n > 1 else routings[:1]:
            count = run.args.requests * n
            start = float(f"{max(fluid * n * FULL.start_fraction, 0.01):.2g}")
            _progress(f"== {n} replica(s), {routing} routing, {count} requests per load point")

            def run_at(
                rate: float, n: int = n, routing: str = routing, count: int = count
            ) -> RunStats:
                return run.run(policy, rate, count, replicas=n, routing=routing)[0]

            results[(n, routing)] = _search(run, start, run_at)
            _progress(f"== capacity {results[(n, routing)].capacity:.3f} req/s")
    one = results[(1, routings[0])].capacity
    rows: list[tuple[int, str, CapacityResult]] = []
    table: dict[str, dict[str, Any]] = {}
    for routing in routings:
        table[routing] = {}
        for n in replica_counts:
            result = results[(n, routing if n > 1 else routings[0])]
            efficiency = result.capacity / (n * one) if one > 0 else None
            rows.append((n, routing, result))
            table[routing][str(n)] = {
                "capacity_rps": result.capacity,
                "capacity_per_replica_rps": result.capacity / n,
                "scaling_efficiency": efficiency,
                "lower_bound": result.status == "no_failure",
                "search": result.to_json(),
            }
    payload = {
        "policy": policy,
        "fluid_bound_per_replica_rps": fluid,
        "capacity_1_replica_rps": one,
        "scaling": table,
    }
    return payload, _scaling_table(run, policy, rows, one)


def _scaling_table(
    run: _Run, policy: str, rows: list[tuple[int, str, CapacityResult]], one: float
) -> str:
    lines = [
        f"### {run.args.scenario}: scaling over replicas (simulated, {policy} scheduling, "
        f"{run.args.requests} requests per replica per load point)\n",
        "| replicas | routing | capacity (req/s) | per replica (req/s) | scaling efficiency |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, routing, result in rows:
        bound = ">= " if result.status == "no_failure" else ""
        efficiency = f"{result.capacity / (n * one):.2f}" if one > 0 else report.MISSING
        lines.append(
            f"| {n} | {routing} | {bound}{result.capacity:.3g} | "
            f"{result.capacity / n:.3g} | {efficiency} |"
        )
    return "\n".join(lines) + "\n"


def _replica_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"--replicas: comma-separated counts, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise SystemExit(f"--replicas: counts must be at least 1, got {text!r}")
    return counts


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate", help="run scheduling policies on a virtual engine (step-time model)"
    )
    workload_options.add_arguments(p)  # --scenario, or --trace-file; --burst-*
    p.add_argument("--out", type=Path, required=True, help="results directory")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--profile", type=Path, help="step profile file")
    which.add_argument("--profile-name", help=f"a shipped profile (default: {DEFAULT_PROFILE})")
    p.add_argument(
        "--policy",
        type=_policies,
        default="all",
        help="comma-separated policies to run, or groups: all (sloserve and every stand-in "
        "for stock vLLM), vllm (every stand-in), vllm-tuned (its tuned variants); "
        f"policies: {', '.join(POLICIES)} (default: all)",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rate", type=float, help="requests per second (default: --sweep)")
    how.add_argument("--sweep", action="store_true", help="search each policy's capacity")
    p.add_argument(
        "--requests",
        type=int,
        default=DEFAULT_REQUESTS,
        help=f"requests per load point (default: {DEFAULT_REQUESTS})",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reasoning-parser",
        action=argparse.BooleanOptionalAction,
        help="whether the replica sees where a reasoning request's thinking ends, as with "
        "vLLM's reasoning parser of a real reasoning model (default: on for a GPU profile, "
        "off for a CPU one, whose random-weight bench model ends no thinking)",
    )
    p.add_argument(
        "--seeds",
        type=seed_list,
        metavar="LIST",
        help="with --sweep: search every policy on each seed's stream (e.g. 0,1,2; the "
        "methodology's 3), policies rotated per seed; ratios paired by seed, with their spread",
    )
    p.add_argument(
        "--length-scale",
        type=float,
        help="prompt and output length factor (default: 1/8 on a CPU profile, else 1)",
    )
    p.add_argument(
        "--trace-dir",
        type=Path,
        help="folder of the Azure LLM traces (chatbot, coding, coding-burst, reasoning-burst, "
        "mixed)",
    )
    p.add_argument(
        "--kv-tokens",
        type=int,
        help="KV cache capacity in tokens (default: the profile's engine.kv_capacity_tokens, "
        f"else {DEFAULT_KV_TOKENS})",
    )
    p.add_argument(
        "--noise", action="store_true", help="scatter step times as the profile's residuals"
    )
    p.add_argument(
        "--replicas",
        help="comma-separated replica counts (1,2,4,8): scaling of each routing policy "
        "behind a simulated gateway, instead of one engine",
    )
    p.add_argument(
        "--routing",
        default="all",
        choices=[*ROUTINGS, "all"],
        help="with --replicas: the gateway's routing policy (default: all)",
    )
    p.add_argument(
        "--step-overhead-ms",
        type=float,
        help="fixed time added to every step (default: the profile's step_overhead_s, else 0)",
    )


def main(args: argparse.Namespace) -> int:
    workload_options.resolve(args)  # a bad --trace-file or --burst-* fails first
    model, profile_name = _profile(args)
    # What the user leaves out, the profile says where it can: a GPU profile carries its
    # card's KV capacity and the host's fixed time per step (published_profile.py).
    if args.kv_tokens is None:
        engine = model.metadata.get("engine", {})
        args.kv_tokens = int(engine.get("kv_capacity_tokens", DEFAULT_KV_TOKENS))
    if args.step_overhead_ms is None:
        args.step_overhead_ms = float(model.metadata.get("step_overhead_s", 0.0)) * 1000
    if args.requests < 1 or args.kv_tokens < 1:
        raise SystemExit("--requests and --kv-tokens must be positive")
    limits = EngineLimits.from_profile(model, args.kv_tokens)
    run = _Run(args, model, limits, _length_scale(args, model))
    policies: list[str] = args.policy
    started = time.perf_counter()
    payload = _describe(run, policies, profile_name)
    if args.replicas is not None:
        if args.rate is not None:
            raise SystemExit("--replicas searches capacities: leave out --rate")
        # Scaling is the routing's question: every replica runs the SLO scheduler unless
        # one policy is named.
        if len(policies) > 1 and policies != list(POLICIES):
            raise SystemExit("--replicas runs one policy on every replica: name one")
        policy = policies[0] if len(policies) == 1 else "sloserve"
        routings = list(ROUTINGS) if args.routing == "all" else [args.routing]
        payload["policies"] = [policy]
        results, markdown = _scaling(run, policy, _replica_counts(args.replicas), routings)
    elif args.rate is not None:
        results, markdown = _at_rate(run, policies)
    elif args.seeds is not None:
        results, markdown = _protocol(run, policies, args.seeds)
    else:
        results, markdown = _sweep(run, policies)
    elapsed = time.perf_counter() - started
    payload |= results | {
        "simulated_requests": run.simulated,
        "simulation_wall_s": run.wall_s,
        "total_wall_s": elapsed,
    }
    markdown += (
        f"\n{run.simulated} requests simulated in {run.wall_s:.1f} s "
        f"({run.simulated / max(run.wall_s, 1e-9):.0f} requests per wall second; "
        f"{elapsed:.1f} s in all)\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_results(args.out / "summary.json", payload)
    (args.out / "summary.md").write_text(markdown)
    print(markdown)
    return 0

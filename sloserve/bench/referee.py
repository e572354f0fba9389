"""`sloserve bench referee`: vLLM's own benchmark client judges sloserve against stock vLLM.

The product path, measured by a client nobody here wrote: `vllm bench serve --goodput` (run as
`sloserve vllm bench serve`, sloserve/vllm_cli.py), with the same command line against
- `vllm-default`: stock vLLM's OpenAI server, its default settings, and
- `sloserve`: a sloserve gateway (OpenAI HTTP) in front of one sloserve replica,
the SLO class named in a header (`x-sloserve-slo-class`, which stock vLLM ignores) and the
class's budgets as `--goodput ttft:MS tpot:MS`. Each run starts each system afresh and offers
every rate in turn, lowest first; runs alternate which system goes first, and run i uses seed i
for both, so the two see the same prompts. `--mixed` runs two clients at once, one per class
(chat and coding), each at the rate.

Goodput is vLLM's: completed requests whose TTFT and mean TPOT (the client's) are within the
budgets, per second of the run. Requests the gateway turns away (HTTP 429) count as failed.
For sloserve the gateway's own attainment over the same requests (its SLO summary, before and
after) is kept beside the client's, to show where the two clocks disagree; the gateway judges
every token against its deadline (methodology §2), vLLM's client the mean TPOT, and the
client's one warm-up request is among the gateway's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import median
from typing import Any

from sloserve.bench import process_cpu, report
from sloserve.bench.systems import SYSTEMS, EngineShape, running
from sloserve.bench.targets import TargetKind
from sloserve.machine import cpu_description
from sloserve.slo import SloCatalog

SYSTEM_NAMES = ("vllm-default", "sloserve")
CLASS_HEADER = "x-sloserve-slo-class"
CLIENT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class RefereeSettings:
    model: Path
    out: Path
    rates: tuple[float, ...]
    runs: int = 3
    num_prompts: int = 300
    input_len: int = 128
    output_len: int = 128
    classes: tuple[str, ...] = ("chat",)  # one client per class, at once
    profile: Path | None = None  # what sloserve's replica plans with
    kv_cache_gib: float = 1.0
    max_model_len: int = 1024


@dataclass(frozen=True)
class ClientResult:
    """One `vllm bench serve` run, as it reported itself (plus the gateway's view)."""

    system: str
    run: int
    rate: float  # offered by this client, req/s
    slo_class: str
    num_prompts: int
    completed: int
    failed: int
    good: int  # completed within the budgets, by vLLM's goodput
    duration_s: float
    goodput_rps: float
    mean_ttft_ms: float
    p99_ttft_ms: float
    mean_tpot_ms: float
    p99_tpot_ms: float
    # sloserve only: the gateway's attained / arrived over the same window; None otherwise.
    gateway_attainment: float | None = None
    gateway_arrived: int | None = None
    tokens: int = 0  # output tokens streamed to this client
    # CPU microseconds per streamed token of each serving role over the load point (every
    # client's tokens together), process_cpu.Role values as keys; None until measured.
    cpu_us_per_token: dict[str, float] | None = None

    @property
    def client_attainment(self) -> float:
        return self.good / self.num_prompts


def _budgets(slo_class: str) -> tuple[float, float]:
    """The class's TTFT and TPOT in ms, from the default classes sloserve is given."""
    found = SloCatalog.default().get(slo_class)
    if found is None:
        raise ValueError(f"no SLO class {slo_class!r} among the default classes")
    return found.budgets.ttft_s * 1000, found.budgets.tpot_s * 1000


def client_command(
    settings: RefereeSettings, base_url: str, model_id: str, slo_class: str, rate: float,
    seed: int, result_file: Path,
) -> list[str]:  # fmt: skip
    ttft_ms, tpot_ms = _budgets(slo_class)
    return [
        sys.executable, "-m", "sloserve", "vllm", "bench", "serve",
        "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
        "--model", model_id, "--tokenizer", str(settings.model),
        "--dataset-name", "random", "--random-input-len", str(settings.input_len),
        "--random-output-len", str(settings.output_len), "--ignore-eos",
        "--num-prompts", str(settings.num_prompts), "--request-rate", f"{rate:g}",
        "--seed", str(seed), "--goodput", f"ttft:{ttft_ms:g}", f"tpot:{tpot_ms:g}",
        "--header", f"{CLASS_HEADER}={slo_class}",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result_file.parent),
        "--result-filename", result_file.name,
    ]  # fmt: skip


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _gateway_tally(base_url: str, slo_class: str) -> tuple[int, int] | None:
    """(arrived, attained) of the class in a sloserve gateway's SLO summary."""
    try:
        summary = _get_json(f"{base_url}/v1/slo/summary")
    except OSError:
        return None
    tally = summary.get("classes", {}).get(slo_class, {})
    return int(tally.get("arrived", 0)), int(tally.get("attained", 0))


def _run_client(
    settings: RefereeSettings, system: str, run: int, base_url: str, model_id: str,
    slo_class: str, rate: float, log_dir: Path,
) -> ClientResult:  # fmt: skip
    stem = f"{system}-run{run}-{slo_class}-{rate:g}"
    result_file = log_dir / f"{stem}.json"
    command = client_command(settings, base_url, model_id, slo_class, rate, run, result_file)
    with (log_dir / f"{stem}.log").open("wb") as log:
        code = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, timeout=CLIENT_TIMEOUT_S
        ).returncode
    if code != 0 or not result_file.exists():
        raise RuntimeError(f"vllm bench serve failed (exit {code}); see {log_dir / stem}.log")
    data = json.loads(result_file.read_text())
    duration = float(data["duration"])
    goodput = float(data["request_goodput"] or 0.0)
    return ClientResult(
        system=system, run=run, rate=rate, slo_class=slo_class,
        num_prompts=settings.num_prompts, completed=int(data["completed"]),
        failed=int(data["failed"]), good=round(goodput * duration), duration_s=duration,
        goodput_rps=goodput, mean_ttft_ms=float(data["mean_ttft_ms"]),
        p99_ttft_ms=float(data["p99_ttft_ms"]), mean_tpot_ms=float(data["mean_tpot_ms"]),
        p99_tpot_ms=float(data["p99_tpot_ms"]), tokens=int(data["total_output_tokens"]),
    )  # fmt: skip


def _load_point(
    settings: RefereeSettings, system: str, run: int, base_url: str, model_id: str,
    rate: float, log_dir: Path,
) -> list[ClientResult]:  # fmt: skip
    """Every class's client at `rate`, at once; with the gateway's tallies around them."""
    gateway = system != "vllm-default"
    before = {c: _gateway_tally(base_url, c) for c in settings.classes} if gateway else {}
    cpu_before = process_cpu.cpu_by_role()
    with ThreadPoolExecutor(len(settings.classes)) as pool:
        futures = [
            pool.submit(_run_client, settings, system, run, base_url, model_id, c, rate, log_dir)
            for c in settings.classes
        ]
        results = [f.result() for f in futures]
    cpu = process_cpu.difference(process_cpu.cpu_by_role(), cpu_before)
    tokens = sum(r.tokens for r in results)
    serving = set(process_cpu.Role) - {process_cpu.Role.CLIENT, process_cpu.Role.OTHER}
    per_token = {
        role.value: 1e6 * seconds / tokens for role, seconds in cpu.items() if role in serving
    } if tokens else None  # fmt: skip
    time.sleep(1.0)  # the gateway tallies a request once its stream has ended
    judged = []
    for result in results:
        gateway_view: dict[str, Any] = {}
        start = before.get(result.slo_class)
        end = _gateway_tally(base_url, result.slo_class) if gateway else None
        if start is not None and end is not None and end[0] > start[0]:
            arrived, attained = end[0] - start[0], end[1] - start[1]
            gateway_view = {"gateway_attainment": attained / arrived, "gateway_arrived": arrived}
        judged.append(replace(result, cpu_us_per_token=per_token, **gateway_view))
    return judged


def run_referee(settings: RefereeSettings) -> list[ClientResult]:
    shape = EngineShape(
        model=settings.model, max_model_len=settings.max_model_len,
        kv_cache_gib=settings.kv_cache_gib, profile=settings.profile,
    )  # fmt: skip
    log_dir = settings.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results: list[ClientResult] = []
    for run in range(settings.runs):
        order = SYSTEM_NAMES if run % 2 == 0 else tuple(reversed(SYSTEM_NAMES))
        for system in order:
            with running(SYSTEMS[system], shape, log_dir / f"{system}-run{run}.log") as target:
                kind, _, base_url = target.partition(":")
                assert kind in (TargetKind.OPENAI.value, TargetKind.SLOSERVE_OPENAI.value)
                model_id = str(_get_json(f"{base_url}/v1/models")["data"][0]["id"])
                for rate in settings.rates:
                    point = _load_point(settings, system, run, base_url, model_id, rate, log_dir)
                    for r in point:
                        print(_line(r), flush=True)
                    results.extend(point)
                    _save(settings, results)
    return results


def _line(r: ClientResult) -> str:
    gateway = (
        f", gateway attainment {100 * r.gateway_attainment:.1f}% of {r.gateway_arrived}"
        if r.gateway_attainment is not None
        else ""
    )
    cost = (
        ", CPU us/token " + " ".join(f"{k} {v:.0f}" for k, v in r.cpu_us_per_token.items())
        if r.cpu_us_per_token
        else ""
    )
    return (
        f"run {r.run} {r.system:<13} {r.slo_class:<7} {r.rate:>5g} req/s: goodput "
        f"{r.goodput_rps:6.2f} req/s ({100 * r.client_attainment:5.1f}% of {r.num_prompts}, "
        f"{r.failed} failed), TTFT mean {r.mean_ttft_ms:.0f} ms p99 {r.p99_ttft_ms:.0f}, "
        f"TPOT mean {r.mean_tpot_ms:.1f} ms p99 {r.p99_tpot_ms:.1f}{gateway}{cost}"
    )


def _save(settings: RefereeSettings, results: list[ClientResult]) -> None:
    report.write_results(
        settings.out / "referee.json",
        {
            "settings": {
                k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()
            },
            "machine": cpu_description(),
            "results": [asdict(r) for r in results],
        },
    )
    (settings.out / "referee.md").write_text(markdown(results) + "\n" + cost_markdown(results))


def markdown(results: list[ClientResult]) -> str:
    """Per class and rate: each system's goodput over the runs, and sloserve's ratio of
    medians; the client's attainment beside the gateway's own."""
    lines = [
        "| class | offered (req/s) | stock vLLM goodput | sloserve goodput | ratio (medians) "
        "| stock TTFT / TPOT mean (ms) | sloserve TTFT / TPOT mean (ms) "
        "| sloserve attainment: client / gateway |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r.slo_class, r.rate) for r in results})
    for slo_class, rate in keys:
        by = {
            s: [r for r in results if (r.system, r.slo_class, r.rate) == (s, slo_class, rate)]
            for s in SYSTEM_NAMES
        }
        stock, ours = by["vllm-default"], by["sloserve"]
        ratio = (
            f"{median([r.goodput_rps for r in ours]) / m:.2f}x"
            if stock and ours and (m := median([r.goodput_rps for r in stock])) > 0
            else "-"
        )
        agreement = ", ".join(
            f"{100 * r.client_attainment:.0f}/"
            + (f"{100 * r.gateway_attainment:.0f}" if r.gateway_attainment is not None else "-")
            for r in ours
        )
        lines.append(
            f"| {slo_class} | {rate:g} | {_goodputs(stock)} | {_goodputs(ours)} | {ratio} "
            f"| {_latency(stock)} | {_latency(ours)} | {agreement} |"
        )
    return "\n".join(lines) + "\n"


def cost_markdown(results: list[ClientResult]) -> str:
    """CPU microseconds per streamed token, per serving role: the median over runs of each
    load point (a load point's clients share one figure)."""
    roles = [
        r.value
        for r in process_cpu.Role
        if r not in (process_cpu.Role.CLIENT, process_cpu.Role.OTHER)
    ]
    lines = [
        "| system | offered (req/s, per client) | " + " | ".join(roles) + " | front path |",
        "|---|---|" + "---|" * (len(roles) + 1),
    ]
    points = sorted({(r.system, r.rate) for r in results if r.cpu_us_per_token})
    for system, rate in points:
        runs = {
            r.run: r.cpu_us_per_token
            for r in results
            if (r.system, r.rate) == (system, rate) and r.cpu_us_per_token
        }
        cells = []
        for role in roles:
            values = [cost[role] for cost in runs.values() if role in cost]
            cells.append(f"{median(values):.0f}" if values else "-")
        front = [
            sum(v for k, v in cost.items() if k != process_cpu.Role.ENGINE_CORE.value)
            for cost in runs.values()
        ]
        lines.append(f"| {system} | {rate:g} | " + " | ".join(cells) + f" | {median(front):.0f} |")
    return "\n".join(lines) + "\n"


def _goodputs(results: list[ClientResult]) -> str:
    return ", ".join(f"{r.goodput_rps:.1f}" for r in results) or "-"


def _latency(results: list[ClientResult]) -> str:
    if not results:
        return "-"
    ttft = median([r.mean_ttft_ms for r in results])
    tpot = median([r.mean_tpot_ms for r in results])
    return f"{ttft:.0f} / {tpot:.1f}"


def add_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = verbs.add_parser(
        "referee",
        help="vLLM's own `vllm bench serve --goodput` against sloserve's gateway and stock vLLM",
    )
    p.add_argument("--model", type=Path, default=Path(".models/tiny"), help="model directory")
    p.add_argument("--out", type=Path, required=True, help="results directory")
    p.add_argument(
        "--rates", default="10,20,40,60", help="offered req/s per client (default: 10,20,40,60)"
    )
    p.add_argument("--runs", type=int, default=3, help="runs per system, alternated (default: 3)")
    p.add_argument("--num-prompts", type=int, default=300, help="requests per client and rate")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--mixed",
        action="store_true",
        help="two clients at once, chat and coding, each at the rate (default: chat alone)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        help="step profile sloserve's replica plans with (default: MODEL/step-profile.json)",
    )
    p.add_argument("--kv-cache-gib", type=float, default=1.0)


def command(args: argparse.Namespace) -> int:
    profile = args.profile or args.model / "step-profile.json"
    if not profile.is_file():
        raise SystemExit(
            f"no step profile at {profile}: measure one for this model on this machine "
            f"(sloserve profile --model {args.model} --quick --enforce-eager) or give --profile"
        )
    try:
        rates = tuple(float(r) for r in args.rates.split(","))
    except ValueError:
        raise SystemExit(
            f"--rates: {args.rates!r} is not a comma-separated list of rates"
        ) from None
    if args.runs < 1 or args.num_prompts < 1 or any(r <= 0 for r in rates):
        raise SystemExit("--runs, --num-prompts and every rate must be positive")
    settings = RefereeSettings(
        model=args.model, out=args.out, rates=rates, runs=args.runs,
        num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
        classes=("chat", "coding") if args.mixed else ("chat",), profile=profile,
        kv_cache_gib=args.kv_cache_gib,
    )  # fmt: skip
    results = run_referee(settings)
    print(markdown(results) + "\n" + cost_markdown(results), end="")
    return 0

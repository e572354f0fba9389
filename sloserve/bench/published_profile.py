"""`sloserve profile-published`: a step profile fitted to published GPU measurements.

No GPU is needed to ship a GPU profile when someone has published per-operation timings of
the model on the card: Microsoft Vidur's profiling data (sloserve.bench.vidur_tables). This
module composes those timings into whole engine steps, as Vidur's own execution-time
predictor does, on a grid of step shapes (decode batches, prefill chunks alone and mixed with
decodes), and fits sloserve's StepTimeModel to them with the same max-affine regression as a
measured profile (stepmodel.fit), scored on held-out shapes.

A step of `b` decoding requests of `d` cached tokens each, plus one prefill chunk of `c`
tokens over `p` cached tokens, takes (Vidur's ExecutionTime.total_time at tensor
parallelism 1, without the Ray RPC of its multi-worker runtime)

    layers x [ linear(b + c) + decode_attention(b, d) x (1 + f) + prefill_attention(c, p)
               + kv_write_prefill(c) + kv_write_decode(b) ]
    + host(b + 1)

where `f` is Vidur's decode batching overhead for grouped-query models (0.1 when b > 1) and
`host(n)` its CPU overhead per scheduler iteration for a batch of n requests. The host time's
fixed part is not fitted: it becomes the profile's `step_overhead_s`, which the simulator adds
to every step; its per-request part stays in the fitted steps.
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from sloserve.bench import vidur_tables
from sloserve.bench.vidur_tables import (
    MODELS,
    Attention,
    CpuOverhead,
    Curve,
    LinearOps,
    ModelShape,
    Surface,
    TableError,
    Timing,
    TimingSurface,
)
from sloserve.stepmodel import RESIDUAL_QUANTILES, StepSample, StepShape, StepTimeModel, fit

VIDUR_REPOSITORY = "microsoft/vidur"
# Vidur's predictor defaults (vidur/config/config.py, BaseExecutionTimePredictorConfig): a
# modelling constant, not a measurement; applied to grouped-query models only, as there.
DECODE_BATCHING_OVERHEAD = 0.1
# Engine limits: vLLM's max_num_seqs default, and Vidur's prediction_max_prefill_chunk_size
# (its predictor's largest chunk, inside the densely profiled chunk sizes).
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 4096
GPU_MEMORY_UTILIZATION = 0.9

# The grid of step shapes. Values past the engine limits are dropped (build_grid).
DECODE_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
DECODE_CONTEXTS = (1, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8191)
PREFILL_CHUNKS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
PREFILL_CONTEXTS = (0, 512, 1024, 2048, 4096, 6144)
MIXED_CHUNKS = (64, 256, 512, 1024, 2048, 4096)
MIXED_DECODES = (4, 16, 64, 128, 255)
MIXED_DECODE_CONTEXTS = (512, 2048)
MIXED_PREFILL_CONTEXTS = (0, 2048)
# Standard-normal quantiles that stand for the measurement noise of one shape (deterministic,
# so the shipped profile is reproducible).
NOISE_DRAWS = tuple(NormalDist().inv_cdf((k + 0.5) / 41) for k in range(41))


@dataclass(frozen=True)
class Limits:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    kv_capacity_tokens: int


@dataclass(frozen=True)
class Step:
    """One engine step: `decodes` requests of `decode_kv` cached tokens each, and a prefill
    chunk of `chunk` tokens over `chunk_kv` cached tokens (chunk 0: none)."""

    decodes: int
    decode_kv: int
    chunk: int = 0
    chunk_kv: int = 0

    @property
    def requests(self) -> int:
        return self.decodes + (1 if self.chunk else 0)

    @property
    def shape(self) -> StepShape:
        """As the simulator sees it: context counts each request's KV after the step."""
        context = self.decodes * (self.decode_kv + 1)
        if self.chunk:
            context += self.chunk_kv + self.chunk
        return StepShape(self.decodes + self.chunk, self.requests, context)


def build_grid(limits: Limits) -> list[Step]:
    """Decode-only, prefill-only and mixed steps within the engine's limits."""
    candidates = [Step(b, d) for b in DECODE_BATCHES for d in DECODE_CONTEXTS]
    candidates += [Step(0, 0, c, p) for c in PREFILL_CHUNKS for p in PREFILL_CONTEXTS]
    candidates += [
        Step(b, d, c - b if c + b > limits.max_num_batched_tokens else c, p)
        for c in MIXED_CHUNKS
        for b in MIXED_DECODES
        for d in MIXED_DECODE_CONTEXTS
        for p in MIXED_PREFILL_CONTEXTS
    ]

    def fits(step: Step) -> bool:
        shape = step.shape
        return (
            0 < shape.tokens <= limits.max_num_batched_tokens
            and step.requests <= limits.max_num_seqs
            and step.decode_kv < limits.max_model_len
            and step.chunk_kv + step.chunk <= limits.max_model_len
            and shape.context_tokens <= limits.kv_capacity_tokens
        )

    return sorted(
        {s for s in candidates if fits(s)},
        key=lambda s: (s.chunk, s.decodes, s.decode_kv, s.chunk_kv),
    )


@dataclass(frozen=True)
class StepTimes:
    """Whole-step times composed from Vidur's per-op tables for one model."""

    model: ModelShape
    linear: LinearOps
    attention: Attention
    cpu: CpuOverhead | None
    decode_batching_overhead: float = DECODE_BATCHING_OVERHEAD

    def _per_layer(self, step: Step, spread: bool = False) -> float:
        """ms per layer: the ops' medians, or (`spread`) their standard deviations."""

        def curve(t: Timing) -> Curve:
            return t.std if spread else t.median

        def surface(t: TimingSurface) -> Surface:
            return t.std if spread else t.median

        attn = self.attention
        total = curve(self.linear.per_layer)(step.decodes + step.chunk)
        if step.decodes:
            factor = 1.0
            if self.model.grouped_query and step.decodes > 1:
                factor += self.decode_batching_overhead
            total += surface(attn.decode)(step.decode_kv, step.decodes) * factor
            total += curve(attn.decode_save)(step.decodes)
        if step.chunk:
            total += surface(attn.prefill)(step.chunk, step.chunk_kv)
            total += curve(attn.prefill_save)(step.chunk)
        return total

    def seconds(self, step: Step) -> float:
        """Step time less the host's fixed per-step part (that is step_overhead_s)."""
        ms = self.model.num_layers * self._per_layer(step)
        if self.cpu is not None:
            ms += self.cpu.per_request_ms * step.requests
        return ms / 1000

    def relative_spread(self, step: Step) -> float:
        """Vidur's measured standard deviation of the step, as a fraction of its time: the
        layers' op spreads added up (as if fully correlated: an upper bound)."""
        std_s = self.model.num_layers * self._per_layer(step, spread=True) / 1000
        return std_s / self.seconds(step)


def combined_residual_quantiles(
    relative_residuals: Sequence[float], spreads: Sequence[float]
) -> dict[str, float]:
    """Quantiles of actual / predicted - 1 when a step's actual time is Vidur's median scattered
    by its measured spread: (1 + fit residual) x (1 + spread x z) - 1 over standard-normal z."""
    e = np.asarray(relative_residuals)[:, None]
    s = np.asarray(spreads)[:, None]
    z = np.asarray(NOISE_DRAWS)[None, :]
    combined = ((1 + e) * (1 + s * z) - 1).ravel()
    return {f"p{round(q * 100)}": float(np.quantile(combined, q)) for q in RESIDUAL_QUANTILES}


@dataclass(frozen=True)
class Source:
    """Where a table came from, as cited in the profile."""

    path: str
    commit: str
    what: str
    rows_used: int

    def to_json(self) -> dict[str, Any]:
        return {
            "repository": VIDUR_REPOSITORY,
            "path": self.path,
            "commit": self.commit,
            "what": self.what,
            "rows_used": self.rows_used,
        }


def build_profile(
    times: StepTimes,
    device: str,
    limits: Limits,
    sources: Sequence[Source],
    notes: Sequence[str] = (),
    seed: int = 0,
) -> StepTimeModel:
    """Fits the step-time model to the composed grid and records where every number is from."""
    steps = build_grid(limits)
    samples = [StepSample(step.shape, times.seconds(step)) for step in steps]
    model = fit(samples, seed=seed)
    assert model.quality is not None
    heldout_quantiles = dict(model.residual_quantiles)
    relative = [s.seconds / model.predict(s.shape) - 1 for s in samples]
    spreads = [times.relative_spread(step) for step in steps]
    model.residual_quantiles = combined_residual_quantiles(relative, spreads)
    model.metadata = _metadata(times, device, limits, sources, notes, steps, spreads)
    model.metadata["fit_heldout_residual_quantiles"] = heldout_quantiles
    return model


def _metadata(
    times: StepTimes,
    device: str,
    limits: Limits,
    sources: Sequence[Source],
    notes: Sequence[str],
    steps: Sequence[Step],
    spreads: Sequence[float],
) -> dict[str, Any]:
    m = times.model
    cpu = times.cpu
    memory_gib = vidur_tables.DEVICE_MEMORY_BYTES[device] / vidur_tables.GiB
    spread = np.asarray(spreads)
    metadata: dict[str, Any] = {
        "model": m.name,
        "hardware": vidur_tables.DEVICE_NAMES[device],
        "vllm_version": None,
        "derived": False,
        "source": (
            f"fitted to Microsoft Vidur's published per-operation GPU timings of {m.name} on "
            f"{device.upper()} (tensor parallelism 1), composed into whole steps as Vidur's "
            "execution-time predictor does; `sloserve profile-published` rebuilds it"
        ),
        "sources": [s.to_json() for s in sources],
        "provenance": {
            "measured (Vidur)": [
                "per-layer times of the token-parallel ops (norms, QKV/output projections, "
                "rotary embedding, gated MLP, residual add) by tokens: mlp.csv medians",
                "attention prefill by (chunk, cached tokens), attention decode by (batch, "
                "cached tokens per request), K/V cache writes: attention.csv medians",
                "the spread of every op: the same tables' standard deviations",
                *(
                    ["host time per scheduler iteration by batch size: cpu_overheads.csv"]
                    if cpu
                    else []
                ),
            ],
            "derived (sloserve)": [
                "step times between measured shapes: linear interpolation of the tables; "
                "outside them the nearest measured value is held",
                f"x {m.num_layers} layers"
                + (
                    f"; decode attention x {1 + times.decode_batching_overhead:g} for batches "
                    "over 1 (Vidur predictor's constant for grouped-query models)"
                    if m.grouped_query
                    else ""
                ),
                "the pieces: max-affine least squares (stepmodel.fit) over the grid, scored "
                "on held-out shapes",
                "residual_quantiles: fit residuals combined with the measured spread",
                "engine.kv_capacity_tokens: from GPU memory, utilization and model shape",
                *(
                    ["step_overhead_s and request_overhead_s: from the host times (see notes)"]
                    if cpu
                    else ["no host times: step_overhead_s and request_overhead_s are 0"]
                ),
            ],
        },
        "engine": {
            "max_num_batched_tokens": limits.max_num_batched_tokens,
            "max_num_seqs": limits.max_num_seqs,
            "max_model_len": limits.max_model_len,
            "kv_capacity_tokens": limits.kv_capacity_tokens,
            "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
        },
        "engine_note": (
            f"max_num_seqs {limits.max_num_seqs} is vLLM's default; max_num_batched_tokens "
            f"{limits.max_num_batched_tokens} is Vidur's prediction_max_prefill_chunk_size; "
            f"max_model_len {limits.max_model_len}. kv_capacity_tokens = ({memory_gib:g} GiB x "
            f"{GPU_MEMORY_UTILIZATION} - {m.weight_bytes / 1e9:g} GB of bf16 weights) / "
            f"{m.kv_bytes_per_token()} bytes per token (2 (K, V) x {m.num_layers} layers x "
            f"{m.num_kv_heads} KV heads x {m.head_dim} head dim x 2 bytes); activations and "
            "CUDA graphs, which take a few GiB more on a real engine, are not subtracted"
        ),
        "step_overhead_s": cpu.per_step_ms / 1000 if cpu else 0.0,
        "request_overhead_s": cpu.request_overhead_ms / 1000 if cpu else 0.0,
        "grid": {
            "steps": len(steps),
            "decode_only": sum(1 for s in steps if not s.chunk),
            "prefill_only": sum(1 for s in steps if s.chunk and not s.decodes),
            "mixed": sum(1 for s in steps if s.chunk and s.decodes),
        },
        "measured_relative_spread": {
            f"p{q}": float(np.percentile(spread, q)) for q in (50, 90, 99)
        },
        "residual_quantiles_note": (
            "actual / predicted - 1 where actual is a grid step's composed median scattered "
            "by its measured spread: (1 + e) x (1 + s z) - 1 over every grid step's fit "
            "residual e (the fit has at most 12 coefficients, so its in-sample and held-out "
            "residuals agree: see fit_heldout_residual_quantiles) and 41 standard-normal "
            "quantiles z; s is the step's Vidur standard deviation relative to its time, the "
            "layers' op spreads added up"
        ),
        "notes": list(notes),
    }
    if cpu:
        metadata["step_overhead_note"] = (
            "derived from Vidur's host times per scheduler iteration (schedule + prepare "
            "inputs + sampler + process outputs, medians) of "
            f"{cpu.model_name} at tensor parallelism 1, batch sizes {cpu.batch_sizes[0]}-"
            f"{cpu.batch_sizes[-1]}: a least-squares line gives {cpu.per_step_ms:.3f} ms per "
            f"step (here) + {cpu.per_request_ms * 1000:.1f} us per request in the batch (in "
            "the fitted step times)"
        )
        metadata["request_overhead_note"] = (
            "derived, not published: Vidur has no per-request figure. One scheduling pass "
            "plus one output processing at the smallest batch Vidur timed "
            f"({cpu.batch_sizes[0]}): {cpu.request_overhead_ms:.3f} ms. It leaves out the "
            "HTTP front end, tokenization and detokenization, which a served request also pays"
        )
    return metadata


# -- the command -----------------------------------------------------------------------------


def _git_commit(directory: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _repo_path(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "profile-published",
        help="fit a step profile to Microsoft Vidur's published GPU timings (no GPU needed)",
    )
    p.add_argument("--vidur-dir", type=Path, required=True, help="a checkout of microsoft/vidur")
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--device", required=True, choices=sorted(vidur_tables.DEVICE_MEMORY_BYTES))
    p.add_argument("--out", type=Path, required=True, help="profile file to write")
    p.add_argument("--vidur-commit", help="commit of --vidur-dir to cite (default: its git HEAD)")
    p.add_argument(
        "--cpu-overheads",
        type=Path,
        help="Vidur's cpu_overheads.csv (data/profiling/<device>/ in commits up to May 2024)",
    )
    p.add_argument("--cpu-overheads-commit", help="commit of that file, to cite")
    p.add_argument("--cpu-overheads-model", help="whose host times to use (default: --model)")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--note", action="append", default=[], help="a line for the profile's notes")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    model = MODELS[args.model]
    device: str = args.device
    compute = Path("data/profiling/compute") / device / args.model
    commit = args.vidur_commit or _git_commit(args.vidur_dir) or "unknown"
    try:
        linear = vidur_tables.read_linear_ops(args.vidur_dir / compute / "mlp.csv", model)
        attention = vidur_tables.read_attention(args.vidur_dir / compute / "attention.csv", model)
        cpu = None
        if args.cpu_overheads is not None:
            cpu = vidur_tables.read_cpu_overhead(
                args.cpu_overheads, args.cpu_overheads_model or args.model
            )
    except TableError as error:
        raise SystemExit(f"profile-published: {error}") from None
    sources = [
        Source((compute / "mlp.csv").as_posix(), commit, "token-parallel ops", linear.rows),
        Source((compute / "attention.csv").as_posix(), commit, "attention", attention.rows),
    ]
    notes = list(args.note)
    if cpu is not None:
        cpu_commit = args.cpu_overheads_commit or _git_commit(args.vidur_dir) or "unknown"
        path = _repo_path(args.cpu_overheads, args.vidur_dir)
        sources.append(
            Source(path, cpu_commit, f"host times of {cpu.model_name}", len(cpu.batch_sizes))
        )
        if cpu.model_name != model.name:
            notes.append(
                f"Vidur publishes no host times for {model.name}: those of {cpu.model_name} "
                "stand in (the host's work does not depend on the model, except the sampler's "
                "LM head and softmax, which are smaller for that model's vocabulary)"
            )
    limits = Limits(
        max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        max_num_seqs=MAX_NUM_SEQS,
        max_model_len=args.max_model_len,
        kv_capacity_tokens=vidur_tables.kv_capacity_tokens(model, device, GPU_MEMORY_UTILIZATION),
    )
    profile = build_profile(
        StepTimes(model, linear, attention, cpu), device, limits, sources, notes, args.seed
    )
    profile.save(args.out)
    _report(profile, args.out)
    return 0


def _report(profile: StepTimeModel, out: Path) -> None:
    quality = profile.quality
    assert quality is not None

    def ms(tokens: int, context: int) -> float:
        return profile.predict(StepShape(tokens, 1, context)) * 1000

    print(f"wrote {out}")
    print(f"grid: {quality.train_steps} shapes fitted, {quality.heldout_steps} held out")
    print(f"held-out R^2 {quality.r2:.4f}, MAPE {quality.mape:.2f}%")
    print(f"pieces (s, s/token, s/request, s/context token): {profile.pieces}")
    print(f"residual quantiles: {profile.residual_quantiles}")
    print(
        f"idle decode {profile.idle_decode_s() * 1000:.2f} ms; prefill chunk of 256 tokens "
        f"{ms(256, 256):.2f} ms, 512 {ms(512, 512):.2f} ms, 2048 {ms(2048, 2048):.2f} ms"
    )
    meta = profile.metadata
    print(
        f"step overhead {meta['step_overhead_s'] * 1000:.3f} ms, request overhead "
        f"{meta['request_overhead_s'] * 1000:.3f} ms; KV capacity "
        f"{meta['engine']['kv_capacity_tokens']} tokens"
    )

"""Microsoft Vidur's published GPU profiling tables, read and interpolated.

Vidur (github.com/microsoft/vidur, folder data/profiling/) publishes per-operation GPU timings
of LLM layers, measured with CUDA events on real cards, one CSV row per input shape:

- compute/<device>/<model>/mlp.csv: the token-parallel ops of one transformer layer (norms,
  QKV and output projections, rotary embedding, gated MLP, residual add) by `num_tokens`;
- compute/<device>/<model>/attention.csv: the attention kernels of one layer, prefill by
  (`prefill_chunk_size`, `kv_cache_size`) and decode by (`batch_size`, `kv_cache_size`), plus
  the write of the new tokens' K and V into the paged cache (`attn_kv_cache_save`);
- cpu_overheads.csv (in older commits): the host's work per scheduler iteration (schedule,
  prepare inputs, sampler, process model outputs) by `batch_size`.

Every timing column is `time_stats.<op>.{min,max,mean,median,std}` in milliseconds over the
repetitions of that shape. Like Vidur's own predictor, this module uses the medians at tensor
parallelism 1; the standard deviations are kept as the measurement spread.

Between measured shapes the tables are interpolated linearly; beyond a table's range the
nearest measured value is held (nothing is extrapolated). Vidur fits random forests instead;
linear interpolation keeps every number traceable to a measured row.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GiB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """What the tables are keyed by, and what a KV cache of the model costs."""

    name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    embedding_dim: int
    mlp_hidden_dim: int
    vocab_size: int
    weight_bytes: int  # bf16 weights on the card

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_q_heads

    @property
    def grouped_query(self) -> bool:
        return self.num_kv_heads < self.num_q_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


# The models whose shapes this module knows (Hugging Face configs). Weights: the brief's round
# 16 GB for Llama-3-8B's 8.03e9 bf16 parameters; 6.74e9 x 2 bytes for Llama-2-7B.
MODELS: Mapping[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("meta-llama/Meta-Llama-3-8B", 32, 32, 8, 4096, 14336, 128256, 16_000_000_000),
        ModelShape("meta-llama/Llama-2-7b-hf", 32, 32, 32, 4096, 11008, 32000, 13_480_000_000),
    )
}

# GPU memory of the cards Vidur profiles, as the driver reports it (80 GB SXM parts).
DEVICE_MEMORY_BYTES: Mapping[str, int] = {"a100": 80 * GiB, "h100": 80 * GiB}
DEVICE_NAMES: Mapping[str, str] = {"a100": "NVIDIA A100-SXM4-80GB", "h100": "NVIDIA H100 80GB"}

# The token-parallel ops Vidur's predictor sums per layer (its ExecutionTime.block time less
# attention). The embedding lookup is profiled but not part of a layer; the LM head runs in
# the sampler, which the CPU overhead table times.
LINEAR_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)

# Host-side costs of one scheduler iteration (Vidur's cpu-overhead model less `ray_comm_time`,
# the Ray RPC of its multi-worker runtime, which a one-GPU vLLM engine does not make).
CPU_OPS = ("schedule", "sampler_e2e", "prepare_inputs_e2e", "process_model_outputs")
# Of those, what a lone request pays once on its way in and out: being scheduled, and its
# output being processed.
REQUEST_OPS = ("schedule", "process_model_outputs")


class TableError(ValueError):
    """A profiling table is missing, or holds no rows for the model asked for."""


# -- interpolation -----------------------------------------------------------------------------


class Curve:
    """y(x) through measured points, linear between them and flat beyond the ends."""

    def __init__(self, points: Iterable[tuple[float, float]]) -> None:
        grouped: dict[float, list[float]] = defaultdict(list)
        for x, y in points:
            grouped[float(x)].append(float(y))
        if not grouped:
            raise TableError("no measured points")
        # Repeated shapes (Vidur profiles some twice) count once, at their mean.
        self.xs = np.array(sorted(grouped))
        self.ys = np.array([sum(grouped[x]) / len(grouped[x]) for x in self.xs])

    def __call__(self, x: float) -> float:
        return float(np.interp(x, self.xs, self.ys))

    @property
    def span(self) -> tuple[float, float]:
        return float(self.xs[0]), float(self.xs[-1])


class Surface:
    """y(level, x): a Curve over x at each measured level, linear between adjacent levels.

    Vidur profiles attention on a grid of one variable per row block (all KV sizes for one
    prefill chunk, all batch sizes for one KV size), so each level is a dense curve and the
    levels are interpolated between.
    """

    def __init__(self, points: Iterable[tuple[float, float, float]]) -> None:
        by_level: dict[float, list[tuple[float, float]]] = defaultdict(list)
        for level, x, y in points:
            by_level[float(level)].append((x, y))
        if not by_level:
            raise TableError("no measured points")
        self.levels = sorted(by_level)
        self.curves = [Curve(by_level[level]) for level in self.levels]

    def __call__(self, level: float, x: float) -> float:
        levels = self.levels
        if level <= levels[0]:
            return self.curves[0](x)
        if level >= levels[-1]:
            return self.curves[-1](x)
        hi = int(np.searchsorted(levels, level))
        lo = hi - 1
        weight = (level - levels[lo]) / (levels[hi] - levels[lo])
        return (1 - weight) * self.curves[lo](x) + weight * self.curves[hi](x)


@dataclass(frozen=True)
class Timing:
    """A measured timing as functions of the shape: median and standard deviation, in ms."""

    median: Curve
    std: Curve


@dataclass(frozen=True)
class TimingSurface:
    median: Surface
    std: Surface


# -- reading -----------------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[dict[str, str]]:
    if not path.is_file():
        raise TableError(f"no profiling table at {path}")
    with path.open(newline="") as f:
        yield from csv.DictReader(f)


def _number(row: Mapping[str, str], column: str, default: float | None = None) -> float:
    text = row.get(column) or ""
    if text == "" or text.lower() == "nan":
        if default is None:
            raise TableError(f"column {column} is empty")
        return default
    return float(text)


def _ms(row: Mapping[str, str], op: str, stat: str) -> float:
    # Vidur's predictor fills a missing op with 0 (older tables lack some norms), so does this.
    return _number(row, f"time_stats.{op}.{stat}", 0.0)


def _is_true(text: str) -> bool:
    return text.strip().lower() in ("true", "1")


@dataclass(frozen=True)
class LinearOps:
    """The token-parallel ops of one layer, summed, by tokens in the step."""

    per_layer: Timing
    rows: int

    @property
    def max_tokens(self) -> int:
        return int(self.per_layer.median.span[1])


def read_linear_ops(path: Path, model: ModelShape) -> LinearOps:
    """mlp.csv rows of `model` at tensor parallelism 1."""
    medians: list[tuple[float, float]] = []
    stds: list[tuple[float, float]] = []
    for row in _rows(path):
        if not (
            int(_number(row, "num_tensor_parallel_workers")) == 1
            and int(_number(row, "n_head")) == model.num_q_heads
            and int(_number(row, "n_kv_head")) == model.num_kv_heads
            and int(_number(row, "n_embd")) == model.embedding_dim
            and int(_number(row, "n_expanded_embd")) == model.mlp_hidden_dim
        ):
            continue
        tokens = _number(row, "num_tokens")
        medians.append((tokens, sum(_ms(row, op, "median") for op in LINEAR_OPS)))
        # The ops run one after another on one stream: their spreads add up (an upper bound).
        stds.append((tokens, sum(_ms(row, op, "std") for op in LINEAR_OPS)))
    if not medians:
        raise TableError(f"{path}: no rows for {model.name} at tensor parallelism 1")
    return LinearOps(Timing(Curve(medians), Curve(stds)), rows=len(medians))


@dataclass(frozen=True)
class Attention:
    """The attention kernels of one layer."""

    prefill: TimingSurface  # level: prefill chunk tokens, x: KV tokens before the chunk
    decode: TimingSurface  # level: KV tokens per decoding request, x: decoding requests
    prefill_save: Timing  # K/V write of a prefill chunk, by chunk tokens
    decode_save: Timing  # K/V write of a decode batch, by requests
    rows: int


def read_attention(path: Path, model: ModelShape) -> Attention:
    """attention.csv rows of `model` at tensor parallelism 1.

    A prefill row times one request's chunk of `prefill_chunk_size` tokens over
    `kv_cache_size` tokens already cached; a decode row, `batch_size` requests of
    `kv_cache_size` cached tokens each. The K/V write is timed in both, against the tokens
    written: the prefill and decode paths write through different kernels, and Vidur's tables
    show them costing very differently per token, so each keeps its own curve.
    """
    prefill: list[tuple[float, float, float, float]] = []
    decode: list[tuple[float, float, float, float]] = []
    prefill_save: list[tuple[float, float, float]] = []
    decode_save: list[tuple[float, float, float]] = []
    for row in _rows(path):
        if not (
            int(_number(row, "num_tensor_parallel_workers")) == 1
            and int(_number(row, "n_q_head")) == model.num_q_heads
            and int(_number(row, "n_kv_head")) == model.num_kv_heads
            and int(_number(row, "n_embd")) == model.embedding_dim
        ):
            continue
        kv = _number(row, "kv_cache_size")
        save = (_ms(row, "attn_kv_cache_save", "median"), _ms(row, "attn_kv_cache_save", "std"))
        if _is_true(row["is_prefill"]):
            chunk = _number(row, "prefill_chunk_size")
            median, std = _ms(row, "attn_prefill", "median"), _ms(row, "attn_prefill", "std")
            prefill.append((chunk, kv, median, std))
            prefill_save.append((chunk, *save))
        else:
            batch = _number(row, "batch_size")
            median, std = _ms(row, "attn_decode", "median"), _ms(row, "attn_decode", "std")
            decode.append((kv, batch, median, std))
            decode_save.append((batch, *save))
    if not prefill or not decode:
        raise TableError(
            f"{path}: needs prefill and decode rows for {model.name} at tensor parallelism 1 "
            f"(found {len(prefill)} and {len(decode)})"
        )
    return Attention(
        prefill=TimingSurface(
            Surface((c, kv, m) for c, kv, m, _ in prefill),
            Surface((c, kv, s) for c, kv, _, s in prefill),
        ),
        decode=TimingSurface(
            Surface((kv, b, m) for kv, b, m, _ in decode),
            Surface((kv, b, s) for kv, b, _, s in decode),
        ),
        prefill_save=Timing(
            Curve((c, m) for c, m, _ in prefill_save), Curve((c, s) for c, _, s in prefill_save)
        ),
        decode_save=Timing(
            Curve((b, m) for b, m, _ in decode_save), Curve((b, s) for b, _, s in decode_save)
        ),
        rows=len(prefill) + len(decode),
    )


@dataclass(frozen=True)
class CpuOverhead:
    """Host time per scheduler iteration, as a line in the batch size (ms).

    Vidur measured it at batch sizes 8 to 128; a least-squares line through those points
    splits it into a fixed part per step and a part per request in the batch.
    """

    model_name: str  # whose rows these are
    batch_sizes: tuple[int, ...]
    per_step_ms: float
    per_request_ms: float
    request_overhead_ms: float  # REQUEST_OPS at the smallest batch measured
    at_smallest_batch_ms: Mapping[str, float]  # each of CPU_OPS, for the record

    def iteration_ms(self, requests: int) -> float:
        return self.per_step_ms + self.per_request_ms * requests


def read_cpu_overhead(path: Path, model_name: str) -> CpuOverhead:
    """cpu_overheads.csv rows of `model_name` at tensor parallelism 1 (medians, as Vidur)."""
    points: list[tuple[int, dict[str, float]]] = []
    for row in _rows(path):
        lower = {k.lower(): v for k, v in row.items() if k}  # older files spell it in capitals
        if lower.get("model_name") != model_name:
            continue
        if int(_number(lower, "tensor_parallel_degree")) != 1:
            continue
        ops = {op: _number(lower, f"{op}_median") for op in CPU_OPS}
        points.append((int(_number(lower, "batch_size")), ops))
    if len(points) < 2:
        raise TableError(f"{path}: needs at least two batch sizes for {model_name} at TP 1")
    points.sort(key=lambda p: p[0])
    batch = np.array([b for b, _ in points], dtype=float)
    total = np.array([sum(ops.values()) for _, ops in points])
    slope, intercept = np.polyfit(batch, total, 1)
    smallest = points[0][1]
    return CpuOverhead(
        model_name=model_name,
        batch_sizes=tuple(b for b, _ in points),
        per_step_ms=float(max(0.0, intercept)),
        per_request_ms=float(max(0.0, slope)),
        request_overhead_ms=sum(smallest[op] for op in REQUEST_OPS),
        at_smallest_batch_ms=dict(smallest),
    )


def kv_capacity_tokens(model: ModelShape, device: str, utilization: float = 0.9) -> int:
    """Tokens of KV cache vLLM can hold on one `device` at `utilization` of its memory, after
    the bf16 weights (activations and CUDA graphs, a few GiB more, are not subtracted)."""
    free = DEVICE_MEMORY_BYTES[device] * utilization - model.weight_bytes
    return max(0, math.floor(free / model.kv_bytes_per_token()))

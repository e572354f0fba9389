"""Step profiles fitted to published GPU timings (`sloserve profile-published`), and the shipped
ones: built here from small synthetic tables in Vidur's CSV format, no network, no Vidur data."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from sloserve.bench import published_profile, vidur_tables
from sloserve.bench.published_profile import Step, StepTimes, combined_residual_quantiles
from sloserve.bench.vidur_tables import LINEAR_OPS, MODELS, Curve, Surface
from sloserve.cli import main as cli_main
from sloserve.stepmodel import StepShape, StepTimeModel

LLAMA3 = MODELS["meta-llama/Meta-Llama-3-8B"]
PROFILES = Path(__file__).resolve().parents[1] / "sloserve" / "profiles"
STATS = ("min", "max", "mean", "median", "std")

# -- a synthetic Vidur checkout ----------------------------------------------------------------
#
# Per-layer ground truth, in ms (the shape of A100 figures, round numbers):
#   linear ops: 0.3 + 0.002 x tokens, split evenly over LINEAR_OPS
#   decode attention: 0.005 + 2e-7 x batch x kv;  prefill attention: 0.01 + 1e-7 x chunk x kv
#   K/V writes: 0.002 + 5e-4 x chunk (prefill), 0.002 (decode)
#   host: 0.8 ms + 0.04 ms per request


def _linear_ms(tokens: float) -> float:
    return 0.3 + 0.002 * tokens


def _stats(median: float) -> list[float]:
    return [median * 0.98, median * 1.03, median, median, median * 0.01]


def _write(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _mlp_csv(path: Path) -> None:
    ops = ("emb", *LINEAR_OPS)
    header = [f"time_stats.{op}.{s}" for op in ops for s in STATS]
    header += ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size"]
    header += ["use_gated_mlp", "num_tokens", "num_tensor_parallel_workers"]
    rows: list[list[object]] = []
    for tp in (1, 2):  # tensor parallelism 2 must be left out: make it absurd
        for tokens in (1, 8, 64, 256, 1024, 2048, 4096, 8192):
            per_op = _linear_ms(tokens) / len(LINEAR_OPS) * (1 if tp == 1 else 100)
            stats = [v for _ in ops for v in _stats(per_op)]
            rows.append([*stats, 32, 8, 4096, 14336, 128256, True, tokens, tp])
    _write(path, header, rows)


def _attention_csv(path: Path) -> None:
    ops = ("attn_input_reshape", "attn_kv_cache_save", "attn_prefill", "attn_decode")
    header = [f"time_stats.{op}.{s}" for op in (*ops, "attn_output_reshape") for s in STATS]
    header += ["n_embd", "n_q_head", "n_kv_head", "block_size", "num_tensor_parallel_workers"]
    header += ["max_model_len", "batch_size", "prefill_chunk_size", "kv_cache_size"]
    header += ["is_prefill", "attention_backend"]
    zero = [0.0] * 5
    rows: list[list[object]] = []
    tail = [4096, 32, 8, 16, 1, 16384]
    for chunk in (64, 512, 1024, 2048, 4096, 8192):
        for kv in range(0, 16384 - chunk + 1, max(chunk, 1024)):
            save, prefill = 0.002 + 5e-4 * chunk, 0.01 + 1e-7 * chunk * kv
            row = [*zero, *_stats(save), *_stats(prefill), *zero, *zero]
            rows.append([*row, *tail, 1, chunk, kv, True, "AttentionBackend.FLASHINFER"])
    for kv in (64, 512, 1024, 4096, 8192):
        for batch in (1, 2, 8, 32, 128, 256, 512):
            decode = 0.005 + 2e-7 * batch * kv
            row = [*zero, *_stats(0.002), *zero, *_stats(decode), *zero]
            rows.append([*row, *tail, batch, 0, kv, False, "AttentionBackend.FLASHINFER"])
    _write(path, header, rows)


def _cpu_csv(path: Path) -> None:
    # The spelling of Vidur's file in commit 57720caf (lower case, a leading index column).
    ops = ("schedule", "sampler_e2e", "prepare_inputs_e2e", "process_model_outputs")
    header = ["", *(f"{op}_mean" for op in ops), *(f"{op}_median" for op in ops)]
    header += ["model_name", "batch_size", "tensor_parallel_degree", "ray_comm_time_mean"]
    rows: list[list[object]] = []
    for i, batch in enumerate((8, 16, 32, 64, 128)):
        total = 0.8 + 0.04 * batch  # split 1:1:1:1 over the four ops
        medians = [total / 4] * 4
        rows.append([i, *medians, *medians, "meta-llama/Llama-2-7b-hf", batch, 1, 0.2])
    _write(path, header, rows)


@pytest.fixture(scope="module")
def vidur_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vidur")
    compute = root / "data/profiling/compute/a100/meta-llama/Meta-Llama-3-8B"
    _mlp_csv(compute / "mlp.csv")
    _attention_csv(compute / "attention.csv")
    _cpu_csv(root / "data/profiling/a100/cpu_overheads.csv")
    return root


@pytest.fixture(scope="module")
def built(vidur_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> StepTimeModel:
    out = tmp_path_factory.mktemp("out") / "profile.json"
    argv = [
        "profile-published",
        "--vidur-dir", str(vidur_dir),
        "--model", "meta-llama/Meta-Llama-3-8B",
        "--device", "a100",
        "--out", str(out),
        "--vidur-commit", "a" * 40,
        "--cpu-overheads", str(vidur_dir / "data/profiling/a100/cpu_overheads.csv"),
        "--cpu-overheads-commit", "b" * 40,
        "--cpu-overheads-model", "meta-llama/Llama-2-7b-hf",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    return StepTimeModel.load(out)


# -- the pipeline on synthetic tables ---------------------------------------------------------


def test_interpolation_is_linear_inside_and_flat_outside() -> None:
    curve = Curve([(0, 1.0), (10, 3.0), (10, 5.0)])  # a repeated shape counts at its mean
    assert curve(5) == pytest.approx(2.5) and curve(10) == pytest.approx(4.0)
    assert curve(-1) == pytest.approx(1.0) and curve(99) == pytest.approx(4.0)
    surface = Surface([(1, 0, 0.0), (1, 10, 10.0), (3, 0, 2.0), (3, 10, 12.0)])
    assert surface(2, 5) == pytest.approx(6.0)
    assert surface(9, 5) == pytest.approx(7.0)  # past the last level: that level


def test_steps_compose_as_vidur_predicts(vidur_dir: Path) -> None:
    compute = vidur_dir / "data/profiling/compute/a100/meta-llama/Meta-Llama-3-8B"
    times = StepTimes(
        LLAMA3,
        vidur_tables.read_linear_ops(compute / "mlp.csv", LLAMA3),
        vidur_tables.read_attention(compute / "attention.csv", LLAMA3),
        vidur_tables.read_cpu_overhead(
            vidur_dir / "data/profiling/a100/cpu_overheads.csv", "meta-llama/Llama-2-7b-hf"
        ),
    )
    # 8 decodes at 1024 cached tokens: both on measured points, so exact.
    attention = (0.005 + 2e-7 * 8 * 1024) * 1.1 + 0.002  # GQA batching overhead, K/V write
    expected_ms = 32 * (_linear_ms(8) + attention) + 0.04 * 8
    assert times.seconds(Step(8, 1024)) * 1000 == pytest.approx(expected_ms, rel=1e-6)
    # A 1,024-token chunk over 1,024 cached tokens, alone.
    chunk_ms = 0.01 + 1e-7 * 1024 * 1024 + 0.002 + 5e-4 * 1024
    expected_ms = 32 * (_linear_ms(1024) + chunk_ms) + 0.04
    assert times.seconds(Step(0, 0, 1024, 1024)) * 1000 == pytest.approx(expected_ms, rel=1e-6)
    # The synthetic tables carry a 1% spread on every op.
    assert times.relative_spread(Step(8, 1024)) < 0.011
    assert times.cpu is not None
    assert times.cpu.per_step_ms == pytest.approx(0.8)
    assert times.cpu.per_request_ms == pytest.approx(0.04)


def test_fitted_profile_reproduces_the_tables(built: StepTimeModel) -> None:
    assert built.quality is not None
    assert built.quality.r2 > 0.97 and built.quality.mape < 10
    assert built.quality.heldout_steps >= 10
    # More tokens never predict faster, and a full chunk is compute-bound.
    times = [built.predict(StepShape(n, 1, n)) for n in (1, 16, 64, 256, 1024, 4096)]
    assert times == sorted(times)
    assert times[-1] > 10 * times[0]
    # The idle decode step: 32 layers of the linear ops at one token, give or take the fit.
    truth_s = 32 * (_linear_ms(1) + 0.005 + 0.002) / 1000 + 0.04e-3
    assert built.idle_decode_s() == pytest.approx(truth_s, rel=0.15)


def test_overheads_and_sources_are_carried_into_metadata(built: StepTimeModel) -> None:
    meta = built.metadata
    assert meta["step_overhead_s"] == pytest.approx(0.8e-3)
    # One scheduling pass and one output processing at batch 8: (0.8 + 0.32) / 4 x 2 ms.
    assert meta["request_overhead_s"] == pytest.approx((0.8 + 0.04 * 8) / 2 / 1000)
    assert meta["engine"]["kv_capacity_tokens"] == (80 * (1 << 30) * 0.9 - 16e9) // 131072
    assert meta["engine"]["max_num_batched_tokens"] == published_profile.MAX_NUM_BATCHED_TOKENS
    paths = {s["path"]: s for s in meta["sources"]}
    mlp = paths["data/profiling/compute/a100/meta-llama/Meta-Llama-3-8B/mlp.csv"]
    assert mlp["repository"] == "microsoft/vidur" and mlp["commit"] == "a" * 40
    assert mlp["rows_used"] == 8  # tensor parallelism 2 left out
    assert paths["data/profiling/a100/cpu_overheads.csv"]["commit"] == "b" * 40
    assert any("Llama-2-7b-hf" in note and "stand in" in note for note in meta["notes"])
    assert set(built.residual_quantiles) == {"p50", "p90", "p95", "p99"}
    assert meta["hardware"] == "NVIDIA A100-SXM4-80GB"  # no "cpu": simulate scales GPU lengths


def test_residuals_widen_with_the_measured_spread() -> None:
    exact = combined_residual_quantiles([0.0] * 10, [0.0] * 10)
    assert all(v == pytest.approx(0.0) for v in exact.values())
    noisy = combined_residual_quantiles([0.0] * 10, [0.05] * 10)
    assert noisy["p50"] == pytest.approx(0.0, abs=1e-9)
    assert 0.05 < noisy["p90"] < noisy["p99"] < 0.2  # 1.28 and about 2.3 sigma of 5%


def test_missing_tables_say_so(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no profiling table"):
        cli_main(
            ["profile-published", "--vidur-dir", str(tmp_path), "--model",
             "meta-llama/Meta-Llama-3-8B", "--device", "h100", "--out", str(tmp_path / "p.json")]
        )  # fmt: skip


# -- the shipped profiles ----------------------------------------------------------------------

# Plausible published ranges per card for an 8B model in bf16 at tensor parallelism 1: the
# idle decode step reads the ~16 GB of weights once (A100 2.0 TB/s: >= 8 ms; H100 3.35 TB/s:
# >= 4.8 ms), a 512-token chunk is ~8 TFLOP (A100 312, H100 990 TFLOP/s dense bf16 peak).
PLAUSIBLE_MS = {
    "A100": {"idle_decode": (7.0, 20.0), "prefill_512": (25.0, 120.0)},
    "H100": {"idle_decode": (3.0, 15.0), "prefill_512": (8.0, 60.0)},
}
GPU_PROFILES = sorted(PROFILES.glob("gpu-*.json"))


def test_gpu_profiles_are_fitted_not_rooflines() -> None:
    names = [p.stem for p in GPU_PROFILES]
    assert "gpu-llama-3-8b-a100-vidur" in names
    assert not [name for name in names if name.endswith("-derived")]


@pytest.mark.parametrize("path", GPU_PROFILES, ids=lambda p: p.stem)
def test_shipped_gpu_profile(path: Path) -> None:
    model = StepTimeModel.load(path)
    meta = model.metadata
    assert meta["sources"], "a GPU profile cites what it was fitted to"
    for source in meta["sources"]:
        assert source["repository"] == "microsoft/vidur"
        assert source["path"].startswith("data/profiling/") and source["path"].endswith(".csv")
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"])
    assert meta["provenance"]["measured (Vidur)"] and meta["provenance"]["derived (sloserve)"]
    assert model.quality is not None and model.quality.r2 >= 0.9
    assert model.quality.heldout_steps >= 20
    quantiles = model.residual_quantiles
    assert set(quantiles) == {"p50", "p90", "p95", "p99"}
    assert quantiles["p50"] <= quantiles["p90"] <= quantiles["p95"] <= quantiles["p99"]
    assert 0 < meta["step_overhead_s"] < 0.01 and 0 < meta["request_overhead_s"] < 0.1
    engine = meta["engine"]
    assert engine["kv_capacity_tokens"] > 100_000 and engine["max_num_seqs"] >= 128
    card = next(name for name in PLAUSIBLE_MS if name in meta["hardware"])
    idle_ms = model.idle_decode_s() * 1000
    prefill_ms = model.predict(StepShape(512, 1, 512)) * 1000
    low, high = PLAUSIBLE_MS[card]["idle_decode"]
    assert low <= idle_ms <= high, f"idle decode {idle_ms:.2f} ms on {card}"
    low, high = PLAUSIBLE_MS[card]["prefill_512"]
    assert low <= prefill_ms <= high, f"512-token chunk {prefill_ms:.2f} ms on {card}"
    # Full context on a full batch stays within what the card's cache holds.
    assert engine["max_num_seqs"] * 1024 <= engine["kv_capacity_tokens"]


def test_simulate_takes_kv_capacity_and_step_overhead_from_the_profile(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", "--scenario", "mixed", "--rate", "1", "--requests", "12"]
    argv += ["--policy", "vllm-default", "--profile-name", "gpu-llama-3-8b-a100-vidur"]
    assert cli_main([*argv, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    meta = summary["profile"]
    assert summary["step_overhead_s"] == pytest.approx(meta["step_overhead_s"])
    assert summary["engine_limits"]["kv_capacity_tokens"] == meta["engine"]["kv_capacity_tokens"]
    # Given on the command line, they win.
    argv += ["--kv-tokens", "50000", "--step-overhead-ms", "0"]
    assert cli_main([*argv, "--out", str(tmp_path / "given")]) == 0
    given = json.loads((tmp_path / "given" / "summary.json").read_text())
    assert given["step_overhead_s"] == 0 and given["engine_limits"]["kv_capacity_tokens"] == 50000

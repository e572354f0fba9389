"""The profiler on a real engine, and the replica's live step-model error."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from conftest import Replica
from prometheus_client.parser import text_string_to_metric_families

from sloserve.client import Client
from sloserve.stepmodel import StepShape, StepTimeModel, shipped_profile


def test_profiler_writes_a_fitted_profile(tiny_profile: Path) -> None:
    model = StepTimeModel.load(tiny_profile)
    assert model.quality is not None
    assert model.quality.train_steps + model.quality.heldout_steps >= 100
    assert model.metadata["derived"] is False
    assert model.metadata["vllm_version"]
    assert model.metadata["hardware"].startswith("CPU")
    assert set(model.residual_quantiles) == {"p50", "p90", "p95", "p99"}
    # What a zero-load first token takes beyond its prefill, for the bench's TTFT presets.
    assert 0 < model.metadata["request_overhead_s"] < 1
    # Bigger steps never predict faster, and the inverse agrees with the forward model.
    small = model.predict(StepShape(16, 1, 16))
    big = model.predict(StepShape(1024, 1, 1024))
    assert big >= small > 0
    budget = model.predict(StepShape(256, 4, 1024))
    assert model.tokens_within(budget, 4, 1024) >= 256 * 0.99


def test_replica_reports_steps_and_model_error(replica: Replica) -> None:
    with Client(replica.endpoint, timeout_s=60) as client:
        client.generate("steps", max_tokens=32, ignore_eos=True)
    text = urllib.request.urlopen(replica.metrics_url, timeout=10).read().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["sloserve_step_seconds_count"] >= 32
    assert samples["sloserve_step_tokens_count"] == samples["sloserve_step_seconds_count"]
    assert samples["sloserve_step_model_relative_error_count"] >= 32
    assert samples["sloserve_step_model_mape"] >= 0


def test_shipped_profiles_load() -> None:
    for name in ("cpu-bench", "gpu-llama-3-8b-a100-vidur"):
        model = shipped_profile(name)
        assert model.idle_decode_s() > 0
        assert model.quality is not None and model.residual_quantiles
    # The GPU profile is fitted to published measurements, and says whose (more checks:
    # tests/test_published_profile.py).
    gpu = shipped_profile("gpu-llama-3-8b-a100-vidur")
    assert gpu.metadata["derived"] is False
    assert {s["repository"] for s in gpu.metadata["sources"]} == {"microsoft/vidur"}
    # Decode is bound by reading the weights, a full chunk by compute: the chunk costs many
    # idle decode steps, and the cache the card holds is in the profile.
    assert gpu.predict(StepShape(4096, 1, 4096)) > 10 * gpu.idle_decode_s()
    assert gpu.metadata["engine"]["kv_capacity_tokens"] > 100_000

"""Streaming generations from a real replica: vLLM on CPU behind real gRPC."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request

import pytest
from conftest import Replica
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from sloserve.client import AsyncClient, Client, build_request
from sloserve.v1 import inference_pb2, slo_pb2


def test_stream_is_admission_then_tokens_then_completion(replica: Replica) -> None:
    with Client(replica.endpoint, timeout_s=60) as client:
        events = list(
            client.stream(
                build_request(
                    "the quick brown fox", slo_class="coding", max_tokens=12, ignore_eos=True
                )
            )
        )
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "admission"
    assert kinds[-1] == "completion"
    assert set(kinds[1:-1]) == {"delta"}
    assert len(kinds) >= 3, "tokens must stream in more than one message"
    admission, completion = events[0].admission, events[-1].completion
    assert admission.mode == slo_pb2.ADMISSION_MODE_ADMITTED
    assert admission.class_name == "coding"
    assert admission.budgets.tpot.ToMilliseconds() == 250
    streamed = sum(len(e.delta.token_ids) for e in events[1:-1])
    assert streamed == completion.usage.completion_tokens == 12
    assert completion.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert completion.usage.prompt_tokens == admission.prompt_tokens > 0
    assert completion.slo_outcome.ttft.ToNanoseconds() > 0


def test_sixteen_concurrent_streams(replica: Replica, tiny_model: object) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))

    async def run_all() -> list[object]:
        async with AsyncClient(replica.endpoint, timeout_s=120) as client:
            return await asyncio.gather(
                *[
                    client.generate(
                        f"request number {i}: tell a story",
                        max_tokens=24 + i,
                        ignore_eos=True,
                        seed=i,
                        request_id=f"concurrent-{i}",
                    )
                    for i in range(16)
                ]
            )

    results = asyncio.run(run_all())
    assert len(results) == 16
    for i, result in enumerate(results):
        assert result.request_id == f"concurrent-{i}"  # type: ignore[attr-defined]
        assert result.completion_tokens == len(result.token_ids) == 24 + i  # type: ignore[attr-defined]
        # The text deltas add up to the decoded tokens: nothing lost or repeated.
        decoded = tokenizer.decode(result.token_ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        assert result.text == decoded  # type: ignore[attr-defined]
    # They really ran at the same time: every stream started before any had finished.
    first_tokens = [r.token_times[0] for r in results]  # type: ignore[attr-defined]
    last_tokens = [r.token_times[-1] for r in results]  # type: ignore[attr-defined]
    assert max(first_tokens) < min(last_tokens)


def test_scheduler_in_engine_core_sees_request_slo(replica: Replica) -> None:
    """The SLO fields reach our scheduler class inside vLLM's engine-core process."""
    with Client(replica.endpoint, timeout_s=60) as client:
        client.generate(
            "slo check", slo_class="coding", max_tokens=4, request_id="slo-visible-class",
            tenant="team-a", allow_best_effort=True,
        )  # fmt: skip
        client.generate(
            "slo check", ttft_s=0.75, tpot_s=0.04, thinking_tpot_s=0.02, max_tokens=4,
            request_id="slo-visible-budgets",
        )  # fmt: skip
    events = [json.loads(line) for line in replica.trace_path.read_text().splitlines()]
    added = {e["request_id"]: e for e in events if e["event"] == "added"}
    by_class, by_budgets = added["slo-visible-class"], added["slo-visible-budgets"]

    assert replica.process is not None
    assert by_class["pid"] != replica.process.pid, "must be seen in the engine-core process"
    assert by_class["scheduler"] in {"SloScheduler", "SloAsyncScheduler"}
    assert by_class["class_name"] == "coding"
    assert (by_class["ttft_s"], by_class["tpot_s"]) == (4.0, 0.25)
    assert by_class["tenant"] == "team-a"
    assert by_class["allow_best_effort"] is True
    assert by_budgets["class_name"] == ""
    assert (by_budgets["ttft_s"], by_budgets["tpot_s"]) == (0.75, 0.04)
    assert by_budgets["thinking_tpot_s"] == 0.02


def test_metrics_count_requests_by_class_and_outcome(replica: Replica) -> None:
    with Client(replica.endpoint, timeout_s=60) as client:
        client.generate("metrics", slo_class="chat", max_tokens=8, ignore_eos=True)
    text = urllib.request.urlopen(replica.metrics_url, timeout=10).read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    served = sum(
        samples.get(("sloserve_requests_total", (("outcome", o), ("slo_class", "chat"))), 0)
        for o in ("attained", "missed")
    )
    assert served >= 1
    chat = (("slo_class", "chat"),)
    assert samples[("sloserve_ttft_seconds_count", chat)] >= 1
    assert samples[("sloserve_tpot_seconds_count", chat)] >= 1
    assert ("sloserve_running_requests", ()) in samples
    assert ("sloserve_waiting_requests", ()) in samples
    assert samples[("sloserve_ready", ())] == 1


@pytest.mark.parametrize("slo_class", ["chat", "coding"])
def test_generate_cli_prints_tokens_ttft_tpot_and_outcome(replica: Replica, slo_class: str) -> None:
    run = subprocess.run(
        [
            sys.executable, "-m", "sloserve", "generate", "--endpoint", replica.endpoint,
            "--class", slo_class, "--max-tokens", "16", "--ignore-eos", "hello there",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"16 tokens (length), class {slo_class}" in run.stdout
    assert "TTFT " in run.stdout and " ms" in run.stdout
    assert "TPOT " in run.stdout
    assert "SLO attained" in run.stdout or "SLO missed" in run.stdout

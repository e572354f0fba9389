"""`sloserve bench referee`'s pieces: vLLM's own client command line (the class by header, its
budgets as --goodput), and the table (goodput per system over runs, the ratio of medians, the
client's attainment beside the gateway's). A real run takes minutes per rate: docs/benchmarks.md
quotes one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sloserve.bench.referee import ClientResult, RefereeSettings, client_command, markdown


def _result(system: str, run: int, goodput: float, **changes: object) -> ClientResult:
    base = ClientResult(
        system=system, run=run, rate=20.0, slo_class="chat", num_prompts=300, completed=300,
        failed=0, good=round(goodput * 15), duration_s=15.0, goodput_rps=goodput,
        mean_ttft_ms=100.0, p99_ttft_ms=300.0, mean_tpot_ms=10.0, p99_tpot_ms=20.0,
    )  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


def test_the_client_is_vllms_own_with_the_class_budgets_and_header(tmp_path: Path) -> None:
    settings = RefereeSettings(model=Path(".models/tiny"), out=tmp_path, rates=(10.0,))
    command = client_command(
        settings, "http://127.0.0.1:8000", "tiny", "coding", 10.0, 2, tmp_path / "r.json"
    )
    assert command[1:6] == ["-m", "sloserve", "vllm", "bench", "serve"]
    at = command.index("--goodput")
    assert command[at + 1 : at + 3] == ["ttft:1000", "tpot:50"]  # coding's default budgets
    assert command[command.index("--header") + 1] == "x-sloserve-slo-class=coding"
    assert command[command.index("--seed") + 1] == "2"
    assert command[command.index("--request-rate") + 1] == "10"
    assert "--ignore-eos" in command


def test_the_table_gives_the_ratio_of_medians_and_both_attainments() -> None:
    results = [
        _result("vllm-default", 0, 18.0),
        _result("vllm-default", 1, 20.0),
        _result("vllm-default", 2, 19.0),
        _result("sloserve", 0, 19.0, gateway_attainment=0.99, gateway_arrived=301),
        _result("sloserve", 1, 38.0, good=285, gateway_attainment=0.5, gateway_arrived=301),
        _result("sloserve", 2, 20.9, good=300),
    ]
    table = markdown(results).splitlines()
    assert len(table) == 3
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:5] == ["chat", "20", "18.0, 20.0, 19.0", "19.0, 38.0, 20.9", "1.10x"]
    assert cells[7] == "95/99, 95/50, 100/-"

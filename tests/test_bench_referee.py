"""`sloserve bench referee`'s pieces: vLLM's own client command line (the class by header, its
budgets as --goodput), and the table (goodput per system over runs, the ratio of medians, the
client's attainment beside the gateway's). A real run takes minutes per rate: docs/benchmarks.md
quotes one."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from sloserve.bench.process_cpu import Role, _role, cpu_by_role
from sloserve.bench.referee import (
    ClientResult,
    RefereeSettings,
    client_command,
    cost_markdown,
    markdown,
)


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


def test_the_cost_table_gives_each_roles_median_and_the_front_path() -> None:
    costs = [
        {"vllm-api-server": 40.0, "engine-core": 300.0},
        {"vllm-api-server": 50.0, "engine-core": 310.0},
        {"vllm-api-server": 45.0, "engine-core": 290.0},
    ]
    results = [_result("vllm-default", i, 19.0, cpu_us_per_token=c) for i, c in enumerate(costs)]
    ours_cost = {"gateway": 30.0, "replica-front-end": 35.0, "engine-core": 300.0}
    results.append(_result("sloserve", 0, 19.0, cpu_us_per_token=ours_cost))
    rows = {line.split("|")[1].strip(): line for line in cost_markdown(results).splitlines()[2:]}
    stock = [c.strip() for c in rows["vllm-default"].strip("|").split("|")]
    ours = [c.strip() for c in rows["sloserve"].strip("|").split("|")]
    # system, rate, vllm-api-server, gateway, replica-front-end, engine-core, front path
    assert stock == ["vllm-default", "20", "45", "-", "-", "300", "45"]
    assert ours == ["sloserve", "20", "-", "30", "35", "300", "65"]


def test_process_roles_come_from_command_lines_and_vllms_titles() -> None:
    python = sys.executable
    assert _role([python, "-m", "sloserve", "gateway", "--port", "1"], "python") is Role.GATEWAY
    assert _role([python, "-m", "sloserve", "replica"], "python") is Role.REPLICA_FRONT_END
    assert _role(["VLLM::EngineCore", ""], "VLLM::EngineCor") is Role.ENGINE_CORE
    assert _role([python, "-m", "vllm.entrypoints.openai.api_server"], "python") is (
        Role.VLLM_API_SERVER
    )
    assert _role([python, "-m", "sloserve", "vllm", "bench", "serve"], "python") is Role.CLIENT


def test_cpu_time_of_a_child_is_counted_while_it_runs() -> None:
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    child = subprocess.Popen([sys.executable, "-c", burn + "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 30
        while cpu_by_role().get(Role.OTHER, 0.0) < 0.3:
            assert time.monotonic() < deadline, cpu_by_role()
            time.sleep(0.1)
    finally:
        child.kill()
        child.wait()

"""CPU time of the serving processes this process started, by role, read from /proc (Linux).

What a streamed token costs each part of the front path: `bench referee` takes the CPU time
of each role before and after a load point and divides by the tokens streamed. Roles are
told apart by command line, and vLLM's engine core by the process title vLLM gives it.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class Role(enum.Enum):
    VLLM_API_SERVER = "vllm-api-server"  # stock vLLM's OpenAI server (its front end)
    GATEWAY = "gateway"  # sloserve's gateway
    REPLICA_FRONT_END = "replica-front-end"  # a sloserve replica's gRPC server and AsyncLLM
    ENGINE_CORE = "engine-core"  # vLLM's engine core, under either
    CLIENT = "client"  # the benchmark client
    OTHER = "other"


def _role(cmdline: list[str], comm: str) -> Role:
    # vLLM retitles the processes it starts (VLLM::EngineCore, VLLM::Worker, VLLM::APIServer
    # when there are several); the title replaces the command line.
    title = cmdline[0] if cmdline else ""
    if comm.startswith(("VLLM::EngineCor", "VLLM::Worker")) or title.startswith("VLLM::Engine"):
        return Role.ENGINE_CORE
    if "vllm.entrypoints.openai.api_server" in cmdline or title.startswith("VLLM::APIServer"):
        return Role.VLLM_API_SERVER
    if "sloserve" in cmdline:
        after = cmdline[cmdline.index("sloserve") + 1 :]
        if after[:1] == ["gateway"]:
            return Role.GATEWAY
        if after[:1] == ["replica"]:
            return Role.REPLICA_FRONT_END
        if after[:1] == ["vllm"]:
            return Role.CLIENT
    return Role.OTHER


def _children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _descendants(pid: int) -> Iterator[int]:
    children = _children_of()
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        yield child
        stack.extend(children.get(child, []))


def _cpu_s(pid: int) -> tuple[Role, float] | None:
    """The process's role and its user + system CPU seconds; None once it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        cmdline = (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace")
        comm = (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return _role(cmdline.split("\0"), comm), (utime + stime) / CLOCK_TICKS_PER_S


def cpu_by_role(root: int | None = None) -> dict[Role, float]:
    """CPU seconds used so far by the descendants of `root` (default: this process), summed
    per role. A process that exits between two snapshots takes its time with it."""
    totals: dict[Role, float] = {}
    for pid in _descendants(os.getpid() if root is None else root):
        found = _cpu_s(pid)
        if found is not None:
            role, seconds = found
            totals[role] = totals.get(role, 0.0) + seconds
    return totals


def difference(after: dict[Role, float], before: dict[Role, float]) -> dict[Role, float]:
    return {role: after[role] - before.get(role, 0.0) for role in after}

"""Which CPU cores a CPU engine's worker runs on, when several engines share one machine.

vLLM's CPU worker binds its threads itself (VLLM_CPU_OMP_THREADS_BIND, default "auto"): to
the first NUMA node's cores less one it leaves to the other processes. Every engine started
that way picks the same cores, so two replicas on one machine would compute on one core
between them while the others sit idle. Whoever starts several engines on one machine
(`sloserve up`, `bench compare --replicas`) gives each a core list of its own instead.
"""

from __future__ import annotations

import os

# The variable vLLM's CPU worker reads its core list from.
BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


def allowed_cores() -> list[int]:
    """The cores this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def parse_cores(text: str) -> list[int]:
    """'0', '2-3' or '0,2-3' to core numbers; ValueError naming what is wrong, including a
    core this process may not run on."""
    cores: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(f"{text!r} is not a core list like 0 or 2-3 or 0,2-3") from None
        if low < 0 or high < low:
            raise ValueError(f"{part.strip()!r} is not a range of cores")
        cores.extend(range(low, high + 1))
    allowed = set(allowed_cores())
    outside = sorted(set(cores) - allowed)
    if outside:
        raise ValueError(
            f"cores {outside} are not among this machine's allowed cores {sorted(allowed)}"
        )
    return sorted(set(cores))


def format_cores(cores: list[int]) -> str:
    """The form vLLM reads: core numbers joined by commas."""
    return ",".join(str(core) for core in cores)


def split_cores(count: int, cores: list[int] | None = None) -> list[str | None]:
    """A core list for each of `count` engines on this machine (`cores`, default: the allowed
    ones): an equal share each, in order. One engine gets None, vLLM's own choice (which
    leaves a core to the front end and the rest of the machine). With more engines than
    cores, engines share cores round-robin, one core each: the best that can be done."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if count == 1:
        return [None]
    cores = cores if cores is not None else allowed_cores()
    if count > len(cores):
        return [str(cores[i % len(cores)]) for i in range(count)]
    share = len(cores) // count
    return [format_cores(cores[i * share : (i + 1) * share]) for i in range(count)]


def replica_core_args(count: int) -> list[list[str]]:
    """`sloserve replica` arguments for each of `count` replicas on this machine: a
    `--cpu-cores` share each (split_cores), none for a replica alone."""
    return [["--cpu-cores", cores] if cores else [] for cores in split_cores(count)]

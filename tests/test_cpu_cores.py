"""Core lists for CPU engines sharing one machine (sloserve/cpu_cores.py), and where they are
given: `sloserve up`'s replicas and the replica's --cpu-cores flag. The engine itself bound to
its cores is tested on a live replica in test_replica_lifecycle.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sloserve.cpu_cores import allowed_cores, parse_cores, replica_core_args, split_cores
from sloserve.gateway.local_stack import LocalReplicas, StackSettings


def test_one_engine_is_left_to_vllms_own_choice() -> None:
    assert split_cores(1, [0, 1]) == [None]
    assert replica_core_args(1) == [[]]


def test_engines_get_equal_shares_of_the_cores_in_order() -> None:
    assert split_cores(2, [0, 1]) == ["0", "1"]
    assert split_cores(2, [0, 1, 2, 3]) == ["0,1", "2,3"]
    assert split_cores(3, [0, 1, 2, 3, 4, 5, 6]) == ["0,1", "2,3", "4,5"]


def test_more_engines_than_cores_share_them_one_core_each() -> None:
    assert split_cores(3, [0, 1]) == ["0", "1", "0"]


def test_a_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        split_cores(0)


def test_core_lists_parse_single_cores_ranges_and_both() -> None:
    first, last = allowed_cores()[0], allowed_cores()[-1]
    assert parse_cores(str(last)) == [last]
    assert parse_cores(f"{first}-{last}") == list(range(first, last + 1))
    assert parse_cores(f"{last},{first}") == sorted({first, last})


@pytest.mark.parametrize("text", ["a", "1-", "3-1", "-1", ""])
def test_a_malformed_core_list_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cores(text)


def test_a_core_the_process_may_not_use_is_named() -> None:
    missing = max(allowed_cores()) + 1
    with pytest.raises(ValueError, match=rf"\[{missing}\]"):
        parse_cores(f"0,{missing}")


def test_sloserve_up_gives_each_local_replica_cores_of_its_own(tmp_path: Path) -> None:
    stack = LocalReplicas(StackSettings(model=tmp_path, replicas=2), tmp_path, profile=None)
    given = []
    for child in stack.children:
        flag = child.command.index("--cpu-cores")
        given.append(child.command[flag + 1])
    assert given == split_cores(2)
    assert len(set(given)) == 2 or len(allowed_cores()) == 1


def test_the_replica_refuses_cores_it_may_not_use() -> None:
    missing = max(allowed_cores()) + 1
    run = subprocess.run(
        [sys.executable, "-m", "sloserve", "replica", "--model", "m", "--cpu-cores", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "--cpu-cores" in run.stderr and f"[{missing}]" in run.stderr

"""The package: importable layout, fresh generated code, an installable wheel."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def test_stdlib_operator_is_not_shadowed_from_the_repo_root() -> None:
    run = subprocess.run(
        [sys.executable, "-c", "import operator; print(operator.itemgetter)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert run.stdout.strip() == "<class 'operator.itemgetter'>"


def test_generated_grpc_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)], check=True
    )
    fresh = tmp_path / "sloserve" / "v1"
    committed = REPO / "sloserve" / "v1"
    names = sorted(p.name for p in fresh.glob("*_pb2*"))
    assert names == sorted(p.name for p in committed.glob("*_pb2*")), "a generated file is missing"
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale: {mismatch + errors}; run `make proto`"


def test_wheel_holds_every_part(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("sloserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # Installed (not editable), the parts import from real folders, not links to the repo.
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
         "--target", str(site), str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    probe = (
        "import sloserve.replica.scheduler as s, sloserve.bench.cli, sloserve.stepmodel as m;"
        "print(s.__file__); print(m.shipped_profile('cpu-bench').quality.r2 > 0)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    scheduler_file, has_profile = run.stdout.split()
    assert Path(scheduler_file).is_relative_to(site) and not Path(scheduler_file).is_symlink()
    assert has_profile == "True"
    for required in (
        "sloserve/cli.py",
        "sloserve/default_classes.yaml",
        "sloserve/v1/inference_pb2.py",
        "sloserve/v1/inference_pb2.pyi",
        "sloserve/replica/server.py",
        "sloserve/replica/scheduler.py",
        "sloserve/profiles/cpu-bench.json",
    ):
        assert required in names

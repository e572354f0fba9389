"""What machine a measurement ran on, for the record kept beside every figure."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_description() -> str:
    """'CPU <model name> (<n> cores)', from /proc/cpuinfo where there is one."""
    model_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model_name or platform.processor()} ({os.cpu_count()} cores)"

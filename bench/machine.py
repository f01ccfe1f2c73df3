"""What every benchmark prints about where it ran: machine, versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "git_commit": git_commit(),
        "threads": torch.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
    }


def header(name: str, **extra: Any) -> str:
    """One ``# name key=value …`` line for the top of a benchmark's output."""
    info = {**machine_info(), **extra}
    return f"# {name}  " + "  ".join(f"{k}={v}" for k, v in info.items())

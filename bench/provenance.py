"""Where a result came from: the command as typed, the project's git commit, the machine and library versions
(recorded with every results row and at the top of every study's report)."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

__all__ = ["PROJECT_ROOT", "git_commit", "cpu_name", "environment", "command_line"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = PROJECT_ROOT) -> tuple[Optional[str], Optional[bool]]:
    """(commit hash, working tree has uncommitted changes) of the project, or (None, None) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Library versions, git commit, host and device names (recorded with every row)."""
    import torch
    import torch_fidelity

    import solvers

    commit, dirty = git_commit()
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = f"{cpu_name()} ({torch.get_num_threads()} threads)"
    from . import __version__ as bench_version
    return {
        "device_name": device_name, "hostname": socket.gethostname(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__, "numpy": np.__version__,
        "solvers_version": solvers.__version__, "bench_version": bench_version, "git_commit": commit,
        "git_dirty": dirty, "platform": platform.platform(),
        "cuda": torch.version.cuda if device.startswith("cuda") else None,
    }


def command_line(argv: Optional[Iterable[str]] = None) -> str:
    """The command as typed (``python -m bench.run …``), for the record."""
    import shlex
    args = list(sys.argv[1:] if argv is None else argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"torchrun --nproc_per_node={world} -m bench.run" if world > 1 else "python -m bench.run"
    return " ".join([prefix] + [shlex.quote(a) for a in args])

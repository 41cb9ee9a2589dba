"""Where a result came from: the command as typed, the project's git commit, the machine and library versions
(recorded with every results row and at the top of every study's report), and what the model is — a content
digest of the files that define it (:func:`model_digest`)."""
from __future__ import annotations

import hashlib
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional

import numpy as np

from pretrained.checkpoints import HubSource, WeightsSource, cache_dir, file_digest

__all__ = ["PROJECT_ROOT", "git_commit", "cpu_name", "environment", "command_line", "model_digest"]

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


# -- what the model is -------------------------------------------------------------------------------------
def model_digest(spec: str, card, options: Mapping) -> str:
    """A content digest of what defines the model ``--model spec`` names, so that a model changed behind the same
    name is told apart: a card file's bytes and the files it names (weights, scheduler config, the factory's or
    loader's module source), a ``module:ATTR`` model's module source, and the weights — their published checksum
    where the loader verifies the file against it (no second hash), else the digest of the file (or of every file
    of a folder) the loader reads.  A zoo model's code is the project's (its git commit is recorded apart).

    Args:
        spec: what ``--model`` was given (a zoo name, ``pkg.module:ATTR`` or a ``.toml`` path).
        card: the model card it resolved to.
        options: the loader's options (``--model-opt``, ``--weights``).

    Returns:
        32 hex digits; each file is read once.
    """
    parts = [f"card {card.name}"]
    if str(spec).endswith(".toml"):
        parts += _card_file_parts(Path(spec))
    elif ":" in str(spec):
        parts.append(_module_part(str(spec).partition(":")[0]))
    parts += _zoo_weights_parts(card, options) if "weights" not in options or _pinned(card, options) else []
    if "weights" in options and not _pinned(card, options):
        parts.append(f"weights {_path_digest(Path(str(options['weights'])).expanduser())}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _path_digest(path: Path) -> str:
    """sha256 of a file; of a folder, sha256 over its files' relative names and digests; "missing" for neither."""
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return "missing"
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()} {file_digest(f)}\n".encode())
    return h.hexdigest()


def _module_part(module_name: str) -> str:
    """The source digest of an imported module (``module name`` where it has no source file)."""
    module = sys.modules.get(module_name)
    source = getattr(module, "__file__", None)
    return f"module {module_name} {_path_digest(Path(source)) if source else 'no source file'}"


def _card_file_parts(path: Path) -> list[str]:
    """A card file's bytes, then the files its tables name (weights: the card's sha256 where it gives one, which
    the loader checks), and the modules its factory / loader / decoder import."""
    from pretrained.card_files import expand_card_path, read_card_file

    def named(value) -> str:  # the digest of a file the card names, found as its loader finds it
        return _path_digest(expand_card_path(path, str(value), strict=False))

    parts = [f"card file {file_digest(path)}"]
    data = read_card_file(path)
    for section in ("network", "decoder"):
        table = data.get(section) or {}
        for key in ("factory", "loader"):
            if key in table:
                parts.append(_module_part(_imported(str(table[key]))))
        if "diffusers" in table:  # a diffusers model folder: its config and weights
            parts.append(f"{section} diffusers folder {named(table['diffusers'])}")
        if "weights" in table:
            parts.append(f"{section} weights " + (f"sha256 {table['sha256']}" if "sha256" in table else
                                                  named(table["weights"])))
    config = (data.get("schedule") or {}).get("scheduler_config")
    if config is not None:
        parts.append(f"scheduler config {named(config)}")
    return parts


def _imported(import_path: str) -> str:
    """The module of ``pkg.module:ATTR``, imported (the card's loader imports it anyway)."""
    import importlib
    name = import_path.partition(":")[0]
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # the loader says why; the part then reads "no source file"
    return name


def _pinned(card, options: Mapping) -> bool:
    """Whether the loader checks the weights it reads, wherever they come from, against a published checksum."""
    source = card.extra.get("weights_source")
    return isinstance(source, WeightsSource) and bool(source.sha256 or source.md5) and \
        options.get("verify", True) is not False


def _zoo_weights_parts(card, options: Mapping) -> list[str]:
    """A zoo card's weights without ``--weights``: the checksum its loader verifies, else the file it finds."""
    source = card.extra.get("weights_source")
    checksum = card.sha256 or card.md5
    if checksum and options.get("verify", True) is not False:
        return [f"weights checksum {checksum}"]
    env = getattr(source, "env_var", None)
    if env and os.environ.get(env):
        return [f"weights {_path_digest(Path(os.environ[env]).expanduser())}"]
    if card.extra.get("weights") is not None:
        return [f"weights {_path_digest(Path(card.extra['weights']))}"]
    if isinstance(source, WeightsSource):
        found = next((p for p in source.local_paths() if p.exists()), cache_dir() / source.filename)
        return [f"weights {_path_digest(found)}"]
    if isinstance(source, HubSource):
        folder = cache_dir() / "hub" / source.repo_id.replace("/", "--") / source.revision
        return [f"weights {_path_digest(folder)}"]
    return []

"""The results table: one row per (solver, steps) cell, written atomically after every cell.

A results directory holds one study: one model, one sample count, one seed, one metric set, one device
type and dtype (the *run settings*).  Its ``results.csv`` carries a ``schema_version`` column; a file from
another schema version, or one made with other run settings, is refused with the reason — never
overwritten.  Writes go to a temporary file in the same directory followed by ``os.replace``, so a reader
(or an interrupted run) sees either the old table or the new one, never half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

__all__ = ["SCHEMA_VERSION", "RESULTS_CSV", "IncompatibleResultsError", "atomic_write_bytes", "atomic_write_text",
           "load_results", "save_results", "upsert_row", "cell_key", "check_run_settings",
           "environment", "git_commit", "metric_columns", "METRIC_PREFIX"]

SCHEMA_VERSION = 1
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
METRIC_PREFIX = "metric."
# The settings that must agree between every row of one results directory.
RUN_SETTING_COLUMNS = ("model", "model_options", "num_samples", "seed", "metrics", "dtype", "device_type",
                       "reference_size", "network", "rng")
# Settings added after the first results files were written: a file without the column was made with this value.
RUN_SETTING_DEFAULTS = {"network": "eager", "rng": "torch"}

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class IncompatibleResultsError(RuntimeError):
    """An existing results file cannot be extended by this run (other schema or other run settings)."""


# -- atomic writes ---------------------------------------------------------------------------------------
def atomic_write_bytes(path: os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file private (0600); give it the mode an ordinary open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


# -- cell identity -----------------------------------------------------------------------------------------
def cell_key(model: str, solver: str, options: dict, steps: int, spacing: str,
             t_start: Optional[float] = None) -> str:
    """A stable id of one sweep point: the model, the canonical solver with its options, steps, spacing and
    the grid's start where it is not the schedule's t_max."""
    blob = json.dumps({"model": model, "solver": solver, "options": options, "steps": int(steps),
                       "spacing": spacing, "t_start": t_start}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _normalise(v: Any) -> Any:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return v


def check_run_settings(existing: pd.DataFrame, settings: dict, out_dir: os.PathLike) -> None:
    """Refuse to mix run settings in one results directory.

    Raises:
        IncompatibleResultsError: naming each setting that differs, with the old and new values.
    """
    if existing.empty:
        return
    diffs = []
    for k in RUN_SETTING_COLUMNS:
        if k not in existing.columns:
            if k in RUN_SETTING_DEFAULTS and _normalise(settings.get(k)) == RUN_SETTING_DEFAULTS[k]:
                continue
            diffs.append(f"{k}: (missing in the file) vs {settings.get(k)!r}")
            continue
        values = [_normalise(v) for v in existing[k].tolist()]
        if k in RUN_SETTING_DEFAULTS:
            # Rows written before the setting existed are empty in its column once a newer run has added it
            # (an old file extended by a default run): they were made with the default.
            values = [RUN_SETTING_DEFAULTS[k] if v is None else v for v in values]
        old = sorted({str(v) for v in values})
        new = str(_normalise(settings.get(k)))
        if old != [new]:
            diffs.append(f"{k}: {', '.join(old)} in the file vs {new} now")
    if diffs:
        raise IncompatibleResultsError(
            f"{Path(out_dir) / RESULTS_CSV} holds results made with other run settings ("
            + "; ".join(diffs) + "). One results directory holds one study; it was not modified. "
            "Use another --out DIR (or move the old directory away).")


# -- load / save -----------------------------------------------------------------------------------------
def load_results(out_dir: os.PathLike) -> pd.DataFrame:
    """The results table of ``out_dir`` (empty if there is none yet).

    Raises:
        IncompatibleResultsError: the file is not a results table of this schema version.
    """
    path = Path(out_dir) / RESULTS_CSV
    if not path.exists():
        return pd.DataFrame()
    try:
        df = pd.read_csv(path, keep_default_na=True)
    except Exception as e:  # a truncated or foreign file: refuse, keep it
        raise IncompatibleResultsError(f"{path} could not be read as a results table ({e}); "
                                       "it was left as it is: use another --out DIR or move it away") from e
    if "schema_version" not in df.columns:
        raise IncompatibleResultsError(
            f"{path} has no schema_version column: it was not written by bench.run (or by a version before "
            f"schema {SCHEMA_VERSION}). It was left as it is; use another --out DIR or move the file away.")
    versions = sorted({int(v) for v in df["schema_version"].dropna().unique()})
    if versions != [SCHEMA_VERSION] and not df.empty:
        raise IncompatibleResultsError(
            f"{path} was written with results schema version {', '.join(map(str, versions))}; this bench "
            f"writes version {SCHEMA_VERSION} and cannot extend it. It was left as it is; use another --out DIR, "
            "or rebuild the old results with the version of the code that wrote them.")
    return df


def save_results(df: pd.DataFrame, out_dir: os.PathLike) -> None:
    """Write ``results.csv`` atomically (and ``results.parquet`` when pyarrow is installed)."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / RESULTS_CSV, df.to_csv(index=False))
    try:
        import pyarrow  # noqa: F401  (Parquet only where it is cheap: pyarrow already installed)
    except ImportError:
        return
    import io
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(out_dir / RESULTS_PARQUET, buf.getvalue())


def upsert_row(df: pd.DataFrame, row: dict) -> pd.DataFrame:
    """``df`` with ``row`` replacing any row of the same ``cell_key`` (kept in first-seen order)."""
    new = pd.DataFrame([row])
    if df.empty:
        return new
    keep = df[df["cell_key"] != row["cell_key"]]
    return pd.concat([keep, new], ignore_index=True, sort=False)


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric value columns (``metric.<key>``) of a results table, in order."""
    return [c for c in df.columns if c.startswith(METRIC_PREFIX)]


# -- environment -----------------------------------------------------------------------------------------
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


def _cpu_name() -> str:
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
        device_name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
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

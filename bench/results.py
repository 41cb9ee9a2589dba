"""The results table: one row per (solver, steps) cell, written atomically after every cell.

A results directory holds one study: one model, one sample count, one seed, one metric set, one device
type and dtype (the *run settings*).  Its ``results.csv`` carries a ``schema_version`` column; a file from
another schema version, or one made with other run settings, is refused with the reason — never
overwritten.  Writes go to a temporary file in the same directory followed by ``os.replace``, so a reader
(or an interrupted run) sees either the old table or the new one, never half a file.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pandas as pd

from pretrained.files import atomic_write_bytes, atomic_write_text  # noqa: F401  (the one atomic writer, re-exported)

from .provenance import PROJECT_ROOT, command_line, environment, git_commit  # noqa: F401  (the provenance columns)

__all__ = ["SCHEMA_VERSION", "RESULTS_CSV", "IncompatibleResultsError", "atomic_write_bytes", "atomic_write_text",
           "load_results", "save_results", "upsert_row", "record_row", "results_lock", "cell_key",
           "check_run_settings", "row_threads", "timing_columns", "row_timing", "relative_spread",
           "TIMING_PASS_COLUMNS", "new_row", "FAILURE_RESULT", "FAILURE_ENVIRONMENT", "redone_on_resume",
           "environment", "git_commit", "command_line", "metric_columns", "METRIC_PREFIX", "safe_filename",
           "REFERENCE_JSON", "write_reference_info", "load_reference_info", "save_preview", "load_preview",
           "save_samples", "SAMPLES"]

SCHEMA_VERSION = 1
RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
REFERENCE_JSON = "reference.json"  # the sweep's reference data: metric labels, noise floors, notes, the card
PREVIEWS = "previews"  # one .npz per cell (and "reference"): a few samples, for the report's panels
SAMPLES = "samples"    # with --save-samples: one .npz per cell, every sample
LOCK_FILE = "results.lock"  # held while a process reads-modifies-writes results.csv (see results_lock)
METRIC_PREFIX = "metric."
# The settings that must agree between every row of one results directory.
RUN_SETTING_COLUMNS = ("model", "model_options", "num_samples", "seed", "metrics", "dtype", "device_type",
                       "reference", "reference_size", "network", "rng", "model_digest")
# Settings added after the first results files were written: a file without the column was made with this value.
RUN_SETTING_DEFAULTS = {"network": "eager", "rng": "torch"}
# Settings added later whose old value is unknown (what the model's files held then): a row that does not record
# one is not compared on it; rows that do must agree.
RUN_SETTINGS_UNRECORDED_BEFORE = ("model_digest",)
# Why a failed cell failed (its failure_kind column; empty for a finished cell): its result — the solver diverged,
# the model raised: recorded, skipped by a rerun, redone with --force — or a fault of its environment — a full
# disk, memory that ran out, a lost process — which a plain rerun redoes.  A failed row of a file from before the
# column reads as a result (skipped, as it always was).
FAILURE_RESULT = "result"
FAILURE_ENVIRONMENT = "environment"
# The conditions that change wall-clock without changing the samples: rows timed under other values are not
# comparable.  A row that does not record one (a file from before the column) is not compared on it.
TIMING_SETTING_COLUMNS = {"threads": "--threads", "batch_size": "--batch-size"}
# The repeated timed passes of a cell: how many, the fastest and slowest total, every total (a JSON list).  The
# time_* columns are the medians over the passes; a file from before these columns holds one pass per cell.
TIMING_PASS_COLUMNS = ("time_repeats", "time_total_min_s", "time_total_max_s", "time_passes_s")


class IncompatibleResultsError(RuntimeError):
    """An existing results file cannot be extended by this run (other schema or other run settings)."""


def safe_filename(text: str) -> str:
    """``text`` with every character other than letters, digits, ``-``, ``_`` and ``.`` replaced by ``-``
    (cell ids and figure names made from solver labels such as ``ddim:eta=1.0``)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(text))


# -- the row schema --------------------------------------------------------------------------------------
def new_row(cell, *, model: str, model_kind: str, reference: str, changed_options: dict, run: dict,
            settings: dict, metric_labels: dict, env: dict, command: str, started: str) -> dict:
    """A results row for ``cell`` before it is measured: every column a row has, in the order written, with
    the measured ones NaN (status "ok" until a failure is recorded).  The one place a row's columns are made.

    Args:
        cell: the planned cell (``key``, ``cell_id``, ``solver``, ``label``, ``options``, ``deterministic``,
            ``steps``, ``spacing``, ``spacing_note``, ``grid``, ``nfe_declared``, ``guidance``: its
            classifier-free guidance scale, None → NaN in the ``guidance`` column for an unconditional model).

    ``nfe`` counts model calls per sample (as diffusers and papers do); ``network_rows`` the network batch rows
    per sample (NFE × rows per call: twice the NFE under guidance w ∉ {0, 1}, which runs the conditional and
    the unconditional branch in one batch).
        model, model_kind, reference: from the model card.
        changed_options: the solver options that differ from its defaults.
        run: ``num_samples``, ``batch_size``, ``seed``, ``device``, ``world_size``, ``reference_size``.
        settings: the run settings (:data:`RUN_SETTING_COLUMNS` and the timing conditions).
        metric_labels: metric key → label; one ``metric_<key>`` column each.
        env, command, started: the provenance columns.
    """
    row = {"schema_version": SCHEMA_VERSION, "cell_key": cell.key, "cell_id": cell.cell_id, "status": "ok",
           "error": "", "failure_kind": "", "model": model, "model_kind": model_kind, "solver": cell.solver,
           "solver_label": cell.label, "solver_options": json.dumps(cell.options, sort_keys=True, default=str),
           "solver_options_changed": json.dumps(changed_options, sort_keys=True, default=str),
           "deterministic": cell.deterministic, "steps": cell.steps,
           "guidance": float("nan") if getattr(cell, "guidance", None) is None else float(cell.guidance),
           "spacing": cell.spacing,
           "spacing_note": cell.spacing_note, "t_start": cell.grid[0], "t_last_level": cell.grid[-2],
           "t_end": cell.grid[-1], "timesteps": json.dumps([float(t) for t in cell.grid]),
           "grid_calibration": json.dumps(getattr(cell, "calibration", None) or {}, default=str), "nfe": float("nan"), "nfe_declared": cell.nfe_declared,
           "network_rows": float("nan"),
           "model_options": settings["model_options"], "model_digest": settings.get("model_digest", ""),
           "num_samples": run["num_samples"], "batch_size": run["batch_size"], "seed": run["seed"],
           "dtype": settings["dtype"], "device": run["device"], "device_type": settings["device_type"],
           "world_size": run["world_size"], "metrics": settings["metrics"], "reference": reference,
           "reference_size": run["reference_size"], "network": settings["network"],
           "rng": settings["rng"], "threads": settings["threads"],
           "time_total_s": float("nan"), "time_model_s": float("nan"), "time_solver_s": float("nan"),
           "time_decode_s": float("nan"),
           "time_per_sample_ms": float("nan"), "time_warmup_s": float("nan"), "time_metrics_s": float("nan"),
           "time_repeats": 0, "time_total_min_s": float("nan"), "time_total_max_s": float("nan"),
           "time_passes_s": "[]", "metric_labels": json.dumps(metric_labels), "metric_notes": "{}"}
    for k in metric_labels:
        row[METRIC_PREFIX + k] = float("nan")
    row.update(env)
    row.update({"started_at": started, "command": command})
    return row


# -- cell identity -----------------------------------------------------------------------------------------
def cell_key(model: str, solver: str, options: dict, steps: int, spacing: str,
             t_start: Optional[float] = None, guidance: Optional[float] = None) -> str:
    """A stable id of one sweep point: the model, the canonical solver with its options, steps, spacing,
    the grid's start where it is not the schedule's t_max, and the guidance scale of a class-conditional
    model's cell (None — an unconditional model — leaves the key as it always was)."""
    point = {"model": model, "solver": solver, "options": options, "steps": int(steps), "spacing": spacing,
             "t_start": t_start}
    if guidance is not None:
        point["guidance"] = float(guidance)
    blob = json.dumps(point, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _normalise(v: Any) -> Any:
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return v


def redone_on_resume(status: Any, kind: Any) -> bool:
    """Whether a plain rerun redoes a recorded cell of ``status`` and ``failure_kind``: one that failed by a fault
    of its environment (a cell that finished, or failed as a result, is skipped unless --force)."""
    return status == "failed" and kind == FAILURE_ENVIRONMENT


def check_run_settings(existing: pd.DataFrame, settings: dict, out_dir: os.PathLike) -> None:
    """Refuse to mix run settings in one results directory.

    Raises:
        IncompatibleResultsError: naming each setting that differs, with the old and new values.
    """
    if existing.empty:
        return
    diffs = []
    for k in RUN_SETTING_COLUMNS:
        if k in RUN_SETTINGS_UNRECORDED_BEFORE and (k not in existing.columns or existing[k].isna().all()):
            continue
        if k not in existing.columns:
            if k in RUN_SETTING_DEFAULTS and _normalise(settings.get(k)) == RUN_SETTING_DEFAULTS[k]:
                continue
            diffs.append(f"{k}: (missing in the file) vs {settings.get(k)!r}")
            continue
        values = [_normalise(v) for v in existing[k].tolist()]
        if k in RUN_SETTINGS_UNRECORDED_BEFORE:
            values = [v for v in values if v is not None]
        if k in RUN_SETTING_DEFAULTS:
            # Rows written before the setting existed are empty in its column once a newer run has added it
            # (an old file extended by a default run): they were made with the default.
            values = [RUN_SETTING_DEFAULTS[k] if v is None else v for v in values]
        old = sorted({str(v) for v in values})
        new = str(_normalise(settings.get(k)))
        if old != [new]:
            why = " (the files that define the model — its module, card file or weights — changed)" \
                if k == "model_digest" else ""
            diffs.append(f"{k}: {', '.join(old)} in the file vs {new} now{why}")
    if diffs:
        raise IncompatibleResultsError(
            f"{Path(out_dir) / RESULTS_CSV} holds results made with other run settings ("
            + "; ".join(diffs) + "). One results directory holds one study; it was not modified. "
            "Use another --out DIR (or move the old directory away).")
    _check_timing_settings(existing, settings, out_dir)


# How provenance.environment() ends device_name on a CPU: "… (N threads)".
THREADS_SUFFIX = re.compile(r"\s*\((\d+) threads\)\s*$")


def row_threads(row) -> Optional[int]:
    """The CPU thread count a row was timed with: its ``threads`` column, or for files from before that column
    the "(N threads)" that :func:`environment` wrote into ``device_name``; None where neither says."""
    value = _normalise(row.get("threads"))
    if value is not None:
        return int(value)
    found = THREADS_SUFFIX.search(str(row.get("device_name") or ""))
    return int(found.group(1)) if found else None


def _check_timing_settings(existing: pd.DataFrame, settings: dict, out_dir: os.PathLike) -> None:
    """Refuse rows timed under another --threads / --batch-size (their wall-clock is not comparable)."""
    diffs, same = [], []
    for k, flag in TIMING_SETTING_COLUMNS.items():
        if k == "threads":
            values = [row_threads(r) for r in existing.to_dict("records")]
        else:
            values = [_normalise(v) for v in existing[k].tolist()] if k in existing.columns else []
        old = sorted({int(v) for v in values if v is not None})
        new = _normalise(settings.get(k))
        if new is None or not old:
            continue
        if old != [int(new)]:
            diffs.append(f"{flag} {', '.join(map(str, old))} in the file vs {new} now")
            same.append(f"{flag} {old[0]}" if len(old) == 1 else f"{flag} (one of {', '.join(map(str, old))})")
    if diffs:
        raise IncompatibleResultsError(
            f"{Path(out_dir) / RESULTS_CSV} holds cells timed under other conditions ({'; '.join(diffs)}): "
            "wall-clock from different thread counts or batch sizes is not comparable, so one results directory "
            f"does not mix them; it was not modified. Rerun with the same values ({' '.join(same)}) or use "
            "another --out DIR.")


# -- timing over repeated passes -------------------------------------------------------------------------------
def timing_columns(passes: list[tuple[float, ...]]) -> dict:
    """The timing columns of a row from its timed passes, each (total, model, solver[, decode]) seconds.

    ``time_total_s``, ``time_model_s``, ``time_solver_s`` and ``time_decode_s`` are those of the median pass by
    total (the mean of the two middle passes for an even count), so that model + solver (+ decode, for a latent
    model's decoder; 0 without one) = total as in every pass; the spread is the fastest and slowest total, and
    every total is kept.

    Raises:
        ValueError: no pass.
    """
    if not passes:
        raise ValueError("a timed cell needs at least one pass")
    totals = [float(p[0]) for p in passes]
    ranked = sorted((tuple(float(v) for v in (*p, 0.0)[:4]) for p in passes), key=lambda p: p[0])
    middle = ranked[(len(ranked) - 1) // 2: len(ranked) // 2 + 1]
    total, model, solver, decode = (float(np.mean([p[i] for p in middle])) for i in range(4))
    return {"time_total_s": total, "time_model_s": model, "time_solver_s": solver, "time_decode_s": decode,
            "time_repeats": len(passes), "time_total_min_s": min(totals), "time_total_max_s": max(totals),
            "time_passes_s": json.dumps([round(t, 9) for t in totals])}


def row_timing(row) -> tuple[float, float, float, int]:
    """(median, fastest, slowest total seconds, number of passes) of a results row; a row from before the
    repeated passes (no or empty pass columns) is one pass: its time is all three."""
    median = float(row.get("time_total_s", np.nan))
    repeats = _normalise(row.get("time_repeats"))
    lo, hi = _normalise(row.get("time_total_min_s")), _normalise(row.get("time_total_max_s"))
    if repeats is None or lo is None or hi is None:
        return median, median, median, 1
    return median, float(lo), float(hi), int(repeats)


def relative_spread(median: float, lo: float, hi: float) -> float:
    """The spread of a cell's timed passes: half their range relative to the median, (hi − lo) / (2·median)
    (0 for one pass; NaN without a positive median)."""
    if not (median > 0) or not np.isfinite(lo) or not np.isfinite(hi):
        return float("nan")
    return (hi - lo) / (2.0 * median)


# -- load / save -----------------------------------------------------------------------------------------
def load_results(out_dir: os.PathLike, *, quiet: bool = False) -> pd.DataFrame:
    """The results table of ``out_dir`` (empty if there is none yet).

    A last row cut short (the file ends inside it: a disk filled up, a copy was interrupted) is not a finished
    cell: it is left out of the table, so the next write drops it and ``bench.run`` redoes that cell; a line
    on stderr names it unless ``quiet``.

    Raises:
        IncompatibleResultsError: the file is not a results table of this schema version.
    """
    path = Path(out_dir) / RESULTS_CSV
    if not path.exists():
        return pd.DataFrame()
    try:
        text = path.read_text(encoding="utf-8")
        complete, partial = split_incomplete_row(text)
        df = pd.read_csv(io.StringIO(complete), keep_default_na=True) if complete else pd.DataFrame()
    except Exception as e:  # a foreign or damaged file: refuse, keep it
        raise IncompatibleResultsError(f"{path} could not be read as a results table ({e}); "
                                       "it was left as it is: use another --out DIR or move it away") from e
    if partial == {} and not ("schema_version".startswith(text) or text.startswith("schema_version,")):
        raise IncompatibleResultsError(f"{path} is not a results table (its first line is incomplete and is not "
                                       "bench.run's header); it was left as it is: use another --out DIR or move "
                                       "it away")
    if df.empty and not len(df.columns):
        return df
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
    if partial and not quiet:
        cell = partial.get("cell_id") or partial.get("cell_key") or "unknown: cut before its id"
        print(f"bench: {path}: the last row (cell {cell}) is incomplete — the file ends inside it; it is not "
              "counted as done, is dropped at the next write, and bench.run redoes that cell", file=sys.stderr)
    return df


def split_incomplete_row(text: str) -> tuple[str, Optional[dict]]:
    """Split a results CSV into the text of its complete records and the incomplete last record, if any.

    ``save_results`` ends every record with a line break, and every record has one field per header column,
    with its quotes closed; a last record that breaks any of these was cut short.

    Returns:
        (text of the header and the complete rows, the incomplete row as {column: value} or None).

    Raises:
        ValueError: a record other than the last has the wrong number of fields (not a truncation).
    """
    spans = []  # (start offset, end offset, fields) of every record
    consumed = 0

    def lines() -> Iterator[str]:
        nonlocal consumed
        for line in io.StringIO(text, newline=""):
            consumed += len(line)
            yield line

    start = 0
    for fields in csv.reader(lines()):
        spans.append((start, consumed, fields))
        start = consumed
    if not spans:
        return "", None
    header = spans[0][2]
    for i, (_, _, fields) in enumerate(spans[1:-1], start=2):
        if len(fields) != len(header):
            raise ValueError(f"record {i} has {len(fields)} fields, the header {len(header)}")
    first, end, fields = spans[-1]
    whole = text.endswith(("\n", "\r")) and text[first:end].count('"') % 2 == 0
    if whole and (len(spans) == 1 or len(fields) == len(header)):
        return text, None
    if len(spans) == 1:  # cut inside the header: no row at all
        return "", {}
    return text[:first], dict(zip(header, fields))


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


@contextlib.contextmanager
def results_lock(out_dir: os.PathLike) -> Iterator[None]:
    """Hold ``out_dir``'s write lock (``results.lock``; the operating system releases it when the process ends,
    however it ends), so that processes writing to one results directory take turns."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "a+b") as f:
        _lock_file(f, True)
        try:
            yield
        finally:
            _lock_file(f, False)


def _lock_file(f, lock: bool) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        f.seek(0)
        if lock:
            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)  # retries for 10 s, then raises
                    return
                except OSError:
                    continue
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX if lock else fcntl.LOCK_UN)


def record_row(out_dir: os.PathLike, row: dict, settings: dict,
               write_files: Optional[Callable[[], None]] = None) -> pd.DataFrame:
    """Add one cell's row to ``out_dir``'s results without losing another process's rows.

    Under :func:`results_lock` the file is read again (another ``bench.run`` into the same directory may have
    added rows since), checked against this run's ``settings``, then ``write_files()`` writes the files that go
    with the row (its preview, samples, the run's reference data) — only once the check has passed, so a refused
    run writes nothing — and the row is added and the table written atomically.

    Returns:
        The table as written.

    Raises:
        IncompatibleResultsError: rows written meanwhile by a run with other settings (the file is kept).
    """
    with results_lock(out_dir):
        df = load_results(out_dir, quiet=True)
        check_run_settings(df, settings, out_dir)
        if write_files is not None:
            write_files()
        df = upsert_row(df, row)
        save_results(df, out_dir)
    return df


def metric_columns(df: pd.DataFrame) -> list[str]:
    """The metric value columns (``metric.<key>``) of a results table, in order."""
    return [c for c in df.columns if c.startswith(METRIC_PREFIX)]


def write_reference_info(out_dir: os.PathLike, info: dict) -> None:
    """Write a sweep's reference data (``reference.json``, atomically): ``{"metrics": {key: {"label", "floor",
    "note"}}, "card": {...}, "num_samples", "command", "written_at"}``.  A floor is ``[mean, sd]`` over fresh
    draws of exact samples (or a bare number, sd unknown), None where the metric has none."""
    atomic_write_text(Path(out_dir) / REFERENCE_JSON, json.dumps(info, indent=2, default=str))


def load_reference_info(out_dir: os.PathLike) -> dict:
    """The reference data written by :func:`write_reference_info` ({} where the sweep wrote none)."""
    path = Path(out_dir) / REFERENCE_JSON
    return json.loads(path.read_text()) if path.exists() else {}


def save_preview(out_dir: os.PathLike, name: str, array: np.ndarray, kind: str) -> None:
    """Save a preview ``previews/NAME.npz`` (arrays ``data`` and ``kind``: "images" or "points"), atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, data=array, kind=np.array(kind))
    atomic_write_bytes(Path(out_dir) / PREVIEWS / f"{name}.npz", buf.getvalue())


def save_samples(out_dir: os.PathLike, name: str, samples: np.ndarray, value_range: tuple,
                 labels: Optional[np.ndarray] = None) -> Path:
    """Save every sample of a cell as ``samples/NAME.npz`` (arrays ``samples``: float32, one row per sample,
    e.g. (N, C, H, W) for images, in the model card's data scale as the solver returned them, not clipped;
    ``value_range``: the card's data range, 2 floats; ``labels``, for a class-conditional model: int64 (N,),
    the class each sample was generated for), atomically; returns the path.

    Raises:
        ValueError: labels that are not one per sample.
    """
    arrays = {"samples": np.asarray(samples, dtype=np.float32), "value_range": np.asarray(value_range, np.float64)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
        if arrays["labels"].shape != (len(arrays["samples"]),):
            raise ValueError(f"labels must be one per sample, shape ({len(arrays['samples'])},); got "
                             f"{arrays['labels'].shape}")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = Path(out_dir) / SAMPLES / f"{name}.npz"
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_preview(out_dir: os.PathLike, name: str) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(data, kind) of a saved preview, or (None, None) where there is none (read without pickle)."""
    path = Path(out_dir) / PREVIEWS / f"{name}.npz"
    if not path.exists():
        return None, None
    with np.load(path, allow_pickle=False) as z:
        return z["data"], str(z["kind"])

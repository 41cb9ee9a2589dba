"""One sweep, step by step: prepare (load the model, plan the cells, fast paths, what to resume, references),
then for each cell sample → measure → record, then the report.

A cell's samples come from the same per-sample seeds in every cell (``seed·1000003 + j``, whatever the batch
size or the number of torchrun processes, each of which samples a contiguous block); one warm-up run of each
batch shape is excluded from the timing; the timed pass is repeated as ``--repeats`` asks (the samples and the
metrics are the first pass's).  Rank 0 measures, records the row (:func:`bench.results.record_row`) and
writes the report.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import dataclasses
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

import pretrained
from pretrained.user_models import call_mismatch
import solvers

from . import metrics as M
from .config import SweepConfig
from .distributed import Dist
from .provenance import model_digest
from .plan import OPTIMIZED, Cell, UsageError, check_seed, plan_cells, sample_labels
from .references import (PREVIEW_IMAGES, PREVIEW_POINTS, CellFeatures, Evaluator, prepare_references,
                         write_reference)
from .results import (FAILURE_ENVIRONMENT, FAILURE_RESULT, METRIC_PREFIX, IncompatibleResultsError, atomic_write_text,
                      check_run_settings, environment, load_results, new_row, record_row, redone_on_resume,
                      results_lock, row_timing, save_preview, save_samples, timing_columns)

__all__ = ["Sweep", "run_sweep", "load_and_plan", "apply_fast_paths", "sample_seeds", "more_passes",
           "AllCellsFailedError", "SEED_STRIDE", "WARMUP_STEPS", "REPEAT_CAP", "REPEAT_BUDGET_S", "REPEAT_SHARE"]

SEED_STRIDE = 1_000_003          # sample j of run seed s uses seed s·SEED_STRIDE + j
CALIBRATION_SAMPLES = 64         # --spacing optimized: the calibration batch (seeds from the top of the block)
CALIBRATION_FOLDER = "optimized_grids"
WARMUP_STEPS = 3                 # enough for second-order and multistep code paths to run once
# --repeats auto: at most REPEAT_CAP timed passes per cell, the extra ones only while together they take at most
# REPEAT_BUDGET_S + REPEAT_SHARE × the first pass (see more_passes): cheap cells get a median of 5, a cell
# whose pass takes over ~0.6 s keeps its one pass (--repeats N asks for N).
REPEAT_CAP = 5
REPEAT_BUDGET_S = 0.5
REPEAT_SHARE = 0.2


class AllCellsFailedError(RuntimeError):
    """Every cell this run tried failed (each is recorded with its reason): nothing was measured."""


# Faults of a cell's environment, not results of its solver or model: a full disk or another I/O error, memory
# that ran out (host or device), a lost process group.  The row records them as such and a plain rerun redoes them.
ENVIRONMENT_FAULTS = tuple(t for t in (OSError, MemoryError, getattr(torch.cuda, "OutOfMemoryError", None),
                                       getattr(torch.distributed, "DistError", None)) if t is not None)


def failure_kind(error: BaseException) -> str:
    """Whether a cell's ``error`` is a fault of its environment (:data:`ENVIRONMENT_FAULTS`, or an error marked
    so), which a rerun redoes, or its result (the solver diverged, the model raised), which stays recorded."""
    marked = getattr(error, "failure_kind", None)
    if marked is not None:
        return marked
    return FAILURE_ENVIRONMENT if isinstance(error, ENVIRONMENT_FAULTS) else FAILURE_RESULT


@dataclass
class Sweep:
    """A sweep in progress: its frozen configuration and what the process resolved for it — the process's
    place in the job, the device, the model card, then (once prepared) the model, the cells and the run
    settings."""

    cfg: SweepConfig
    dist: Dist
    device: str
    progress: bool
    card: Any
    model: Any = None
    decoder: Any = None  # the card's decoder (latent models): latents → data, timed apart from sampling
    cells: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.cfg.dtype)

    @property
    def out_dir(self) -> Path:
        return self.cfg.out_dir


def sample_seeds(seed: int, start: int, stop: int) -> list[int]:
    """The per-sample seeds of samples start … stop−1 (the same in every cell and every process split)."""
    check_seed(seed)
    return [seed * SEED_STRIDE + j for j in range(start, stop)]




def _check_weights(model_options: dict) -> None:
    """Refuse a --weights (or --model-opt weights=) path that does not exist, before loading anything."""
    path = model_options.get("weights")
    if isinstance(path, (str, os.PathLike)) and not Path(path).exists():
        raise UsageError(f"--weights {path}: no such file or folder; give the model's weights file (or the "
                         "folder holding it), or leave --weights out to use the card's lookup")



# -- sampling one cell -------------------------------------------------------------------------------------
def _batches(sweep: Sweep) -> list[tuple[int, int]]:
    """This rank's batches of sample indices, (start, stop) each."""
    start, stop = sweep.dist.slice(sweep.cfg.num_samples)
    size = sweep.cfg.batch_size
    return [(i, min(i + size, stop)) for i in range(start, stop, size)]


def _batch_labels(sweep: Sweep, b0: int, b1: int) -> Optional[torch.Tensor]:
    """The class labels of samples b0 … b1−1 (:func:`bench.plan.sample_labels`; None for an unconditional model)."""
    return sample_labels(b0, b1, sweep.card.num_classes) if sweep.card.num_classes else None


def _conditioned(sweep: Sweep, labels: Optional[torch.Tensor], guidance: Optional[float]) -> solvers.DiffusionModel:
    """The model that samples a batch: for a cell with a guidance scale, ``card.condition(model, labels, w)`` —
    one call per batch — under the run's autocast / channels-last (which wrap the conditioned call; --compile and
    --cuda-graph are refused for these models); the sweep's model otherwise."""
    if guidance is None:
        return sweep.model
    model = sweep.card.condition(sweep.model, labels.to(sweep.device), float(guidance))
    if sweep.cfg.network != "eager":
        model = solvers.accelerate(model, autocast=sweep.cfg.autocast, channels_last=sweep.cfg.channels_last)
    return model


def _batch_model(sweep: Sweep, cell: Cell, b0: int, b1: int) -> solvers.DiffusionModel:
    """The model that samples batch b0 … b1−1 of ``cell`` (:func:`_conditioned` on the batch's labels)."""
    return _conditioned(sweep, _batch_labels(sweep, b0, b1), cell.guidance)


def _sample_kw(sweep: Sweep, cell: Cell, warm_up: bool = False) -> dict:
    """solvers.sample's arguments for a cell: its spacing, or its calibrated grid (the warm-up's short run of an
    optimised cell uses the grid it started from)."""
    if cell.spacing == OPTIMIZED and not warm_up:
        grid = dict(timesteps=cell.grid)
    else:
        grid = dict(spacing=cell.base_spacing or cell.spacing, t_start=cell.t_start)
    return dict(solver=cell.solver, dtype=sweep.dtype, on_nonfinite="raise", rng=sweep.cfg.rng, **grid,
                **cell.options)


def _initial_noise(sweep: Sweep, cell: Cell, b0: int, b1: int) -> torch.Tensor:
    """x_T of samples b0 … b1−1 at the cell's first grid time (the same in every cell)."""
    return solvers.initial_noise((b1 - b0, *sweep.card.sample_shape), sample_seeds(sweep.cfg.seed, b0, b1),
                                 schedule=sweep.model.schedule, t=cell.grid[0], dtype=sweep.dtype,
                                 device=sweep.device, rng=sweep.cfg.rng)


def _warm_up(sweep: Sweep, cell: Cell) -> float:
    """Run each distinct batch shape (the full one and a shorter last one) through a short grid of the cell's
    solver, so that lazy initialisation, kernel selection, allocator growth, torch.compile and CUDA-graph
    capture are not charged to the timed passes. Returns its wall-clock (0 when this rank has no batch)."""
    batches = _batches(sweep)
    t0 = time.perf_counter()
    for b0, b1 in {b1 - b0: (b0, b1) for b0, b1 in batches}.values():
        res = solvers.sample(_batch_model(sweep, cell, b0, b1), _initial_noise(sweep, cell, b0, b1),
                             steps=min(cell.steps, WARMUP_STEPS),
                             seeds=sample_seeds(sweep.cfg.seed, b0, b1), **_sample_kw(sweep, cell, warm_up=True))
        _decode(sweep, res.samples)
    return time.perf_counter() - t0 if batches else 0.0


def _decode(sweep: Sweep, latents: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(decoded samples, seconds) through the card's decoder, the device synchronised around it; the latents
    themselves and 0 s for a model without one."""
    if sweep.decoder is None:
        return latents, 0.0
    cuda = torch.device(sweep.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(sweep.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = sweep.decoder(latents)
    if cuda:
        torch.cuda.synchronize(sweep.device)
    return out, time.perf_counter() - t0


def _timed_pass(sweep: Sweep, cell: Cell, desc: str, features: Optional[CellFeatures] = None) -> dict:
    """One timed pass over this rank's batches (the same seeds every pass): NFE, the summed timings and, with
    ``features``, each batch folded into them right after it is sampled (samples decoded, for a latent model;
    its x_T, ODE states and labels) — so memory is bounded by the batch, not by the number of samples — and
    the time that took (``metric_time``); with --save-samples also the samples themselves (on the CPU). The
    timing is (total, model, solver, decode) seconds, total = sampling + decoding; ``rows``: the network batch
    rows evaluated (NFE × rows per sample, summed over the samples: two per sample and call under guidance
    w ∉ {0, 1})."""
    kept = []
    total = model_t = solver_t = decode_t = metric_t = 0.0
    nfe, rows = None, 0
    for b0, b1 in _bar(_batches(sweep), desc=desc, unit="batch", leave=False, disable=not sweep.progress):
        x_T = _initial_noise(sweep, cell, b0, b1)
        res = solvers.sample(_batch_model(sweep, cell, b0, b1), x_T, steps=cell.steps,
                             seeds=sample_seeds(sweep.cfg.seed, b0, b1), **_sample_kw(sweep, cell))
        if nfe is not None and res.nfe != nfe:
            raise RuntimeError(f"NFE differs between batches ({nfe} vs {res.nfe})")
        nfe = res.nfe
        rows += res.model_rows
        decoded, seconds = _decode(sweep, res.samples)
        total += res.time_total + seconds
        model_t += res.time_model
        solver_t += res.time_solver
        decode_t += seconds
        if features is not None:
            t0 = time.perf_counter()
            features.add(decoded, x_T, latents=res.samples, labels=_batch_labels(sweep, b0, b1))
            metric_t += time.perf_counter() - t0
            if sweep.cfg.save_samples:
                kept.append(decoded.detach().cpu())
    samples = torch.cat(kept).numpy() if kept else None
    return {"samples": samples, "nfe": nfe, "rows": rows, "metric_time": metric_t,
            "timing": (total, model_t, solver_t, decode_t)}


def calibration_seeds(seed: int, n: int) -> list[int]:
    """The seeds of an optimised grid's calibration batch: the top of the run seed's block,
    seed·SEED_STRIDE + SEED_STRIDE − 1 − j, disjoint from every evaluation sample's (j < 1,000,003 − n)."""
    check_seed(seed)
    return [seed * SEED_STRIDE + SEED_STRIDE - 1 - j for j in range(n)]


def _calibrated(sweep: Sweep, cell: Cell) -> Cell:
    """The cell with its optimised grid (``--spacing optimized``): computed on rank 0 — or read from
    ``OUT/optimized_grids/KEY.json`` — and shared; other cells as they are."""
    if cell.spacing != OPTIMIZED:
        return cell
    record = None
    if sweep.dist.main:
        try:
            record = _calibration_record(sweep, cell)
        except Exception as e:  # noqa: BLE001 — the cell's failure, on every rank
            record = {"error": f"calibrating its grid: {type(e).__name__}: {e}", "kind": failure_kind(e)}
    record = sweep.dist.broadcast(record)
    if "error" in record:
        error = RuntimeError(record["error"])
        error.failure_kind = record["kind"]  # a disk full while caching the grid is not the cell's result
        raise error
    return dataclasses.replace(cell, grid=[float(t) for t in record["optimized"]], calibration=record)


def _calibration_key(sweep: Sweep, cell: Cell) -> str:
    """What an optimised grid depends on besides the cell: the model's identity (its digest and loader options),
    the calibration batch (seed, size, dtype, noise generator) and how the network is called."""
    cfg = sweep.cfg
    point = [cell.key, cfg.model_digest, cfg.model_options_json(), cfg.seed, min(CALIBRATION_SAMPLES, cfg.num_samples),
             cfg.dtype, cfg.rng, cfg.network, torch.device(sweep.device).type]
    return hashlib.sha256(json.dumps(point, default=str).encode()).hexdigest()[:32]


def _record_digest(record: dict) -> str:
    """sha256 of a cached grid record's content (every field but its ``digest``)."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _grid_problem(record: Any, key: str, length: int) -> Optional[str]:
    """Why a cached grid record cannot be used (None where it can): its digest, its key, its grid's shape."""
    if not isinstance(record, dict) or record.get("digest") != _record_digest(record):
        return "its content does not match its digest: edited or damaged"
    if record.get("cache_key") != key:
        return "it was made for another model or run settings"
    grid = record.get("optimized")
    if not isinstance(grid, list) or len(grid) != length or not all(isinstance(t, (int, float)) for t in grid) \
            or not all(math.isfinite(t) for t in grid) or any(a <= b for a, b in zip(grid, grid[1:])):
        return f"its grid is not {length} finite, decreasing times"
    return None


def _cached_calibration(sweep: Sweep, cell: Cell, path: Path, key: str) -> Optional[dict]:
    """The checked record at ``path``; None where there is none or it fails its check (one line says why)."""
    if not path.exists():
        return None
    try:
        problem = _grid_problem(record := json.loads(path.read_text()), key, len(cell.grid))
    except (OSError, ValueError) as e:
        problem = f"unreadable: {type(e).__name__}: {e}"
    if problem is None:
        return record
    say(sweep, f"the cached grid {path} fails its check ({problem}); computing it again")
    return None


def _calibration_record(sweep: Sweep, cell: Cell) -> dict:
    """The cell's optimised grid and how it was found: from ``OUT/optimized_grids/`` where a checked record of
    this model and run settings is there, else calibrated now and written there (atomically)."""
    key = _calibration_key(sweep, cell)
    path = sweep.out_dir / CALIBRATION_FOLDER / f"{cell.cell_id}-{key[:16]}.json"
    cached = _cached_calibration(sweep, cell, path, key)
    if cached is not None:
        return cached
    n = min(CALIBRATION_SAMPLES, sweep.cfg.num_samples)
    seeds = calibration_seeds(sweep.cfg.seed, n)
    say(sweep, f"optimizing the {cell.label} × {cell.steps}-step grid on {n} calibration samples (seeds "
               f"disjoint from the evaluation's; ~200 sampling runs of that batch; cached in {path})")
    t0 = time.perf_counter()
    x = solvers.initial_noise((n, *sweep.card.sample_shape), seeds, schedule=sweep.model.schedule, t=cell.grid[0],
                              dtype=sweep.dtype, device=sweep.device, rng=sweep.cfg.rng)
    # under guidance: the calibration batch's labels are 0 … n−1 mod C, balanced like the evaluated samples'
    model = _conditioned(sweep, _batch_labels(sweep, 0, n), cell.guidance)
    opt = solvers.optimize_timesteps(model, x, solver=cell.solver, steps=cell.steps, t_start=cell.t_start,
                                     spacing=cell.base_spacing, **cell.options)
    record = {"from": cell.base_spacing, "default": list(opt.default_timesteps), "optimized": list(opt.timesteps),
              "error_before": opt.error_before, "error_after": opt.error_after, "nfe": opt.nfe,
              "reference_error": opt.reference_error, "calibration_samples": n,
              "calibration_seeds": f"{seeds[-1]}…{seeds[0]}", "method": opt.method, "guidance": cell.guidance,
              "seconds": time.perf_counter() - t0, "cache_key": key}
    record = json.loads(json.dumps(record, default=str))  # as it reads back, so that its digest checks
    record["digest"] = _record_digest(record)
    atomic_write_text(path, json.dumps(record, indent=1))
    return record


def _sample_cell(sweep: Sweep, cell: Cell, features: CellFeatures) -> dict:
    """Generate this rank's samples of a cell into ``features``; returns NFE, timing (warm-up excluded) and the
    time the features took (and the samples, with --save-samples)."""
    warmup = _warm_up(sweep, cell)
    gen = _timed_pass(sweep, cell, desc=f"  {cell.label} {cell.steps} steps", features=features)
    gen["warmup"] = warmup
    return gen


def more_passes(totals: Sequence[float], repeats: Optional[int]) -> bool:
    """Whether a cell timed ``totals`` (seconds per pass so far, the first one first) gets another timed pass.

    With ``repeats`` (``--repeats N``): until there are N. Automatically (None): at most ``REPEAT_CAP``
    passes, and another one only while the extra passes, the next one included (estimated as the median so
    far), stay within ``REPEAT_BUDGET_S`` + ``REPEAT_SHARE`` × the first pass.
    """
    if repeats is not None:
        return len(totals) < repeats
    if len(totals) >= REPEAT_CAP:
        return False
    extra = sum(totals[1:]) + float(np.median(totals))
    return extra <= REPEAT_BUDGET_S + REPEAT_SHARE * totals[0]


def _timed_passes(sweep: Sweep, cell: Cell, gen: Optional[dict]) -> tuple[list[tuple], Optional[str]]:
    """Every timed pass of a cell, each (total, model, solver, decode) of the slowest rank: the first (``gen``, this
    rank's first pass; None where it failed) and the repeats :func:`more_passes` asks for, run on every rank
    from the same seeds for the timing alone (the samples are thrown away: they are the first pass's).
    Returns the passes and the (error, failure kind) of a failed repeat."""
    dist = sweep.dist
    passes: list[tuple] = []
    mine, error = (gen["timing"] if gen is not None else None), None
    while True:
        everyone = dist.all_gather(mine)  # every rank takes the same decision from the same numbers
        if any(p is None for p in everyone):
            return passes, error
        passes.append(max(everyone, key=lambda p: p[0]))
        if not more_passes([p[0] for p in passes], sweep.cfg.repeats):
            return passes, None
        try:
            mine = _timed_pass(sweep, cell, desc=f"  {cell.label} {cell.steps} steps, timing pass {len(passes) + 1}")
            mine = mine["timing"]
        except Exception as e:  # noqa: BLE001 — recorded as the cell's failure
            mine, error = None, (f"timing pass {len(passes) + 1}: {type(e).__name__}: {e}", failure_kind(e))


def _bar(iterable, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, **kw)


# -- the sweep ------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")




def _check_loader_options(card, options: dict) -> None:
    """Refuse options (``--model-opt``, ``--weights``) that the card's loader does not take, before it runs.

    Raises:
        UsageError: naming the options and what the loader takes.
    """
    mismatch = call_mismatch(card.loader, device="cpu", **options)
    if mismatch is not None:
        takes = ", ".join(n for n in mismatch[1].split(", ") if n and n != "device") or "no options"
        raise UsageError(f"--model-opt: {card.name}'s loader does not take these options ({mismatch[0]}); it "
                         f"takes: {takes}")


def load_and_plan(sweep: Sweep) -> None:
    """Load the model (its weights checked first) and resolve every cell; refuse fast paths that cannot apply.

    Raises:
        UsageError: a missing weights file, options the loader does not take, a model that cannot be loaded, or
            a fast path this device or solver cannot use.
    """
    cfg, card = sweep.cfg, sweep.card
    options = cfg.model_kwargs
    _check_weights(options)
    if card.kind != "analytic":
        say(sweep, loading_message(card, options))
    _check_loader_options(card, options)
    try:
        sweep.model = pretrained.load(card, device=sweep.device, **options)
    except TypeError as e:  # raised inside the loader: its own call went wrong, not ours
        raise UsageError(f"cannot load {card.name}: its loader raised TypeError: {e}") from None
    except (ValueError, ImportError) as e:
        raise UsageError(f"cannot load {card.name}: {e}") from None
    # what the model is, hashed once: a run setting and part of every cache key (reference solutions, grids)
    sweep.cfg = cfg = replace(cfg, model_digest=model_digest(cfg.model_source or card.name, card, options))
    if card.decoder is not None:
        try:
            sweep.decoder = card.decoder(device=sweep.device)
        except (ValueError, ImportError) as e:
            raise UsageError(f"cannot load {card.name}'s decoder: {e}") from None
    sweep.cells = plan_cells(card, sweep.model, list(cfg.specs), list(cfg.steps), cfg.spacing, cfg.guidance)
    if cfg.cuda_graph and torch.device(sweep.device).type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device; this run is on {sweep.device}")
    variable_rows = [s.label for s in cfg.specs if solvers.solver_class(s.name).adaptive]
    if variable_rows and (cfg.cuda_graph or cfg.compile):
        raise UsageError(f"{', '.join(variable_rows)}: the adaptive solver calls the network on a varying number of "
                         "rows, so --cuda-graph / --compile would capture or compile every row count; run it "
                         "without them")


def loading_message(card, options: dict) -> str:
    """The line announcing a model's load: where its weights come from, for a model that has weights."""
    origin = _weights_origin(card, options)
    return f"loading {card.name}" if origin is None else f"loading {card.name}'s weights from {origin}"


def _weights_origin(card, options: dict) -> Optional[str]:
    """Where a model's weights come from, in words (for the line announcing the load); None where the harness
    cannot say (a user's model, which may have none)."""
    from pretrained.checkpoints import cache_dir
    if "weights" in options:
        return str(options["weights"])
    if card.extra.get("weights") is not None:
        return f"{card.extra['weights']} (committed with this project, sha256-checked)"
    if pretrained.CARDS.get(card.name) is not card:
        return None  # a user's model: its own code loads whatever it has (perhaps nothing)
    return (f"the card's lookup (its environment variable, the assets folder, the cache {cache_dir()}, then a "
            "verified download)")


def apply_fast_paths(sweep: Sweep) -> None:
    """Choose ``--batch-size auto`` (a new config with the chosen size) and wrap the network for autocast,
    channels-last, compile or CUDA graphs."""
    cfg = sweep.cfg
    if cfg.batch_size == "auto":
        from .autobatch import auto_batch_size
        # probed without compilation or graphs, which would compile or capture every probed shape
        probe = solvers.accelerate(_guided_probe(sweep), autocast=cfg.autocast, channels_last=cfg.channels_last)
        per_rank = -(-cfg.num_samples // sweep.dist.world)
        chosen = auto_batch_size(probe, tuple(sweep.card.sample_shape), sweep.device, sweep.dtype, cap=per_rank)
        sweep.cfg = cfg = replace(cfg, batch_size=chosen.batch_size)
        if sweep.dist.main and not cfg.quiet:
            print(f"bench.run: --batch-size {chosen.note}", file=sys.stderr)
    if cfg.network != "eager" and not cfg.guidance:  # a plain run calls the network directly, no wrapper on the
        # hot path; a conditioned model gets its wrapper per batch (_conditioned), around the conditioned call
        try:
            sweep.model = solvers.accelerate(sweep.model, autocast=cfg.autocast, channels_last=cfg.channels_last,
                                             compile=cfg.compile or False, cuda_graph=cfg.cuda_graph)
        except ValueError as e:
            raise UsageError(str(e)) from None


def _guided_probe(sweep: Sweep) -> solvers.DiffusionModel:
    """What --batch-size auto probes: the model, or for a class-conditional one the model conditioned — at each
    probed batch size — at the sweep's costliest guidance scale (two network rows per sample at w ∉ {0, 1})."""
    if not sweep.cfg.guidance:
        return sweep.model
    w = next((w for w in sweep.cfg.guidance if w not in (0.0, 1.0)), sweep.cfg.guidance[0])

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _conditioned(sweep, _batch_labels(sweep, 0, x.shape[0]), w).raw(x, t)

    return solvers.DiffusionModel(call, schedule=sweep.model.schedule, prediction=sweep.model.prediction)


def _run_settings(sweep: Sweep) -> dict:
    cfg = sweep.cfg
    return {"model": sweep.card.name, "num_samples": cfg.num_samples, "seed": cfg.seed,
            "metrics": ",".join(cfg.metrics), "dtype": cfg.dtype, "reference": sweep.card.reference,
            "device_type": torch.device(sweep.device).type, "reference_size": cfg.reference_size,
            "network": cfg.network, "rng": cfg.rng, "threads": torch.get_num_threads(),
            "batch_size": cfg.batch_size, "model_options": cfg.model_options_json(), "model_digest": cfg.model_digest}


def _cells_to_run(sweep: Sweep) -> list[Cell]:
    """The cells not yet in the results (all with --force), decided on rank 0 and shared; says so unless quiet.

    Raises:
        IncompatibleResultsError: the results folder was made with other run settings.
    """
    cfg, dist, cells = sweep.cfg, sweep.dist, sweep.cells
    plan = None
    if dist.main:
        try:
            existing = load_results(sweep.out_dir)
            check_run_settings(existing, sweep.settings, sweep.out_dir)
            plan = {**_resume_plan(existing, cells, cfg.force), "error": None}
        except IncompatibleResultsError as e:
            plan = {"error": str(e)}
    plan = dist.broadcast(plan)
    if plan["error"]:
        raise IncompatibleResultsError(plan["error"])
    todo = [c for c in cells if c.key in set(plan["todo"])]
    if dist.main and not cfg.quiet:
        msg = f"bench.run: {sweep.card.name}, {len(cells)} cells ({len(todo)} to run"
        if plan["ok"] or plan["failed"]:
            msg += f"; skipping {plan['ok']} done" + (f" and {plan['failed']} recorded as failed — --force redoes "
                                                       "them" if plan["failed"] else "")
        if plan["redone"]:
            msg += (f"; redoing {plan['redone']} that failed by a fault of its environment (disk, memory, a lost "
                    "process), not as a result")
        print(msg + f"), {cfg.num_samples} samples each on {sweep.device}"
              + (f" × {dist.world} processes" if dist.world > 1 else "") + f" → {sweep.out_dir}", file=sys.stderr)
    return todo


def _resume_plan(existing, cells: list[Cell], force: bool) -> dict:
    """Which cells a run does given the recorded rows: the keys to run, and how many are skipped as done, skipped
    as failed (a result) and redone because they failed by a fault of their environment."""
    recorded = {} if existing.empty else {
        key: (status, kind) for key, status, kind in zip(existing["cell_key"], existing["status"],
                                                         existing.get("failure_kind", [None] * len(existing)))}
    redone = [c.key for c in cells if not force and c.key in recorded and redone_on_resume(*recorded[c.key])]
    skipped = [recorded[c.key][0] for c in cells if not force and c.key in recorded and c.key not in redone]
    return {"todo": [c.key for c in cells if force or c.key not in recorded or c.key in redone],
            "ok": skipped.count("ok"), "failed": skipped.count("failed"), "redone": len(redone)}


def _run_cell(sweep: Sweep, evaluator: Evaluator, cell: Cell, env: dict, command: str,
              run_files: list) -> Optional[tuple[str, str]]:
    """Sample one cell on every rank, measure it and record its row on rank 0; returns its failure, if any, as
    (text, failure kind).
    ``run_files``: writers of this run's own files (its reference data), written with its first row and then
    emptied."""
    dist = sweep.dist
    started = _now()
    t_cell = time.perf_counter()
    gen = None
    try:
        cell = _calibrated(sweep, cell)
        features = evaluator.cell_features(cell)
        gen = _sample_cell(sweep, cell, features)
        t_metric = time.perf_counter()
        labels = _batch_labels(sweep, *sweep.dist.slice(sweep.cfg.num_samples))
        payload = {"features": features.result(), "warmup": gen["warmup"], "nfe": gen["nfe"], "rows": gen["rows"],
                   "metric_time": gen["metric_time"] + time.perf_counter() - t_metric, "samples": gen["samples"],
                   "labels": None if labels is None else labels.numpy()}
    except Exception as e:  # noqa: BLE001 — a failed cell is recorded with its reason; the sweep goes on
        payload = {"error": f"{type(e).__name__}: {e}", "kind": failure_kind(e)}
    # the repeats time the sampling only: the samples and the metrics are the first pass's
    passes, repeat_error = _timed_passes(sweep, cell, gen if "error" not in payload else None)
    if repeat_error:
        payload = {"error": repeat_error[0], "kind": repeat_error[1]}
    parts = dist.gather(payload)
    if not dist.main:
        return None
    errors = [(p["error"], p["kind"]) for p in parts if "error" in p]
    row = _base_row(sweep, cell, env, command, started)
    files: list = []
    if not errors:
        try:
            files = _measure_into(row, sweep, evaluator, cell, parts, passes)
        except Exception as e:  # noqa: BLE001
            errors.append((f"{type(e).__name__}: {e}", failure_kind(e)))
    failure = None
    if errors:
        row.update({"status": "failed", "error": errors[0][0], "failure_kind": errors[0][1]})
        failure = (f"{cell.name}: {errors[0][0]}", errors[0][1])
    row["finished_at"] = _now()
    row["time_cell_s"] = time.perf_counter() - t_cell
    # record_row re-reads the file under a lock: rows of a concurrent run are kept; the files are written there,
    # once the settings check has passed (a refused run writes nothing)
    record_row(sweep.out_dir, row, sweep.settings, write_files=lambda: [write() for write in run_files + files])
    run_files.clear()
    if not sweep.cfg.quiet:
        _bar_write(_cell_line(row, sweep.cfg.metrics, {k: M.METRICS[k].label for k in sweep.cfg.metrics}))
    return failure


def _measure_into(row: dict, sweep: Sweep, evaluator: Evaluator, cell: Cell, parts: list[dict],
                  passes: list[tuple]) -> list[Callable[[], None]]:
    """The metric values and timings (medians over the timed ``passes``) of a cell from every rank's part, into
    ``row``; returns the writers of its preview (and, with --save-samples, its samples), run when it is recorded."""
    t_fin = time.perf_counter()
    values, notes = evaluator.finalize(cell, [p["features"] for p in parts])
    row.update(timing_columns(passes))
    row.update({"nfe": parts[0]["nfe"], "network_rows": sum(p["rows"] for p in parts) / sweep.cfg.num_samples,
                "time_per_sample_ms": 1000.0 * row["time_total_s"] * sweep.dist.world / sweep.cfg.num_samples,
                "time_warmup_s": max(p["warmup"] for p in parts),
                "time_metrics_s": max(p["metric_time"] for p in parts) + time.perf_counter() - t_fin,
                "metric_notes": json.dumps(notes)})
    for k in sweep.cfg.metrics:
        row[METRIC_PREFIX + k] = values[k]
    preview = np.concatenate([p["features"]["preview"] for p in parts])
    files = [lambda: save_preview(sweep.out_dir, cell.cell_id,
                                  preview[:PREVIEW_IMAGES if evaluator.image else PREVIEW_POINTS],
                                  "images" if evaluator.image else "points")]
    if sweep.cfg.save_samples:  # every rank's samples, in rank order (the order of the seeds)
        labels = None if parts[0]["labels"] is None else np.concatenate([p["labels"] for p in parts])
        samples = np.concatenate([p["samples"] for p in parts])
        files.append(lambda: save_samples(sweep.out_dir, cell.cell_id, samples, sweep.card.data_range, labels=labels))
    return files


def _finish(sweep: Sweep, todo: list[Cell], failed: list[tuple[str, str]]) -> None:
    """The report (rank 0, unless --no-report), the ranks' last barrier, and the error when every cell failed
    (``failed``: each failed cell's (text, failure kind))."""
    dist, out_dir = sweep.dist, sweep.out_dir
    if dist.main and not sweep.cfg.no_report:
        from .report import build_report
        with results_lock(out_dir):  # a concurrent run's last report then includes every row
            build_report(out_dir, quiet=sweep.cfg.quiet)
    if dist.world > 1:
        torch.distributed.barrier()
    if dist.main and todo and len(failed) == len(todo):
        raise AllCellsFailedError(f"every cell of this run failed ({len(failed)} of {len(todo)}), so nothing was "
                                  f"measured; first: {failed[0][0]}. The failures are recorded in "
                                  f"{out_dir / 'results.csv'} ({_redo_hint([kind for _, kind in failed])})")


def _redo_hint(kinds: list[str]) -> str:
    """How the recorded failures of ``kinds`` are redone: a plain rerun for the environment's, --force for results."""
    environmental = sum(redone_on_resume("failed", kind) for kind in kinds)
    if environmental == len(kinds):
        return "they failed by a fault of their environment: a plain rerun redoes them"
    if environmental == 0:
        return "--force redoes them"
    return (f"a plain rerun redoes the {environmental} that failed by a fault of their environment, --force the "
            "others")


def _base_row(sweep: Sweep, cell: Cell, env: dict, command: str, started: str) -> dict:
    """The cell's row before it is measured (:func:`bench.results.new_row` owns the columns)."""
    cfg, card = sweep.cfg, sweep.card
    run = {"num_samples": cfg.num_samples, "batch_size": cfg.batch_size, "seed": cfg.seed, "device": sweep.device,
           "world_size": sweep.dist.world, "reference_size": cfg.reference_size}
    return new_row(cell, model=card.name, model_kind=card.kind, reference=card.reference,
                   changed_options=_changed_options(cell.solver, cell.options), run=run, settings=sweep.settings,
                   metric_labels={k: M.METRICS[k].label for k in cfg.metrics}, env=env, command=command,
                   started=started)


def _changed_options(solver: str, options: dict) -> dict:
    """The options that differ from the solver's defaults (what a reader needs to see next to its name)."""
    defaults = solvers.get_solver(solver).options()
    return {k: v for k, v in options.items() if defaults.get(k) != v}


def _cell_line(row: dict, keys: list[str], labels: dict) -> str:
    head = f"{row['solver_label']:>14} {row['steps']:>5} steps"
    if row.get("guidance") is not None and math.isfinite(row["guidance"]):
        head += f", w = {row['guidance']:g}"
    if row["status"] != "ok":
        return f"{head}: FAILED — {row['error']}"
    vals = ", ".join(f"{labels[k]} {row[METRIC_PREFIX + k]:.4g}" for k in keys
                     if not math.isnan(row[METRIC_PREFIX + k]))
    if not vals:
        vals = "; ".join(f"{labels[k]}: {n}" for k, n in json.loads(row.get("metric_notes") or "{}").items()) \
            or "no metric value"
    from .report_doc import fmt_timed, plural
    repeats = row_timing(row)[3]
    return (f"{head}: NFE {int(row['nfe'])}, {fmt_timed(row, ' s')} ({plural(repeats, 'timed pass', 'timed passes')}; "
            f"model {row['time_model_s']:.3g} s), {vals}")


def say(sweep: Sweep, text: str) -> None:
    """One line on stderr about a long step (rank 0, unless --quiet), above any progress bar."""
    if sweep.dist.main and not sweep.cfg.quiet:
        _bar_write(f"bench.run: {text}")


def _bar_write(text: str) -> None:
    from tqdm.auto import tqdm
    tqdm.write(text, file=sys.stderr)


def run_sweep(sweep: Sweep, command: str) -> Path:
    """Run a prepared sweep (:func:`load_and_plan`, :func:`apply_fast_paths`): decide what to resume, prepare
    the references, then sample, measure and record each cell, and render the report; returns the folder.

    Raises:
        IncompatibleResultsError: the output directory holds results this run must not touch.
        OfflineFeatureExtractorError, ReferenceDataError: a metric's feature extractor or data is unavailable.
        AllCellsFailedError: every cell this run tried failed.
    """
    sweep.settings = _run_settings(sweep)
    todo = _cells_to_run(sweep)
    evaluator = Evaluator(sweep.card, list(sweep.cfg.metrics), sweep.cfg, sweep.device, sweep.dist, sweep.progress,
                          say=lambda text: say(sweep, text), model=sweep.model)
    if todo:
        prepare_references(evaluator, sweep.cfg.num_samples, sweep.dist)
    env = environment(sweep.device) if sweep.dist.main else {}
    if sweep.dist.main:
        sweep.out_dir.mkdir(parents=True, exist_ok=True)
    # the reference data is written with the first row, once the folder's settings check has passed again
    run_files = [lambda: write_reference(sweep.out_dir, evaluator, sweep.cfg.num_samples, command)]
    failed: list[tuple[str, str]] = []
    for cell in _bar(todo, desc="cells", unit="cell", disable=not sweep.progress):
        failure = _run_cell(sweep, evaluator, cell, env, command, run_files)
        if failure:
            failed.append(failure)
    _finish(sweep, todo, failed)
    return sweep.out_dir

"""Run a benchmark sweep: every (solver, steps) cell, the same per-sample seeds, honest timing, quality.

    python -m bench.run                                   # quick default: analytic gmm2d, about a minute on CPU
    python -m bench.run --model ddpm_cifar --solvers ddim,dpmpp --steps 1,10,50,1000
    torchrun --nproc_per_node=2 -m bench.run --model ddpm_mnist --steps 10,50   # samples split across ranks

For each cell the samples j = 0 … n−1 start from x_T drawn with the per-sample seed ``seed·1000003 + j``
(the same in every cell, whatever the batch size or the number of processes), are generated in batches
after one excluded warm-up batch, and are measured against the model's reference.  Each finished cell is
appended to ``OUT/results.csv`` at once (atomic write); re-running the command skips the cells that are
done, ``--force`` redoes them.  At the end the report (``OUT/report.md``, ``OUT/report.html``) is rebuilt;
``python -m bench.report OUT`` rebuilds it from the results alone.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

import pretrained
import solvers

from . import metrics as M
from .autobatch import parse_batch_size
from .plan import (Cell, SolverSpec, UsageError, check_seed, default_spacing, default_t_start,  # noqa: F401
                   parse_assignment, parse_solvers, parse_steps, plan_cells)
from .results import (METRIC_PREFIX, IncompatibleResultsError, new_row, atomic_write_bytes,
                      atomic_write_text, check_run_settings, command_line, environment, load_results,
                      record_row, results_lock, row_timing, timing_columns)

__all__ = ["main", "run", "build_parser", "parse_steps", "parse_solvers", "default_spacing", "plan_cells", "Cell",
           "sample_seeds", "DEFAULTS"]

DEFAULTS = {"model": "gmm2d", "solvers": "ddim,dpmpp,heun,ddpm", "steps": "1,2,5,10,20,50"}
SEED_STRIDE = 1_000_003          # sample j of run seed s uses seed s·SEED_STRIDE + j
PREVIEW_IMAGES = 64
PREVIEW_POINTS = 2000
FLOOR_DRAWS = 10                 # draws averaged for a metric's noise floor
WARMUP_STEPS = 3                 # enough for second-order and multistep code paths to run once
# --repeats auto: at most REPEAT_CAP timed passes per cell, the extra ones only while together they take at most
# REPEAT_BUDGET_S + REPEAT_SHARE × the first pass (see more_passes): cheap cells get a median of 5, a cell
# whose pass takes over ~0.6 s keeps its one pass (--repeats N asks for N).
REPEAT_CAP = 5
REPEAT_BUDGET_S = 0.5
REPEAT_SHARE = 0.2


class AllCellsFailedError(RuntimeError):
    """Every cell this run tried failed (each is recorded with its reason): nothing was measured."""


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m bench.run`` command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Sweep samplers × step counts on one model: the same per-sample seeds in every cell, "
                    "timing with warm-up excluded and the device synchronised, the NFE the library counted, "
                    "and quality against the model's reference. Writes OUT/results.csv after every cell, "
                    "charts and OUT/report.{md,html}. With no arguments: a quick sweep on the analytic "
                    "gmm2d model.")
    p.add_argument("--model", default=DEFAULTS["model"],
                   help=f"model card name (default: {DEFAULTS['model']}); one of: {', '.join(pretrained.available_models())}")
    p.add_argument("--solvers", default=DEFAULTS["solvers"],
                   help="comma-separated solver names (library names or aliases), each optionally with "
                        "options as NAME:OPT=VAL[:OPT=VAL], e.g. 'ddim,ddim:eta=1.0,dpmpp' (default: "
                        f"{DEFAULTS['solvers']}); valid names: "
                        f"{', '.join(solvers.available_solvers())}")
    p.add_argument("--steps", default=DEFAULTS["steps"],
                   help="comma-separated positive step counts (NFE is reported separately: Heun makes 2·steps−1 "
                        f"model calls; default: {DEFAULTS['steps']})")
    p.add_argument("--solver-opt", action="append", default=[], metavar="[SOLVER.]OPT=VAL",
                   help="a solver option passed through (repeatable), e.g. eta=0.5 (every listed solver that has "
                        "it) or ddpm.variance=large (that solver only)")
    p.add_argument("--spacing", default=None, choices=solvers.SPACINGS,
                   help="time grid spacing for every solver (default: per solver, following its paper: "
                        "ddim/ddpm 'quadratic' on CIFAR-10 DDPM and 'trailing' on other discrete models, "
                        "'uniform' on continuous ones; dpmpp 'logsnr'; heun/euler 'karras')")
    p.add_argument("--model-opt", action="append", default=[], metavar="OPT=VAL",
                   help="an option for the model's loader (repeatable), e.g. clip_x0=(-1,1) for ddpm_cifar "
                        "(Ho et al. clip the predicted x0)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="the model's weights file or folder (default: the card's lookup — its environment "
                        "variable, ../shared/assets, the cache, then a verified download)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples per cell (default: the model card's, e.g. 2000 for gmm2d)")
    p.add_argument("--batch-size", default=None, metavar="N|auto",
                   help="samples per batch (default: the model card's); 'auto': on CUDA the largest batch that "
                        "fits in memory, on the CPU the batch where samples/s stops improving (bench.autobatch)")
    p.add_argument("--autocast", default=None, choices=("bf16", "fp16"),
                   help="run the network under torch.autocast in this dtype (the solver state keeps --dtype); "
                        "changes the samples (network rounding), so it is a run setting")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last memory order for image networks (input and the module's weights)")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the network call (MODE: default, max-autotune, "
                        "max-autotune-no-cudagraphs, reduce-overhead; compile time is spent in the warm-up)")
    p.add_argument("--rng", default="torch", choices=solvers.noise.RNGS,
                   help="per-sample noise generator for x_T and the stochastic solvers: torch (default; CPU "
                        "generators, the same bits on every device) or philox (counter-based, on the device: "
                        "cheaper on a GPU at large batches); changes the samples, so it is a run setting")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture the network call in CUDA graphs (one per batch shape; CUDA only)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu); under torchrun each rank uses "
                        "cuda:LOCAL_RANK")
    p.add_argument("--dtype", default=None, choices=("float32", "float64"),
                   help="dtype of the sampler state (default: float64 for analytic models, where solver error "
                        "is measured exactly; float32 otherwise)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (torch.set_num_threads; default: torch's choice). On a CPU shared "
                        "with other work, 1 gives far steadier timings")
    p.add_argument("--repeats", default="auto", metavar="N|auto",
                   help="timed passes per cell (the samples and metrics come from the first; the others re-run the "
                        "sampling for the timing alone, same seeds). The time columns are the medians, with the "
                        "fastest and slowest pass and the count beside them. auto (default): at most "
                        f"{REPEAT_CAP} passes, extra ones only while together they take at most "
                        f"{REPEAT_BUDGET_S:g} s + {REPEAT_SHARE * 100:.0f} %% of the first pass — cheap cells get "
                        f"{REPEAT_CAP}, a cell whose pass takes over ~0.6 s keeps one. Measured on the default gmm2d "
                        "sweep (2 CPU cores, idle): 14-16 s against 10 s with --repeats 1 (README.md, Benchmark harness)")
    p.add_argument("--seed", type=int, default=0,
                   help=f"run seed (default 0): sample j uses seed SEED·{SEED_STRIDE}+j in every cell")
    p.add_argument("--metric", default=None,
                   help="comma-separated metrics (default per model: analytic → fd_data,swd,ode_error; "
                        "ddpm_cifar → fid; other image models → fd_resnet20); valid: "
                        + "; ".join(f"{k}: {m.description}" for k, m in M.METRICS.items()))
    p.add_argument("--reference-size", type=int, default=None,
                   help="image models: use only the first N reference images (default: all, e.g. 50,000 for "
                        "cifar10-train); analytic models: number of exact data samples (default: --num-samples)")
    p.add_argument("--out", default=None, help="output directory (default: runs/MODEL)")
    p.add_argument("--force", action="store_true",
                   help="redo cells that are already in OUT/results.csv. Without it a rerun skips every recorded "
                        "cell, those recorded as failed included (it says how many): a failure is a result, and "
                        "redoing it is asked for with --force")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or per-cell lines (progress bars only when stderr is a terminal; "
                        "otherwise one plain line per cell)")
    p.add_argument("--debug", action="store_true",
                   help="on a known error (bad input, missing weights, unusable results folder) print the full "
                        "traceback as well as the one-line message")
    p.add_argument("--no-report", action="store_true", help="do not rebuild the report at the end")
    p.add_argument("--cache-dir", default=None,
                   help="cache of reference feature statistics (default: $BENCH_CACHE_DIR or "
                        "~/.cache/diffusion-solvers/bench)")
    p.add_argument("--inception-weights", default=None,
                   help="local Inception-v3 weights for FID (torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth) instead of the download")
    p.add_argument("--resnet20-weights", default=None,
                   help="ResNet-20 weights for fd_resnet20 (default: resnet20_cifar/ in the offline assets folder, $DIFFUSION_SOLVERS_ASSETS or ../shared/assets)")
    return p


def network_setting(args) -> str:
    """How the network is called, as one string ("eager", or e.g. "autocast=bf16,channels_last,compile=default")."""
    parts = ([f"autocast={args.autocast}"] if args.autocast else []) + (["channels_last"] if args.channels_last else []) \
        + ([f"compile={args.compile}"] if args.compile else []) + (["cuda_graph"] if args.cuda_graph else [])
    return ",".join(parts) or "eager"


def sample_seeds(seed: int, start: int, stop: int) -> list[int]:
    """The per-sample seeds of samples start … stop−1 (the same in every cell and every process split)."""
    check_seed(seed)
    return [seed * SEED_STRIDE + j for j in range(start, stop)]


# -- distributed --------------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place in a torchrun job (world 1 when run plainly)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj`` in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def slice(self, n: int) -> tuple[int, int]:
        """The contiguous block of sample indices of this rank (rank order = sample order)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world


def _init_dist(device_arg: Optional[str]) -> tuple[Dist, str]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg is None and torch.cuda.is_available() or (device_arg or "").startswith("cuda")
    if world <= 1:
        device = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = device_arg or "cpu"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Dist(rank, world, local_rank), device


def _check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any work.

    Raises:
        UsageError: naming the device, why it cannot be used and what can.
    """
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device!r} is not a torch device ({e}); use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was asked for but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {device}: this machine has {count} CUDA device(s), "
                             f"cuda:0 … cuda:{count - 1}; use one of them")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"--device {device} was asked for but MPS (Apple Metal) is not available here; "
                             "use --device cpu" + (" or cuda" if torch.cuda.is_available() else ""))
    elif dev.type == "meta":
        raise UsageError("--device meta holds no data, so nothing can be sampled or measured; use cpu or cuda[:N]")
    elif dev.type != "cpu":
        try:
            torch.zeros(1, device=dev)
        except Exception as e:  # noqa: BLE001 — any failure means the device is unusable here
            raise UsageError(f"--device {device} cannot be used here ({type(e).__name__}: {e}); "
                             "use cpu or cuda[:N]") from None


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory that is a file or cannot be written, before any work.

    Raises:
        UsageError: naming the path and what is wrong with it.
    """
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == out_dir else f" (its parent {existing} is a file)"
        raise UsageError(f"--out {out_dir} is not a directory{where}; give a directory (created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out_dir}: {existing} is not writable by this user; choose a directory you can "
                         "write to")


def _check_weights(model_options: dict) -> None:
    """Refuse a --weights (or --model-opt weights=) path that does not exist, before loading anything."""
    path = model_options.get("weights")
    if isinstance(path, (str, os.PathLike)) and not Path(path).exists():
        raise UsageError(f"--weights {path}: no such file or folder; give the model's weights file (or the "
                         "folder holding it), or leave --weights out to use the card's lookup")


# -- quality measurement --------------------------------------------------------------------------------------
class Evaluator:
    """Makes per-rank features of a cell's samples and, on rank 0, the metric values from all of them.

    Each metric (:data:`bench.metrics.METRICS`) names the per-sample features it needs (its ``source``) and
    computes its own value and reference note; this class makes the features and the references.
    """

    def __init__(self, card, metric_keys: list[str], args, device: str, dist: Dist, progress: bool,
                 say: Optional[Callable[[str], None]] = None):
        self.card, self.keys, self.device, self.dist, self.progress = card, metric_keys, device, dist, progress
        self.say = say if say is not None and dist.main else (lambda text: None)  # long steps, labelled
        self.specs = [M.METRICS[k] for k in metric_keys]
        self.sources = {s.source for s in self.specs}
        self.args = args
        self.image = card.kind == "image"
        self.extractors: dict = {}
        self.reference: dict = {}
        self.floors: dict = {}
        self.notes: dict = {}
        self._exact_cache: dict = {}

    def prepare(self, n: int) -> None:
        """Build the feature extractors (every rank) and the reference statistics (rank 0).

        Raises:
            OfflineFeatureExtractorError, ReferenceDataError: with the message to show.
        """
        if self.image:
            self._prepare_images(n)
            return
        if self.dist.main and "data" in self.sources:
            self._prepare_data(n)
        for spec in self.specs:
            if isinstance(spec, M.ExactODEError):
                self.notes[spec.key] = spec.note

    def _prepare_images(self, n: int) -> None:
        from .features import create_extractor
        for spec in self.specs:
            weights = getattr(self.args, spec.weights_option)
            self.say(f"loading the {spec.label} feature extractor ({spec.key})")
            self.extractors[spec.key] = create_extractor(spec.key, self.device, weights, verbose=False)
        if not self.dist.main:
            return
        from .datasets import default_cache_dir, reference_statistics
        cache = Path(self.args.cache_dir) if self.args.cache_dir else default_cache_dir()
        for spec in self.specs:
            ext, layer, name = self.extractors[spec.key]
            size = f"{self.args.reference_size:,}" if self.args.reference_size else "all"
            self.say(f"reference statistics of {self.card.reference} ({size} images through {name}) and the "
                     f"{spec.label} noise floor at n = {n:,}: read from the cache in {cache} when there, else "
                     "computed once (minutes on a CPU) and cached there")
            t0 = time.perf_counter()
            with _labelled_bars(f"reference statistics ({self.card.reference}, {name})"):
                ref = reference_statistics(self.card.reference, ext, layer, name, device=self.device,
                                           size=self.args.reference_size, cache_dir=self.args.cache_dir,
                                           progress=self.progress, floor_n=n, floor_seed=self.args.seed)
            self.say(f"reference statistics {'read from' if ref['cached'] else 'computed in '}"
                     f"{'' if ref['cached'] else f'{time.perf_counter() - t0:.3g} s and cached at'} "
                     f"{ref['cache_path']}")
            self.reference[spec.source] = ref
            self.floors[spec.key] = ref["floor"]
            self.notes[spec.key] = spec.reference_note(self.card.reference, ref["n"], n, FLOOR_DRAWS)

    def _prepare_data(self, n: int) -> None:
        n_ref = self.args.reference_size or n
        ref_seed = 1_000_000_007 + self.args.seed
        ref = self.card.data_sampler(n_ref, ref_seed).to(torch.float64).reshape(n_ref, -1).numpy()
        # The noise floor: what exact samples score, averaged over FLOOR_DRAWS fresh sets (one draw of a
        # distance between finite samples varies by a factor of several).
        self.say(f"noise floor of {', '.join(s.key for s in self.specs if s.source == 'data')}: {FLOOR_DRAWS} "
                 f"fresh sets of {n:,} exact samples against {n_ref:,} reference samples (not cached)")
        fresh = [self.card.data_sampler(n, ref_seed + 1 + i).to(torch.float64).reshape(n, -1).numpy()
                 for i in range(FLOOR_DRAWS)]
        self.reference["data"] = ref
        self.reference["preview"] = ref[:PREVIEW_POINTS, :2].astype(np.float32)
        for spec in self.specs:
            if spec.source == "data":
                draws = [spec.value(f, ref) for f in fresh]
                self.floors[spec.key] = [float(np.mean(draws)), float(np.std(draws, ddof=1))]
                self.notes[spec.key] = spec.reference_note(n, n_ref, FLOOR_DRAWS)

    def local(self, cell: Cell, samples: torch.Tensor, x_T: torch.Tensor) -> dict:
        """This rank's features for every metric's source (arrays with one row per sample) and a preview."""
        out: dict = {}
        n = samples.shape[0]
        if self.image:
            from .features import UInt8Images, extract_features, to_uint8_rgb
            images = to_uint8_rgb(self.card.to_images(samples))
            for spec in self.specs:
                ext, layer, _ = self.extractors[spec.key]
                with _labelled_bars(f"  {cell.label} {cell.steps} steps: {spec.key} features"):
                    out[spec.source] = extract_features(ext, layer, UInt8Images(images), device=self.device,
                                                        batch_size=self.args.batch_size, progress=self.progress)
            out["preview"] = images[:PREVIEW_IMAGES].numpy()
            return out
        flat = samples.detach().to(torch.float64).reshape(n, -1).cpu().numpy()
        if "data" in self.sources:
            out["data"] = flat
        if "ode_error" in self.sources and cell.deterministic:
            exact = self._exact(x_T, cell.grid[0], cell.grid[-1])
            out["ode_error"] = ((flat - exact) ** 2).mean(axis=1)
        out["preview"] = flat[:PREVIEW_POINTS, :2].astype(np.float32)
        return out

    def _exact(self, x_T: torch.Tensor, t_from: float, t_to: float) -> np.ndarray:
        # x_T is the same in every cell (same seeds): solve the exact ODE once per (t_from, t_to).
        key = (float(t_from), float(t_to))
        if key not in self._exact_cache:
            self.say(f"ode_error's reference: the exact probability-flow ODE from t = {t_from:.4g} to {t_to:.4g} for "
                     f"{x_T.shape[0]:,} start points (once per grid start and end, kept in memory)")
            x = self.card.exact_ode(x_T.detach().to(torch.float64).cpu(), t_from, t_to)
            self._exact_cache[key] = x.to(torch.float64).reshape(x.shape[0], -1).numpy()
        return self._exact_cache[key]

    def finalize(self, cell: Cell, parts: list[dict]) -> tuple[dict, dict]:
        """Metric values (and notes) from every rank's features, concatenated in rank order."""
        values, notes = {}, {}
        for spec in self.specs:
            feats = np.concatenate([p[spec.source] for p in parts], axis=0) \
                if all(spec.source in p for p in parts) else None
            values[spec.key], note = spec.compute(feats, self.reference.get(spec.source), cell.deterministic)
            if note:
                notes[spec.key] = note
        return values, notes


@contextlib.contextmanager
def _labelled_bars(desc: str) -> Iterator[None]:
    """Give torch-fidelity's feature-extraction progress bar (hard-coded "Processing samples") the description
    ``desc`` while the block runs."""
    import torch_fidelity.utils as fidelity_utils
    plain = fidelity_utils.tqdm

    def labelled(*a, **kw):
        return plain(*a, **{**kw, "desc": desc})

    fidelity_utils.tqdm = labelled
    try:
        yield
    finally:
        fidelity_utils.tqdm = plain


# -- sampling one cell -------------------------------------------------------------------------------------
def _batches(args, dist: Dist) -> list[tuple[int, int]]:
    """This rank's batches of sample indices, (start, stop) each."""
    start, stop = dist.slice(args.num_samples)
    return [(i, min(i + args.batch_size, stop)) for i in range(start, stop, args.batch_size)]


def _sample_kw(cell: Cell, args, dtype: torch.dtype) -> dict:
    return dict(solver=cell.solver, spacing=cell.spacing, t_start=cell.t_start, dtype=dtype, on_nonfinite="raise",
                rng=args.rng, **cell.options)


def _warm_up(cell: Cell, model, card, args, device: str, dtype: torch.dtype, dist: Dist) -> float:
    """Run each distinct batch shape (the full one and a shorter last one) through a short grid of the cell's
    solver, so that lazy initialisation, kernel selection, allocator growth, torch.compile and CUDA-graph
    capture are not charged to the timed passes. Returns its wall-clock (0 when this rank has no batch)."""
    batches = _batches(args, dist)
    t0 = time.perf_counter()
    for b0, b1 in {b1 - b0: (b0, b1) for b0, b1 in batches}.values():
        seeds = sample_seeds(args.seed, b0, b1)
        x = solvers.initial_noise((b1 - b0, *card.sample_shape), seeds, schedule=model.schedule, t=cell.grid[0],
                                  dtype=dtype, device=device, rng=args.rng)
        solvers.sample(model, x, steps=min(cell.steps, WARMUP_STEPS), seeds=seeds, **_sample_kw(cell, args, dtype))
    return time.perf_counter() - t0 if batches else 0.0


def _timed_pass(cell: Cell, model, card, args, device: str, dtype: torch.dtype, dist: Dist, progress: bool,
                keep: bool, desc: str, x_T_all: Optional[torch.Tensor] = None) -> dict:
    """One timed pass over this rank's batches (the same seeds every pass): NFE, the summed timings and, with
    ``keep``, the samples and x_T (on the CPU). ``x_T_all``: this rank's x_T from an earlier pass, reused
    instead of drawing it again."""
    shape = tuple(card.sample_shape)
    outs, x_Ts = [], []
    total = model_t = solver_t = 0.0
    nfe = None
    batches = _batches(args, dist)
    for b0, b1 in _bar(batches, desc=desc, unit="batch", leave=False, disable=not progress):
        seeds = sample_seeds(args.seed, b0, b1)
        if x_T_all is not None:
            x_T = x_T_all[b0 - batches[0][0]:b1 - batches[0][0]].to(device)
        else:
            x_T = solvers.initial_noise((b1 - b0, *shape), seeds, schedule=model.schedule, t=cell.grid[0],
                                        dtype=dtype, device=device, rng=args.rng)
        res = solvers.sample(model, x_T, steps=cell.steps, seeds=seeds, **_sample_kw(cell, args, dtype))
        if nfe is not None and res.nfe != nfe:
            raise RuntimeError(f"NFE differs between batches ({nfe} vs {res.nfe})")
        nfe = res.nfe
        total += res.time_total
        model_t += res.time_model
        solver_t += res.time_solver
        if keep:
            outs.append(res.samples.detach().cpu())
            x_Ts.append(x_T.detach().cpu())
    empty = torch.empty((0, *shape), dtype=dtype)
    return {"samples": torch.cat(outs) if outs else empty, "x_T": torch.cat(x_Ts) if x_Ts else empty,
            "nfe": nfe, "timing": (total, model_t, solver_t)}


def _sample_cell(cell: Cell, model, card, args, device: str, dtype: torch.dtype, dist: Dist,
                 progress: bool) -> dict:
    """Generate this rank's samples of a cell; returns samples, x_T, NFE and timing (warm-up excluded)."""
    warmup = _warm_up(cell, model, card, args, device, dtype, dist)
    gen = _timed_pass(cell, model, card, args, device, dtype, dist, progress, keep=True,
                      desc=f"  {cell.label} {cell.steps} steps")
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
    """Every timed pass of a cell, each (total, model, solver) of the slowest rank: the first (``gen``, this
    rank's first pass; None where it failed) and the repeats :func:`more_passes` asks for, run on every rank
    from the first pass's x_T for the timing alone (the samples are thrown away: they are the first pass's).
    Returns the passes and the error of a failed repeat."""
    args, dist = sweep.args, sweep.dist
    passes: list[tuple] = []
    mine, error = (gen["timing"] if gen is not None else None), None
    while True:
        everyone = dist.all_gather(mine)  # every rank takes the same decision from the same numbers
        if any(p is None for p in everyone):
            return passes, error
        passes.append(max(everyone, key=lambda p: p[0]))
        if not more_passes([p[0] for p in passes], args.repeats):
            return passes, None
        try:
            mine = _timed_pass(cell, sweep.model, sweep.card, args, sweep.device, sweep.dtype, dist, sweep.progress,
                               keep=False, desc=f"  {cell.label} {cell.steps} steps, timing pass {len(passes) + 1}",
                               x_T_all=gen["x_T"])
            mine = mine["timing"]
        except Exception as e:  # noqa: BLE001 — recorded as the cell's failure
            mine, error = None, f"timing pass {len(passes) + 1}: {type(e).__name__}: {e}"


def _bar(iterable, **kw):
    from tqdm.auto import tqdm
    return tqdm(iterable, **kw)


# -- the sweep ------------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _save_preview(out_dir: Path, name: str, array: np.ndarray, kind: str) -> None:
    import io
    buf = io.BytesIO()
    np.savez_compressed(buf, data=array, kind=np.array(kind))
    atomic_write_bytes(out_dir / "previews" / f"{name}.npz", buf.getvalue())


@dataclass
class Sweep:
    """What one sweep has resolved before sampling: the process, the model, the cells and the run settings."""

    args: argparse.Namespace
    dist: Dist
    device: str
    progress: bool
    card: Any
    specs: list
    steps: list
    metric_keys: list
    dtype_name: str
    dtype: torch.dtype
    out_dir: Path
    model: Any = None
    model_options: dict = field(default_factory=dict)
    cells: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def run(argv: Optional[Sequence[str]] = None) -> Path:
    """Run the sweep described by ``argv`` (see ``--help``); returns the output directory.

    The steps: check the input, load the model and plan the cells, apply the fast paths, decide what to
    resume, prepare the references, then sample, measure and record each cell, and render the report.

    Raises:
        UsageError: bad input (with the valid choices).
        IncompatibleResultsError: the output directory holds results this run must not touch.
        OfflineFeatureExtractorError, ReferenceDataError: a metric's feature extractor or data is unavailable.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep = _check_input(build_parser().parse_args(argv))
    _load_and_plan(sweep)
    _apply_fast_paths(sweep)
    sweep.settings = _run_settings(sweep)
    todo = _cells_to_run(sweep)
    evaluator = Evaluator(sweep.card, sweep.metric_keys, sweep.args, sweep.device, sweep.dist, sweep.progress,
                          say=lambda text: _say(sweep, text))
    if todo:
        _prepare_references(evaluator, sweep)
    env = environment(sweep.device) if sweep.dist.main else {}
    command = command_line(argv)
    if sweep.dist.main:
        sweep.out_dir.mkdir(parents=True, exist_ok=True)
        if todo:
            _write_reference(sweep, evaluator, command)
    failed: list[str] = []
    for cell in _bar(todo, desc="cells", unit="cell", disable=not sweep.progress):
        failure = _run_cell(sweep, evaluator, cell, env, command, len(todo))
        if failure:
            failed.append(failure)
    _finish(sweep, todo, failed)
    return sweep.out_dir


def _check_input(args: argparse.Namespace) -> Sweep:
    """Every check that needs no model: threads, device, model name, steps, solvers, sizes, seed, metrics."""
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device is not None:
        _check_device(args.device)
    dist, device = _init_dist(args.device)
    # Bars only on a terminal: in a log file their carriage returns and escapes leave fragments; the per-cell
    # lines (unless --quiet) are the progress there.
    progress = not args.quiet and dist.main and sys.stderr.isatty()
    try:
        card = pretrained.get_card(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    steps = parse_steps(args.steps)
    specs = parse_solvers(args.solvers, args.solver_opt)
    if device != args.device:  # the device chosen by the process set-up (the asked one is checked above)
        _check_device(device)
    _check_sizes(args, card, dist)
    metric_keys = _metric_keys(args, card)
    dtype_name = args.dtype or ("float64" if card.kind == "analytic" else "float32")
    out_dir = Path(args.out or Path("runs") / card.name)
    if dist.main:
        _check_out_dir(out_dir)
    return Sweep(args=args, dist=dist, device=device, progress=progress, card=card, specs=specs, steps=steps,
                 metric_keys=metric_keys, dtype_name=dtype_name, dtype=getattr(torch, dtype_name), out_dir=out_dir)


def _check_sizes(args: argparse.Namespace, card, dist: Dist) -> None:
    """--num-samples and --batch-size (card defaults filled in), --reference-size and --seed."""
    args.num_samples = card.default_num_samples if args.num_samples is None else args.num_samples
    try:
        args.batch_size = card.default_batch_size if args.batch_size is None else parse_batch_size(args.batch_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2 (a covariance needs two samples), got {args.num_samples}")
    if args.num_samples < dist.world:
        raise UsageError(f"--num-samples {args.num_samples} is fewer than the {dist.world} processes")
    if args.reference_size is not None and args.reference_size < 2:
        raise UsageError(f"--reference-size must be at least 2, got {args.reference_size}")
    check_seed(args.seed)
    args.repeats = parse_repeats(args.repeats)


def parse_repeats(text) -> Optional[int]:
    """``--repeats``: "auto" → None (the rule of :func:`more_passes`), else a positive count of timed passes.

    Raises:
        UsageError: anything else.
    """
    if text is None or str(text).strip().lower() == "auto":
        return None
    try:
        n = int(str(text).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise UsageError(f"--repeats must be a positive number of timed passes per cell or 'auto', got {text!r}")
    return n


def _metric_keys(args: argparse.Namespace, card) -> list[str]:
    try:
        keys = M.check_metrics(
            [m.strip() for m in args.metric.split(",") if m.strip()] if args.metric else M.default_metrics(card), card)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not keys:
        raise UsageError(f"no metric given; metrics for {card.name}: {', '.join(M.metrics_for(card))}")
    return keys


def _load_and_plan(sweep: Sweep) -> None:
    """Load the model (its weights checked first) and resolve every cell; refuse fast paths that cannot apply."""
    args, card = sweep.args, sweep.card
    model_options = dict(parse_assignment(o, "--model-opt") for o in args.model_opt)
    if args.weights is not None:
        if "weights" in model_options:
            raise UsageError("give the weights once: --weights PATH or --model-opt weights=PATH, not both")
        model_options["weights"] = args.weights
    _check_weights(model_options)
    if card.kind != "analytic":
        from pretrained.checkpoints import cache_dir
        where = (str(model_options["weights"]) if "weights" in model_options else
                 f"the card's lookup (its environment variable, the assets folder, the cache {cache_dir()}, then a "
                 "verified download)")
        _say(sweep, f"loading {card.name}'s weights from {where}")
    try:
        sweep.model = pretrained.load(card.name, device=sweep.device, **model_options)
    except TypeError as e:
        raise UsageError(f"--model-opt: {card.name}'s loader does not take these options ({e})") from None
    except (ValueError, ImportError) as e:
        raise UsageError(f"cannot load {card.name}: {e}") from None
    sweep.model_options = model_options
    sweep.cells = plan_cells(card, sweep.model, sweep.specs, sweep.steps, args.spacing)
    if args.cuda_graph and torch.device(sweep.device).type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device; this run is on {sweep.device}")
    variable_rows = [s.label for s in sweep.specs if s.name == "adaptive"]
    if variable_rows and (args.cuda_graph or args.compile):
        raise UsageError(f"{', '.join(variable_rows)}: the adaptive solver calls the network on a varying number of "
                         "rows, so --cuda-graph / --compile would capture or compile every row count; run it "
                         "without them")


def _apply_fast_paths(sweep: Sweep) -> None:
    """Choose ``--batch-size auto`` and wrap the network for autocast, channels-last, compile or CUDA graphs."""
    args = sweep.args
    if args.batch_size == "auto":
        from .autobatch import auto_batch_size
        # probed without compilation or graphs, which would compile or capture every probed shape
        probe = solvers.accelerate(sweep.model, autocast=args.autocast, channels_last=args.channels_last)
        per_rank = -(-args.num_samples // sweep.dist.world)
        chosen = auto_batch_size(probe, tuple(sweep.card.sample_shape), sweep.device, sweep.dtype, cap=per_rank)
        args.batch_size = chosen.batch_size
        if sweep.dist.main and not args.quiet:
            print(f"bench.run: --batch-size {chosen.note}", file=sys.stderr)
    if network_setting(args) != "eager":  # a plain run calls the network directly, no wrapper on the hot path
        try:
            sweep.model = solvers.accelerate(sweep.model, autocast=args.autocast, channels_last=args.channels_last,
                                             compile=args.compile or False, cuda_graph=args.cuda_graph)
        except ValueError as e:
            raise UsageError(str(e)) from None


def _run_settings(sweep: Sweep) -> dict:
    args = sweep.args
    return {"model": sweep.card.name, "num_samples": args.num_samples, "seed": args.seed,
            "metrics": ",".join(sweep.metric_keys), "dtype": sweep.dtype_name,
            "device_type": torch.device(sweep.device).type, "reference_size": args.reference_size,
            "network": network_setting(args), "rng": args.rng, "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "model_options": json.dumps(sweep.model_options, sort_keys=True, default=str)}


def _cells_to_run(sweep: Sweep) -> list[Cell]:
    """The cells not yet in the results (all with --force), decided on rank 0 and shared; says so unless quiet.

    Raises:
        IncompatibleResultsError: the results folder was made with other run settings.
    """
    args, dist, cells = sweep.args, sweep.dist, sweep.cells
    plan = None
    if dist.main:
        try:
            existing = load_results(sweep.out_dir)
            check_run_settings(existing, sweep.settings, sweep.out_dir)
            done = {} if existing.empty else dict(zip(existing["cell_key"], existing["status"]))
            todo = [c.key for c in cells if args.force or c.key not in done]
            skipped_ok = sum(1 for c in cells if not args.force and done.get(c.key) == "ok")
            skipped_failed = sum(1 for c in cells if not args.force and done.get(c.key) == "failed")
            plan = {"todo": todo, "ok": skipped_ok, "failed": skipped_failed, "error": None}
        except IncompatibleResultsError as e:
            plan = {"error": str(e)}
    plan = dist.broadcast(plan)
    if plan["error"]:
        raise IncompatibleResultsError(plan["error"])
    todo = [c for c in cells if c.key in set(plan["todo"])]
    if dist.main and not args.quiet:
        msg = f"bench.run: {sweep.card.name}, {len(cells)} cells ({len(todo)} to run"
        if plan["ok"] or plan["failed"]:
            msg += f"; skipping {plan['ok']} done" + (f" and {plan['failed']} recorded as failed — --force redoes "
                                                       "them" if plan["failed"] else "")
        print(msg + f"), {args.num_samples} samples each on {sweep.device}"
              + (f" × {dist.world} processes" if dist.world > 1 else "") + f" → {sweep.out_dir}", file=sys.stderr)
    return todo


def _prepare_references(evaluator: Evaluator, sweep: Sweep) -> None:
    """Feature extractors and reference statistics; a failure on any rank is raised on every rank."""
    from .datasets import ReferenceDataError
    from .features import OfflineFeatureExtractorError
    failure = None
    try:
        evaluator.prepare(sweep.args.num_samples)
    except (OfflineFeatureExtractorError, ReferenceDataError) as e:
        failure = e
    # Every rank learns of a failure on any rank (rank 0 alone reads the reference data).
    failures = [f for f in sweep.dist.all_gather(None if failure is None else (type(failure).__name__, str(failure)))
                if f is not None]
    if failures:
        if failure is not None:
            raise failure
        kind, text = failures[0]
        raise (OfflineFeatureExtractorError if kind == "OfflineFeatureExtractorError" else ReferenceDataError)(text)


def _write_reference(sweep: Sweep, evaluator: Evaluator, command: str) -> None:
    """reference.json (metric labels, noise floors and notes, the card) and the reference preview."""
    if "preview" in evaluator.reference:
        _save_preview(sweep.out_dir, "reference", evaluator.reference["preview"], "points")
    ref_info = {"metrics": {k: {"label": M.METRICS[k].label, "floor": evaluator.floors.get(k),
                                "note": evaluator.notes.get(k, "")} for k in sweep.metric_keys},
                "card": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sweep.card.summary().items()},
                "num_samples": sweep.args.num_samples, "command": command, "written_at": _now()}
    atomic_write_text(sweep.out_dir / "reference.json", json.dumps(ref_info, indent=2, default=str))


def _run_cell(sweep: Sweep, evaluator: Evaluator, cell: Cell, env: dict, command: str, total: int) -> Optional[str]:
    """Sample one cell on every rank, measure it and record its row on rank 0; returns its failure, if any."""
    args, dist = sweep.args, sweep.dist
    started = _now()
    t_cell = time.perf_counter()
    gen = None
    try:
        gen = _sample_cell(cell, sweep.model, sweep.card, args, sweep.device, sweep.dtype, dist, sweep.progress)
        t_metric = time.perf_counter()
        payload = {"features": evaluator.local(cell, gen["samples"], gen["x_T"]), "warmup": gen["warmup"],
                   "nfe": gen["nfe"], "metric_time": time.perf_counter() - t_metric}
    except Exception as e:  # noqa: BLE001 — a failed cell is recorded with its reason; the sweep goes on
        payload = {"error": f"{type(e).__name__}: {e}"}
    # the repeats time the sampling only: the samples and the metrics are the first pass's
    passes, repeat_error = _timed_passes(sweep, cell, gen if "error" not in payload else None)
    if repeat_error:
        payload = {"error": repeat_error}
    parts = dist.gather(payload)
    if not dist.main:
        return None
    errors = [p["error"] for p in parts if "error" in p]
    row = _base_row(cell, sweep.card, args, sweep.settings, sweep.device, dist, env, command, started,
                    sweep.metric_keys)
    if not errors:
        try:
            _measure_into(row, sweep, evaluator, cell, parts, passes)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")
    failure = None
    if errors:
        row.update({"status": "failed", "error": errors[0]})
        failure = f"{cell.label} × {cell.steps} steps: {errors[0]}"
    row["finished_at"] = _now()
    row["time_cell_s"] = time.perf_counter() - t_cell
    # record_row re-reads the file under a lock: rows of a concurrent run are kept
    record_row(sweep.out_dir, row, sweep.settings)
    if not args.quiet:
        _bar_write(_cell_line(row, sweep.metric_keys, {k: M.METRICS[k].label for k in sweep.metric_keys}))
    _test_hook(total)
    return failure


def _measure_into(row: dict, sweep: Sweep, evaluator: Evaluator, cell: Cell, parts: list[dict],
                  passes: list[tuple]) -> None:
    """The metric values, timings (medians over the timed ``passes``) and preview of a cell from every rank's
    part, into ``row``."""
    t_fin = time.perf_counter()
    values, notes = evaluator.finalize(cell, [p["features"] for p in parts])
    row.update(timing_columns(passes))
    row.update({"nfe": parts[0]["nfe"],
                "time_per_sample_ms": 1000.0 * row["time_total_s"] * sweep.dist.world / sweep.args.num_samples,
                "time_warmup_s": max(p["warmup"] for p in parts),
                "time_metrics_s": max(p["metric_time"] for p in parts) + time.perf_counter() - t_fin,
                "metric_notes": json.dumps(notes)})
    for k in sweep.metric_keys:
        row[METRIC_PREFIX + k] = values[k]
    preview = np.concatenate([p["features"]["preview"] for p in parts])
    _save_preview(sweep.out_dir, cell.cell_id, preview[:PREVIEW_IMAGES if evaluator.image else PREVIEW_POINTS],
                  "images" if evaluator.image else "points")


def _finish(sweep: Sweep, todo: list[Cell], failed: list[str]) -> None:
    """The report (rank 0, unless --no-report), the ranks' last barrier, and the error when every cell failed."""
    dist, out_dir = sweep.dist, sweep.out_dir
    if dist.main and not sweep.args.no_report:
        from .report import build_report
        with results_lock(out_dir):  # a concurrent run's last report then includes every row
            build_report(out_dir, quiet=sweep.args.quiet)
    if dist.world > 1:
        torch.distributed.barrier()
    if dist.main and todo and len(failed) == len(todo):
        raise AllCellsFailedError(f"every cell of this run failed ({len(failed)} of {len(todo)}), so nothing was "
                                  f"measured; first: {failed[0]}. The failures are recorded in "
                                  f"{out_dir / 'results.csv'} (--force redoes them)")


def _base_row(cell: Cell, card, args, settings: dict, device: str, dist: Dist, env: dict, command: str,
              started: str, metric_keys: list[str]) -> dict:
    """The cell's row before it is measured (:func:`bench.results.new_row` owns the columns)."""
    run = {"num_samples": args.num_samples, "batch_size": args.batch_size, "seed": args.seed, "device": device,
           "world_size": dist.world, "reference_size": args.reference_size}
    return new_row(cell, model=card.name, model_kind=card.kind, reference=card.reference,
                   changed_options=_changed_options(cell.solver, cell.options), run=run, settings=settings,
                   metric_labels={k: M.METRICS[k].label for k in metric_keys}, env=env, command=command,
                   started=started)


def _changed_options(solver: str, options: dict) -> dict:
    """The options that differ from the solver's defaults (what a reader needs to see next to its name)."""
    defaults = solvers.get_solver(solver).options()
    return {k: v for k, v in options.items() if defaults.get(k) != v}


def _cell_line(row: dict, keys: list[str], labels: dict) -> str:
    head = f"{row['solver_label']:>14} {row['steps']:>5} steps"
    if row["status"] != "ok":
        return f"{head}: FAILED — {row['error']}"
    vals = ", ".join(f"{labels[k]} {row[METRIC_PREFIX + k]:.4g}" for k in keys
                     if not math.isnan(row[METRIC_PREFIX + k]))
    from .report_doc import fmt_timed, plural
    repeats = row_timing(row)[3]
    return (f"{head}: NFE {int(row['nfe'])}, {fmt_timed(row, ' s')} ({plural(repeats, 'timed pass', 'timed passes')}; "
            f"model {row['time_model_s']:.3g} s), {vals}")


def _say(sweep: Sweep, text: str) -> None:
    """One line on stderr about a long step (rank 0, unless --quiet), above any progress bar."""
    if sweep.dist.main and not sweep.args.quiet:
        _bar_write(f"bench.run: {text}")


def _bar_write(text: str) -> None:
    from tqdm.auto import tqdm
    tqdm.write(text, file=sys.stderr)


_cells_written = 0


def _test_hook(total: int) -> None:
    # BENCH_CRASH_AFTER_CELLS=k makes the process die (as if killed) right after the k-th cell is written: the
    # resume test uses it to interrupt a run at a known point without timing races.
    global _cells_written
    _cells_written += 1
    limit = os.environ.get("BENCH_CRASH_AFTER_CELLS")
    if limit and _cells_written >= int(limit):
        os._exit(137)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status.

    The library's known user-facing errors are printed as one line (the traceback too with ``--debug``):
    2 for bad input, missing or unreadable weights and a results folder this run must not touch; 1 for an
    unavailable metric and for a sweep in which every cell failed.  Anything else is a bug and raises.
    """
    from pretrained.checkpoints import CheckpointError, WeightsNotFoundError

    from .datasets import ReferenceDataError
    from .features import OfflineFeatureExtractorError
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(argv)
    except (UsageError, IncompatibleResultsError, WeightsNotFoundError, CheckpointError) as e:
        return _report_error(e, 2, "--debug" in argv)
    except (OfflineFeatureExtractorError, ReferenceDataError, AllCellsFailedError) as e:
        return _report_error(e, 1, "--debug" in argv)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _report_error(error: BaseException, status: int, debug: bool) -> int:
    if debug:
        import traceback
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(f"bench.run: error: {error}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

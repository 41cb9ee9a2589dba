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
import dataclasses
import errno
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import pretrained
import solvers

from . import metrics as M
from .config import DEFAULT_SOLVERS, SweepConfig, make_config
from .distributed import init_dist
from pretrained.user_models import parse_shape

from .plan import SPACING_CHOICES, UsageError
from .results import IncompatibleResultsError, command_line
from .sweep import (REPEAT_BUDGET_S, REPEAT_CAP, REPEAT_SHARE, SEED_STRIDE, AllCellsFailedError, Sweep,
                    apply_fast_paths, load_and_plan, run_sweep)

__all__ = ["build_parser", "run", "main", "DEFAULTS"]

DEFAULTS = {"model": "gmm2d", "solvers": DEFAULT_SOLVERS, "steps": "1,2,5,10,20,50"}
# What a user who stopped a run, or whose disk filled up, needs to know: nothing finished is lost.
RESUME_HINT = ("Every cell finished before this is recorded in the results folder; run the same command again to "
               "resume (the cells already done are skipped)")
INTERRUPTED = f"interrupted (Ctrl-C). {RESUME_HINT}"
INTERRUPTED_STATUS = 130  # the shell's status for a process ended by SIGINT
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


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
                   help=f"the model (default: {DEFAULTS['model']}): a zoo name — "
                        f"{', '.join(pretrained.available_models())} — or your own: my_pkg.my_module:ATTR (a "
                        "solvers.DiffusionModel, a ModelCard, or a callable returning one) or path/to/card.toml "
                        "(README: 'Benchmark your own model'). A model with no reference data is scored against "
                        "a reference solution of its own ODE (--metric ref_error)")
    p.add_argument("--shape", default=None, metavar="C,H,W",
                   help="the sample shape of --model my_pkg.my_module:ATTR when the object does not carry one "
                        "(a sample_shape attribute), e.g. 3,32,32 or 2")
    p.add_argument("--solvers", default=None,
                   help="comma-separated solver names (library names or aliases), each optionally with "
                        "options as NAME:OPT=VAL[:OPT=VAL], e.g. 'ddim,ddim:eta=1.0,dpmpp' (default: "
                        f"{DEFAULTS['solvers']}, or the model card's own solvers: consistency for a consistency "
                        "model); valid names: "
                        f"{', '.join(solvers.available_solvers())}")
    p.add_argument("--steps", default=DEFAULTS["steps"],
                   help="comma-separated positive step counts (NFE is reported separately: Heun makes 2·steps−1 "
                        f"model calls; default: {DEFAULTS['steps']})")
    p.add_argument("--guidance", default=None, metavar="W[,W…]",
                   help="class-conditional models only: comma-separated classifier-free guidance scales w (finite, "
                        "≥ 0, each once), a sweep axis: cells are solver × steps × guidance. The network output is "
                        "out_u + w·(out_c − out_u) (diffusers' guidance_scale): w = 1 is the conditional model "
                        "alone, 0 the unconditional one; w ∉ {0, 1} costs two network rows per sample per model "
                        "call (NFE counts model calls, the network_rows column the rows). Sample i is generated "
                        "for class i mod (number of classes). Default: the card's default_guidance (1 if it names "
                        "none); an error for an unconditional model")
    p.add_argument("--solver-opt", action="append", default=[], metavar="[SOLVER.]OPT=VAL",
                   help="a solver option passed through (repeatable), e.g. eta=0.5 (every listed solver that has "
                        "it) or ddpm.variance=large (that solver only)")
    p.add_argument("--spacing", default=None, choices=SPACING_CHOICES,
                   help="time grid spacing for every solver (default: per solver, following its paper: "
                        "ddim/ddpm 'quadratic' on CIFAR-10 DDPM and 'trailing' on other discrete models, "
                        "'uniform' on continuous ones; dpmpp 'logsnr'; heun/euler 'karras'). 'optimized': each "
                        "cell's grid found by solvers.optimize_timesteps for this model, solver and step count "
                        "from the solver's default grid, on 64 calibration samples whose seeds are disjoint from "
                        "the evaluated ones (~200 sampling runs of that batch per cell; cached in "
                        "OUT/optimized_grids/; deterministic solvers only)")
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
                        "ddpm_cifar → fid; the project's MNIST models → fd_mnist, and class_accuracy for "
                        "class-conditional ones; other image models → fd_resnet20); valid: "
                        + "; ".join(f"{k}: {m.description}" for k, m in M.METRICS.items()))
    p.add_argument("--reference", default=None, metavar="DIR|STATS.npz",
                   help="image models: your own reference data instead of the card's — a folder of images (PNG, "
                        "JPEG, …; one size; statistics cached by content hash) or an .npz of precomputed "
                        "statistics (arrays mu, sigma, from the same feature extractor). FD/FID is then measured "
                        "against it (with Inception features that is not the published FID protocol unless it is "
                        "the standard reference)")
    p.add_argument("--reference-size", type=int, default=None,
                   help="image models: use only the first N reference images (default: all, e.g. 50,000 for "
                        "cifar10-train); analytic models: number of exact data samples (default: --num-samples)")
    p.add_argument("--out", default=None, help="output directory (default: runs/MODEL)")
    p.add_argument("--force", action="store_true",
                   help="redo cells that are already in OUT/results.csv. Without it a rerun skips every recorded "
                        "cell, those recorded as failed included (it says how many): a failure is a result, and "
                        "redoing it is asked for with --force — except a cell that failed by a fault of its "
                        "environment (a full disk or other I/O error, memory that ran out, a lost process; its "
                        "failure_kind column says 'environment'), which a plain rerun redoes")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or per-cell lines (progress bars only when stderr is a terminal; "
                        "otherwise one plain line per cell)")
    p.add_argument("--debug", action="store_true",
                   help="on a known error (bad input, missing weights, unusable results folder) print the full "
                        "traceback as well as the one-line message")
    p.add_argument("--no-report", action="store_true", help="do not rebuild the report at the end")
    p.add_argument("--save-samples", action="store_true",
                   help="write every cell's samples to OUT/samples/CELL.npz for your own metrics: arrays samples "
                        "(float32; (N, C, H, W) for images, (N, d) for points; in the model card's data scale, not "
                        "clipped), value_range (the card's data range, 2 floats) and, for a class-conditional "
                        "model, labels (int64, the class each sample was generated for). Cells already in "
                        "OUT/results.csv are not re-run (use --force)")
    p.add_argument("--cache-dir", default=None,
                   help="cache of reference feature statistics (default: $BENCH_CACHE_DIR or "
                        "~/.cache/diffusion-solvers/bench)")
    p.add_argument("--inception-weights", default=None,
                   help="local Inception-v3 weights for FID (torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth) instead of the download")
    p.add_argument("--resnet20-weights", default=None,
                   help="ResNet-20 weights for fd_resnet20 (default: resnet20_cifar/ in the offline assets folder, $DIFFUSION_SOLVERS_ASSETS or ../shared/assets)")
    return p



def run(argv: Optional[Sequence[str]] = None) -> Path:
    """Run the sweep described by ``argv`` (see ``--help``); returns the output directory.

    argv → a frozen :class:`~bench.config.SweepConfig` (every check that needs no model) → the sweep
    (:mod:`bench.sweep`): load the model and plan the cells, apply the fast paths, then sample, measure and
    record each cell, and render the report.

    Raises:
        UsageError: bad input (with the valid choices).
        IncompatibleResultsError: the output directory holds results this run must not touch.
        OfflineFeatureExtractorError, ReferenceDataError: a metric's feature extractor or data is unavailable.
        AllCellsFailedError: every cell this run tried failed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep = set_up(build_parser().parse_args(argv))
    load_and_plan(sweep)
    apply_fast_paths(sweep)
    return run_sweep(sweep, command_line(argv))


def set_up(args: argparse.Namespace) -> Sweep:
    """The process (threads, device, torchrun group) and the frozen configuration, every check that needs no
    model done: threads, device, model name, steps, solvers, sizes, seed, repeats, metrics, output folder."""
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device is not None:
        _check_device(args.device)
    dist, device = init_dist(args.device)
    # Bars only on a terminal: in a log file their carriage returns and escapes leave fragments; the per-cell
    # lines (unless --quiet) are the progress there.
    progress = not args.quiet and dist.main and sys.stderr.isatty()
    try:
        shape = None if args.shape is None else parse_shape(args.shape)
        card = pretrained.resolve_card(args.model, shape=shape)
    except ValueError as e:
        raise UsageError(f"--model {args.model}: {e}" if not str(e).startswith("unknown model") else str(e)) from None
    if args.reference is not None:
        card = _with_reference(card, args.reference)
    cfg: SweepConfig = make_config(args, card, dist.world)
    if device != args.device:  # the device chosen by the process set-up (the asked one is checked above)
        _check_device(device)
    if dist.main:
        _check_out_dir(cfg.out_dir)
    return Sweep(cfg=cfg, dist=dist, device=device, progress=progress, card=card)


def _with_reference(card, reference: str):
    """The card with ``--reference`` as its reference data (image models; checked before anything loads)."""
    from .datasets import check_reference
    if card.kind != "image" and card.data_shape is None:
        raise UsageError(f"--reference is reference images for an image model; {card.name} is a {card.kind} model "
                         "(its quality is measured against exact data or a reference solution)")
    try:
        check_reference(reference)
    except ValueError as e:
        raise UsageError(f"--reference: {e}") from None
    return dataclasses.replace(card, reference=reference)


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status.

    The library's known user-facing errors are printed as one line (the traceback too with ``--debug``):
    2 for bad input, missing or unreadable weights and a results folder this run must not touch; 1 for an
    unavailable metric, for a sweep in which every cell failed and for a full disk; 130 for Ctrl-C (the last
    two say that the finished cells are kept and the same command resumes).  Anything else is a bug and raises.
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
    except KeyboardInterrupt as e:
        return _report_error(e, INTERRUPTED_STATUS, "--debug" in argv, INTERRUPTED)
    except OSError as e:
        if e.errno not in DISK_FULL_ERRNOS:
            raise
        return _report_error(e, 1, "--debug" in argv, f"{e.strerror} ({e.filename or 'writing the results'}). "
                             f"{RESUME_HINT}")
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _report_error(error: BaseException, status: int, debug: bool, message: Optional[str] = None) -> int:
    """Print ``message`` (default: the error's own text) as one line, after the traceback with ``--debug``."""
    if debug:
        import traceback
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(f"bench.run: error: {message or error}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())

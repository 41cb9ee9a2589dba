"""The sweep configuration: the command line, checked and with the model card's defaults filled in, frozen.

``bench.run`` turns argv into one :class:`SweepConfig` before any model is loaded; everything after reads it
and nothing changes it (a value chosen later — ``--batch-size auto`` — makes a new config with
:func:`dataclasses.replace`).  Every check here needs only the card, never the model, so bad input is refused
before the expensive work.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from solvers.optimize import MAX_STEPS as MAX_OPTIMIZED_STEPS

from . import metrics as M
from .autobatch import parse_batch_size
from .plan import (OPTIMIZED, SolverSpec, UsageError, check_seed, parse_assignment, parse_guidance, parse_solvers,
                   parse_steps)
from .results import safe_filename

DEFAULT_SOLVERS = "ddim,dpmpp,heun,ddpm"   # what a sweep runs when --solvers is not given (see default_solvers)

__all__ = ["SweepConfig", "make_config", "parse_repeats", "network_setting"]


@dataclass(frozen=True)
class SweepConfig:
    """What one ``python -m bench.run`` sweeps and how (see ``--help`` for each option's meaning).

    ``model_source`` is ``--model`` as given; ``model_digest`` the content digest of what defines the model
    (:func:`bench.provenance.model_digest`: a run setting and part of every cache key), "" until it is loaded.
    ``model_options`` holds the loader's options (``--model-opt`` and ``--weights``) as sorted (name, value)
    pairs; :attr:`model_kwargs` gives them as a fresh dict.  ``batch_size`` is a count or ``"auto"`` until the
    model is loaded; ``repeats`` is a count or None (automatic).
    """

    model: str
    specs: tuple[SolverSpec, ...]
    steps: tuple[int, ...]
    spacing: Optional[str]
    metrics: tuple[str, ...]
    model_options: tuple[tuple[str, object], ...]
    num_samples: int
    batch_size: Union[int, str]
    reference_size: Optional[int]
    seed: int
    repeats: Optional[int]
    dtype: str
    out_dir: Path
    rng: str = "torch"
    autocast: Optional[str] = None
    channels_last: bool = False
    compile: Optional[str] = None
    cuda_graph: bool = False
    force: bool = False
    quiet: bool = False
    no_report: bool = False
    save_samples: bool = False
    cache_dir: Optional[str] = None
    inception_weights: Optional[str] = None
    resnet20_weights: Optional[str] = None
    guidance: tuple[float, ...] = ()  # classifier-free guidance scales (class-conditional models; () otherwise)
    model_source: str = ""  # what --model was given (a zoo name, pkg.module:ATTR or a card file's path)
    model_digest: str = ""  # what the model is (bench.provenance.model_digest), set once the model is loaded

    @property
    def model_kwargs(self) -> dict:
        """The model loader's keyword arguments."""
        return dict(self.model_options)

    @property
    def network(self) -> str:
        """How the network is called (:func:`network_setting`)."""
        return network_setting(self)

    def model_options_json(self) -> str:
        """The loader options as the results' ``model_options`` run setting (sorted JSON)."""
        return json.dumps(self.model_kwargs, sort_keys=True, default=str)


def network_setting(cfg) -> str:
    """How the network is called, as one string ("eager", or e.g. "autocast=bf16,channels_last,compile=default")."""
    parts = ([f"autocast={cfg.autocast}"] if cfg.autocast else []) + (["channels_last"] if cfg.channels_last else []) \
        + ([f"compile={cfg.compile}"] if cfg.compile else []) + (["cuda_graph"] if cfg.cuda_graph else [])
    return ",".join(parts) or "eager"


def default_solvers(card) -> str:
    """The solvers a sweep of ``card`` runs when ``--solvers`` is not given: the card's own (``extra["solvers"]``,
    e.g. ``consistency`` for a consistency model, which other solvers would misuse), else
    :data:`DEFAULT_SOLVERS`."""
    return ",".join(card.extra.get("solvers", ())) or DEFAULT_SOLVERS


def make_config(args: argparse.Namespace, card, world: int = 1) -> SweepConfig:
    """The frozen configuration of ``args`` for ``card`` in a job of ``world`` processes.

    Raises:
        UsageError: a bad step list (or steps above the optimiser's limit with --spacing optimized), solver,
            option, size, seed, repeat count or metric (with the valid choices).
    """
    steps = parse_steps(args.steps)
    _check_optimizable_steps(args.spacing, steps)
    guidance = parse_guidance(getattr(args, "guidance", None), card)
    specs = parse_solvers(default_solvers(card) if args.solvers is None else args.solvers, args.solver_opt)
    num_samples = card.default_num_samples if args.num_samples is None else args.num_samples
    try:
        batch_size = card.default_batch_size if args.batch_size is None else parse_batch_size(args.batch_size)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _check_sizes(num_samples, args.reference_size, world)
    check_seed(args.seed)
    _check_conditional_fast_paths(args, card)
    return SweepConfig(
        model=card.name, specs=tuple(specs), steps=tuple(steps), spacing=args.spacing,
        metrics=tuple(_metric_keys(args.metric, card)), model_options=_model_options(args),
        num_samples=num_samples, batch_size=batch_size, reference_size=args.reference_size, seed=args.seed,
        repeats=parse_repeats(args.repeats), dtype=args.dtype or ("float64" if card.kind == "analytic" else "float32"),
        out_dir=Path(args.out or Path("runs") / safe_filename(card.name)), rng=args.rng, autocast=args.autocast,
        channels_last=args.channels_last, compile=args.compile, cuda_graph=args.cuda_graph, force=args.force,
        quiet=args.quiet, no_report=args.no_report, save_samples=args.save_samples, cache_dir=args.cache_dir,
        inception_weights=args.inception_weights, resnet20_weights=args.resnet20_weights, guidance=guidance,
        model_source=str(args.model))


def _check_conditional_fast_paths(args: argparse.Namespace, card) -> None:
    """Refuse --compile / --cuda-graph for a class-conditional model: each batch is conditioned on its own labels
    (``card.condition``), a new network call that they would compile or capture again for every batch."""
    if card.num_classes and (args.compile or args.cuda_graph):
        flag = "--compile" if args.compile else "--cuda-graph"
        raise UsageError(f"{flag} cannot be used with {card.name}: a class-conditional model is conditioned on "
                         "each batch's labels (card.condition), a new network call per batch that "
                         f"{flag} would compile or capture again for every batch, inside the timing; run it "
                         "without --compile / --cuda-graph (--autocast and --channels-last apply)")


def _check_optimizable_steps(spacing: Optional[str], steps: list[int]) -> None:
    """--spacing optimized: every step count within the optimiser's limit (else the sweep would fail only when
    that cell's grid is calibrated, after the model loaded and the other cells ran)."""
    too_many = [n for n in steps if n > MAX_OPTIMIZED_STEPS]
    if spacing == OPTIMIZED and too_many:
        raise UsageError(f"--spacing optimized: --steps {','.join(map(str, too_many))} is above the optimiser's "
                         f"limit of {MAX_OPTIMIZED_STEPS:,} steps (solvers.optimize.MAX_STEPS); give at most "
                         f"{MAX_OPTIMIZED_STEPS:,} steps, or another --spacing")


def _check_sizes(num_samples: int, reference_size: Optional[int], world: int) -> None:
    if num_samples < 2:
        raise UsageError(f"--num-samples must be at least 2 (a covariance needs two samples), got {num_samples}")
    if num_samples < world:
        raise UsageError(f"--num-samples {num_samples} is fewer than the {world} processes")
    if reference_size is not None and reference_size < 2:
        raise UsageError(f"--reference-size must be at least 2, got {reference_size}")


def _model_options(args: argparse.Namespace) -> tuple[tuple[str, object], ...]:
    """``--model-opt`` assignments plus ``--weights`` (given once), as sorted pairs."""
    options = dict(parse_assignment(o, "--model-opt") for o in args.model_opt)
    if args.weights is not None:
        if "weights" in options:
            raise UsageError("give the weights once: --weights PATH or --model-opt weights=PATH, not both")
        options["weights"] = args.weights
    return tuple(sorted(options.items()))


def parse_repeats(text) -> Optional[int]:
    """``--repeats``: "auto" → None (the rule of :func:`bench.sweep.more_passes`), else a positive count of
    timed passes.

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


def _metric_keys(text: Optional[str], card) -> list[str]:
    try:
        keys = M.check_metrics([m.strip() for m in text.split(",") if m.strip()] if text else M.default_metrics(card),
                               card)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not keys:
        raise UsageError(f"no metric given; metrics for {card.name}: {', '.join(M.metrics_for(card))}")
    return keys

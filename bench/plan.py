"""The plan of a sweep: ``--steps`` and ``--solvers`` parsed, and every (solver, steps) cell resolved — its time
grid from the solver's own declarations (:attr:`solvers.Solver.default_spacing`, ``steps_in_log_snr``), its
options, declared NFE and key — before anything is sampled, so that a bad combination fails first."""
from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

import solvers
from solvers import schedules

from .results import cell_key, safe_filename

__all__ = ["UsageError", "check_seed", "parse_steps", "parse_guidance", "sample_labels", "parse_solvers", "parse_assignment", "SolverSpec", "Cell",
           "default_spacing", "default_t_start", "plan_cells"]


class UsageError(ValueError):
    """Bad command-line input (reported with the valid choices)."""



# -- argument parsing --------------------------------------------------------------------------------------
def check_seed(seed: int) -> None:
    """Refuse a negative ``--seed`` (the per-sample seeds are seed·stride + j)."""
    if seed < 0:
        raise UsageError(f"--seed must be non-negative, got {seed}")


def parse_steps(text: str) -> list[int]:
    """'1,10,50' → [1, 10, 50] (sorted, unique).

    Raises:
        UsageError: an entry that is not a positive integer.
    """
    out = []
    for part in str(text).split(","):
        p = part.strip()
        if not p.isdigit() or int(p) < 1:
            raise UsageError(f"--steps must be a comma-separated list of positive integers (e.g. 1,10,50,1000); "
                             f"{p!r} is not one")
        out.append(int(p))
    return sorted(set(out))


def parse_guidance(text: Optional[str], card) -> tuple[float, ...]:
    """``--guidance`` for ``card``: '1,2,4' → (1.0, 2.0, 4.0), sorted; None → the card's ``default_guidance``
    (w = 1, the conditional model alone, for a class-conditional card that names none); () for an
    unconditional card, which has no guidance axis.

    Raises:
        UsageError: guidance given for an unconditional card, or an entry that is not a finite number ≥ 0, or
            one given twice.
    """
    if text is None:
        return (tuple(sorted(float(w) for w in card.default_guidance)) or (1.0,)) if card.num_classes else ()
    if not card.num_classes:
        raise UsageError(f"--guidance is classifier-free guidance of a class-conditional model; {card.name} is "
                         "unconditional (its card has no num_classes / condition): leave --guidance out")
    out = []
    for part in str(text).split(","):
        p = part.strip()
        try:
            w = float(p)
        except ValueError:
            w = float("nan")
        if not math.isfinite(w) or w < 0:
            raise UsageError(f"--guidance must be a comma-separated list of finite numbers ≥ 0 (e.g. 1,2,4; "
                             f"1 = the conditional model alone, 0 = the unconditional one); {p!r} is not one")
        if w in out:
            raise UsageError(f"--guidance lists {w:g} twice ({text!r}); give each guidance scale once")
        out.append(w)
    return tuple(sorted(out))


def sample_labels(start: int, stop: int, num_classes: int) -> torch.Tensor:
    """The class labels of samples start … stop−1 of a run: sample i is generated for class i mod
    ``num_classes`` — balanced, and the same whatever the batch size, the process split or the cells run (the
    index i is the one that chooses the sample's seed)."""
    return torch.arange(start, stop, dtype=torch.int64) % int(num_classes)


def parse_value(text: str) -> Any:
    """A command-line value as a Python literal (``1e-3``, ``True``, ``(1, 2)``), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return text


def parse_assignment(text: str, where: str) -> tuple[str, Any]:
    """``OPTION=VALUE`` → (option, value as a Python literal where it parses as one); ``where`` names the flag.

    Raises:
        UsageError: no ``=`` or an empty option name.
    """
    if "=" not in text:
        raise UsageError(f"{where}: expected OPTION=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    if not k.strip():
        raise UsageError(f"{where}: empty option name in {text!r}")
    return k.strip(), parse_value(v.strip())


@dataclass
class SolverSpec:
    """One entry of ``--solvers``: the name as given, its canonical name and its options."""

    label: str
    name: str
    options: dict = field(default_factory=dict)


def parse_solvers(text: str, solver_opts: Sequence[str] = ()) -> list[SolverSpec]:
    """Parse ``--solvers`` (``NAME[:OPT=VAL…]`` entries, comma-separated) and ``--solver-opt`` items.

    ``--solver-opt OPT=VAL`` goes to every listed solver that has the option (an error if none has it);
    ``--solver-opt NAME.OPT=VAL`` to that solver only.

    Raises:
        UsageError: unknown solver (the valid names are listed) or option.
    """
    specs = []
    for entry in [e.strip() for e in str(text).split(",") if e.strip()]:
        name, *opts = entry.split(":")
        try:
            canonical = solvers.solver_class(name).name
        except ValueError as e:
            raise UsageError(str(e)) from None
        options = dict(parse_assignment(o, f"--solvers entry {entry!r}") for o in opts)
        specs.append(SolverSpec(label=entry, name=canonical, options=options))
    if not specs:
        raise UsageError(f"--solvers is empty; valid: {', '.join(solvers.available_solvers())}")
    for item in solver_opts:
        key, value = parse_assignment(item, "--solver-opt")
        target, _, opt = key.rpartition(".")
        if target and not _known(target):
            raise UsageError(f"--solver-opt {item!r}: unknown solver {target!r}; valid: "
                             f"{', '.join(solvers.available_solvers())}")
        targets = [s for s in specs if not target or s.name == solvers.solver_class(target).name]
        hits = 0
        for s in targets:
            if opt in _option_names(s.name):
                s.options.setdefault(opt, value)  # an option written inline in --solvers takes precedence
                hits += 1
        if hits == 0:
            have = "; ".join(f"{s.label}: {', '.join(_option_names(s.name)) or '(none)'}" for s in specs)
            raise UsageError(f"--solver-opt {item!r}: no listed solver has an option {opt!r} (options: {have})")
    for s in specs:  # validate the values now, not halfway through the sweep
        try:
            solvers.get_solver(s.name, **s.options)
        except (TypeError, ValueError) as e:
            raise UsageError(f"solver {s.label!r}: {e}") from None
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--solvers lists the same entry twice: {', '.join(labels)}")
    return specs


def _known(name: str) -> bool:
    try:
        solvers.solver_class(name)
        return True
    except ValueError:
        return False


def _option_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(solvers.solver_class(name))]


# -- the plan -------------------------------------------------------------------------------------------------
OPTIMIZED = "optimized"  # --spacing optimized: a grid from solvers.optimize_timesteps, calibrated per cell
SPACING_CHOICES = tuple(solvers.SPACINGS) + (OPTIMIZED,)


@dataclass
class Cell:
    """One (solver, steps[, guidance]) point of the sweep, fully resolved before anything runs.

    ``guidance`` is the classifier-free guidance scale w of a class-conditional model's cell (None for an
    unconditional model: no guidance axis, and its cell ids and keys are those of a plain sweep).

    With ``--spacing optimized`` the cell's ``grid`` is its starting grid (``base_spacing``, the solver's
    default) until the sweep calibrates it (:func:`bench.sweep` replaces it by the optimised one)."""

    label: str
    solver: str
    options: dict
    steps: int
    spacing: str
    spacing_note: str
    t_start: Optional[float]
    grid: list
    nfe_declared: int
    deterministic: bool
    key: str
    base_spacing: Optional[str] = None
    calibration: Optional[dict] = None  # the optimisation's record (grids, errors, cost), once calibrated
    guidance: Optional[float] = None

    @property
    def cell_id(self) -> str:
        """A file-name-safe, human-readable id (unique within a results directory)."""
        w = "" if self.guidance is None else f"-w{self.guidance:g}"
        return f"{safe_filename(self.label)}-s{self.steps}{safe_filename(w)}-{self.spacing}-{self.key[:6]}"

    @property
    def name(self) -> str:
        """The cell as a reader names it: "heun × 5 steps" (", w = 3" under guidance)."""
        return f"{self.label} × {self.steps} steps" + ("" if self.guidance is None else f", w = {self.guidance:g}")


def default_spacing(card, schedule, solver: str, steps: int) -> tuple[str, str]:
    """The grid spacing a solver's own paper uses on this model, and a note saying why.

    The solver class declares it (``default_spacing``, ``default_spacing_note``, ``paper_spacing_by_data``):
    e.g. DPM-Solver++ and UniPC uniform in log-SNR, Heun and Euler Karras et al.'s ρ = 7 spacing, DDIM / DDPM
    DDIM's uniform skip as ``trailing`` and its quadratic grid on CIFAR-10.  On this model:

    * α = 0 at t_max (rectified flow): uniform in t for every solver (no log-SNR or σ/α grid starts there).
    * A discrete spacing on a continuous schedule: uniform in t.
    * A paper grid for the card's data set on a discrete schedule, where it fits ``steps`` (DDIM's quadratic
      grid repeats indices beyond ~300 steps of 1000; then the declared ``trailing``, which at steps = N is
      the full ancestral chain).
    """
    cls = solvers.solver_class(solver)
    discrete = isinstance(schedule, schedules.DiscreteVP)
    if not math.isfinite(float(schedule.log_snr(schedule.t_max))):
        return "uniform", "uniform in t (flow matching; log-SNR and σ/α are infinite at t_max)"
    if cls.default_spacing in solvers.grids.DISCRETE_SPACINGS and not discrete:
        return "uniform", "uniform in t"
    paper = cls.paper_spacing_by_data.get(card.reference) if discrete else None
    if paper is not None:
        try:
            solvers.make_grid(schedule, steps, spacing=paper[0])
            return paper
        except ValueError:
            return cls.default_spacing, (f"the {paper[0]} grid repeats timesteps at {steps} steps; "
                                         f"'{cls.default_spacing}' (every index at steps = N)")
    return cls.default_spacing, cls.default_spacing_note


def default_t_start(schedule, solver: str) -> Optional[float]:
    """Where a solver's grid starts by default: ``t_max``, except for the solvers that step in log-SNR
    (``steps_in_log_snr``) on a schedule where λ(t_max) = −∞ (rectified flow): t_max·(1 − 10⁻³)."""
    if solvers.solver_class(solver).steps_in_log_snr and not math.isfinite(float(schedule.log_snr(schedule.t_max))):
        return float(schedule.t_max) * (1 - 1e-3)
    return None


def plan_cells(card, model, specs: list[SolverSpec], steps: list[int], spacing: Optional[str],
               guidance: Sequence[float] = ()) -> list[Cell]:
    """Resolve every cell (grid, options, declared NFE) so that bad combinations fail before any sampling: one per
    solver × steps, × each ``guidance`` scale for a class-conditional model.

    Raises:
        UsageError: a grid or solver that does not fit the model (the message names the cell).
    """
    cells = []
    card_opts = card.default_solver_options or {}
    for spec in specs:
        defaults = card_opts.get(spec.name, {}) if isinstance(card_opts.get(spec.name, {}), dict) else {}
        options = {**defaults, **spec.options}
        try:
            slv = solvers.get_solver(spec.name, **options)
        except (TypeError, ValueError) as e:
            raise UsageError(f"solver {spec.label!r} on {card.name}: {e}") from None
        options = slv.options()
        if spacing == OPTIMIZED:
            _check_optimizable(spec, slv)
        for n in steps:
            if spacing is None or spacing == OPTIMIZED:
                sp, note = default_spacing(card, model.schedule, spec.name, n)
            else:
                sp, note = spacing, "--spacing"
            t_start = default_t_start(model.schedule, spec.name)
            try:
                grid = solvers.make_grid(model.schedule, n, spacing=sp, t_start=t_start)
                slv.check(solvers.base.points_at(model.schedule, model, grid))
            except ValueError as e:
                raise UsageError(f"cell {spec.label} × {n} steps ({sp} spacing) does not fit {card.name}: {e}") from None
            base = sp if spacing == OPTIMIZED else None
            if base is not None:
                sp, note = OPTIMIZED, f"optimized for this model from the {base} grid ({note})"
            for w in (guidance or [None]):
                cells.append(Cell(label=spec.label, solver=spec.name, options=options, steps=n, spacing=sp,
                                  spacing_note=note, t_start=t_start, grid=grid,
                                  nfe_declared=slv.nfe(grid, model.schedule.t_zero), deterministic=not slv.is_stochastic,
                                  key=cell_key(card.name, spec.name, options, n, sp, t_start, guidance=w),
                                  base_spacing=base, guidance=w))
    return cells


def _check_optimizable(spec: SolverSpec, slv) -> None:
    """--spacing optimized needs a deterministic fixed-grid solver (the error it minimises must not be random)."""
    if slv.adaptive or slv.is_stochastic:
        why = "chooses its own steps" if slv.adaptive else "draws noise with these options"
        raise UsageError(f"--spacing optimized: {spec.label} {why}, so there is no fixed grid to optimise; give "
                         "deterministic solvers (e.g. ddim, dpmpp_2m, dpmpp_3m, unipc, heun) or another --spacing")

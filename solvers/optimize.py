"""Time grids optimised for one model, solver and step count: :func:`optimize_timesteps`.

Where the steps are placed matters most at 5–20 model calls (Align Your Steps, Sabour et al. 2024; GITS,
Chen et al. 2024; Optimal Stepsize Distillation, 2025).  This module finds a grid for the user's own model
from a calibration batch of starting states, in three deterministic stages:

1. **reference** — the calibration batch solved accurately by the adaptive Dormand–Prince solver at a tight
   tolerance (``reference_rtol``), to the same end as the grid (when the grid ends at σ = 0: to its last
   noise level, then the model's denoised output there, which is what every fixed-grid solver returns on
   its final step);
2. **initial grid** — GITS-style dynamic programming: the reference trajectory at ``candidates`` levels
   uniform in the search coordinate (below), the model's denoised output there, and the path of ``steps``
   first-order (DDIM) steps through those levels with the least summed local error;
3. **search** — the free interior levels in a monotone parametrisation (the increments of the coordinate
   are a softmax of free logits, so every candidate grid is strictly decreasing and keeps its ends),
   improved by a compass (pattern) search on the *actual* final-sample RMS error of the chosen solver
   against the reference, from the better of the default and the DP grid, within a fixed budget of
   ``evaluations`` solver runs.

With ``free_start=True`` the grid's first time is free too: the starting states stand for the prior's draw at
that later, lower noise level (:func:`start_state`: unchanged on VP schedules, scaled by σ'/σ on VE and flow
schedules — what ``solvers.initial_noise(..., t=opt.timesteps[0])`` gives from the same seeds), skipping the
first stretch of the ODE without a model call, as diffusers' "leading" timesteps (800, 600, … at 5 of 1,000
steps) do by construction; it pays where the state barely moves at the highest noise levels.  The error is
still measured against the solution from the original start; two more searches run with the first time free,
one from the fixed-start result (so the answer is never worse than it on the calibration batch) and one from
a free-start DP grid (a local search can end better from a worse start), and the better grid is kept.

Cost (batched model calls on the calibration batch, all counted in ``OptimizedGrid.nfe``): the reference
(adaptive Dormand–Prince at ``reference_rtol`` and its check at 10× that; problem-dependent), plus
``candidates`` − 1 for the DP initialiser, plus up to ``evaluations`` + 2 solver runs (the default grid, the DP
grid, the search) × the solver's calls per grid (``steps`` for the multistep solvers).  Measured with the
defaults on the exact 2-D and 64-D mixtures (64 samples): reference ≈ 650 calls; in total 1,345 / 1,955 /
3,175 calls at 5 / 10 / 20 steps — the cost of sampling the batch ~200 times at that step count.  With
``free_start`` a second DP initialiser and two more searches follow (about three times the cost).

The search coordinate is the log-SNR λ where it is finite at both ends of the range (VP, VE/EDM, DiscreteVP
schedules), otherwise the solver time t (rectified flow from t = 1, where α = 0).  Nothing random is used:
the same inputs give the same grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .grids import check_steps, make_grid, validate_grid
from .loop import NonFiniteError, check_call, sample
from .model import DiffusionModel
from .registry import get_solver

__all__ = ["OptimizedGrid", "optimize_timesteps", "start_state", "MAX_STEPS", "MAX_CANDIDATES"]

# The DP initialiser scores one step between every pair of its candidate levels (2·steps by default) on the
# calibration batch and keeps the reference state at each level: its work grows with the square of the step
# count.  The bound covers the finest grids in use (1,000 steps of a DiscreteVP); far above it a grid is no
# longer worth optimising.
MAX_STEPS = 1_000
MAX_CANDIDATES = 2 * MAX_STEPS
DEFAULT_CANDIDATES = 64


@dataclass(frozen=True)
class OptimizedGrid:
    """The result of :func:`optimize_timesteps`.

    Attributes:
        timesteps: the optimised grid: ``steps + 1`` strictly decreasing solver times with the default grid's
            ends (with ``free_start`` the first may be later) (pass it as ``solvers.sample(..., timesteps=
            opt.timesteps)``).
        default_timesteps: the grid it started from (``solvers.grids.make_grid`` with the given spacing).
        error_before, error_after: the RMS error (over every entry of the calibration batch) of the solver's
            final samples against the reference, on the default grid and on the optimised one.
        nfe: model calls spent in total (batched calls on the calibration batch): ``nfe_reference`` for the
            reference, ``candidates`` for the DP initialiser, the rest for the search.
        nfe_reference: model calls of the reference solution.
        reference_error: the estimated error of the reference (RMS difference from a solution at a 10×
            looser tolerance, an upper bound in practice); far below ``error_after`` for a sound result.
        solver, options: the solver and its options, as :func:`solvers.sample` records them.
        method: what was done, in words.
        evaluations: solver runs made by the search.
        calibration_size: samples in the calibration batch.
    """

    timesteps: tuple
    default_timesteps: tuple
    error_before: float
    error_after: float
    nfe: int
    nfe_reference: int
    reference_error: float
    solver: str
    options: dict
    method: str
    evaluations: int
    calibration_size: int


def optimize_timesteps(model: DiffusionModel, x_T: torch.Tensor, *, solver: str, steps: int,
                       t_start: Optional[float] = None, t_end: Optional[float] = None, spacing: str = "logsnr",
                       denoise_to_zero: bool = True, evaluations: int = 120, candidates: Optional[int] = None,
                       reference_rtol: float = 1e-6, free_start: bool = False, **solver_options) -> OptimizedGrid:
    """A time grid for ``solver`` at ``steps`` steps that minimises its error on ``model`` (module docstring).

    Args:
        model: the :class:`~solvers.DiffusionModel`.
        x_T: the calibration batch of starting states at ``t_start`` (e.g. :func:`solvers.initial_noise` with
            seeds disjoint from those the grid will be used on); 32–256 samples are typical.
        solver: a deterministic fixed-grid solver's name (stochastic solvers and ``adaptive`` are refused:
            the error to optimise would be a random variable, or there is no grid).
        steps: the grid's step count (1 … :data:`MAX_STEPS`).
        t_start, t_end, spacing, denoise_to_zero: the default grid, as in :func:`solvers.sample`.  Its
            first and last times are kept; with ``denoise_to_zero`` the last noise level ``t_end`` is kept too
            (the final step to σ = 0 returns the model's denoised output there).
        evaluations: the search budget: solver runs on the calibration batch (fixed; no early random exit).
        candidates: levels of the DP initialiser's grid, 2·steps … :data:`MAX_CANDIDATES` (None: max(64, 2·steps)).
        reference_rtol: tolerance of the reference solution (``atol`` the same).
        free_start: let the first time move later: ``x_T`` then stands for the prior's draw there
            (:func:`start_state`), skipping the first stretch of the ODE as diffusers' "leading" timesteps do;
            the error is still that against the solution from ``t_start`` (module docstring).
        **solver_options: the solver's options (e.g. ``official_d2=True`` for dpmpp_3m).

    Returns:
        :class:`OptimizedGrid`.  Its ``error_after`` is never above ``error_before`` (the default grid is a
        candidate of the search).

    Cost: about 200 sampling runs of the calibration batch, three times that with ``free_start`` (all counted in
    ``nfe``; the module docstring breaks it down, with measurements).

    Raises:
        TypeError: a model that is not a DiffusionModel; an x_T that is not a real floating tensor; an unknown
            solver option.
        ValueError: an unknown, adaptive or stochastic solver; a bad ``steps`` (or one above
            :data:`MAX_STEPS`), ``evaluations``, ``candidates`` or ``reference_rtol``; a default grid the
            arguments cannot build — all before any model call.
    """
    check_call(model, x_T, "x_T", None, steps)
    slv = _check_solver(solver, solver_options)
    candidates = _check_budget(evaluations, candidates, reference_rtol, steps, free_start)
    default = make_grid(model.schedule, steps, spacing=spacing, t_start=t_start, t_end=t_end,
                        denoise_to_zero=denoise_to_zero)
    slv.check(_points(model, default))
    tail, transitions, coords, fine = _search_space(model, default, denoise_to_zero, candidates, free_start)
    ref, trajectory, ref_nfe, ref_err = _reference(model, x_T, fine + tail, reference_rtol)
    objective = _Objective(model, x_T, ref, solver, solver_options, default[0])
    error_before = objective(default)
    best, best_err = default, error_before
    cost = _dp_costs(model, fine, trajectory[:len(fine)]) if coords else None
    for coord in coords:
        best, best_err = _improve(model, objective, coord, fine, trajectory, tail, transitions, cost, best,
                                  best_err, evaluations)
    method = (_method(coords, spacing, candidates, reference_rtol, transitions, free_start, objective.runs)
              if coords else f"default grid ({spacing}): no free level to move at {steps} step(s)")
    return OptimizedGrid(
        timesteps=tuple(best), default_timesteps=tuple(default), error_before=error_before, error_after=best_err,
        nfe=ref_nfe + (len(fine) - 1 if coords else 0) + objective.nfe, nfe_reference=ref_nfe,
        reference_error=ref_err, solver=slv.name, options=slv.options(), method=method,
        evaluations=objective.runs, calibration_size=int(x_T.shape[0]))


def _method(coords: list, spacing: str, candidates: int, reference_rtol: float, transitions: int,
            free_start: bool, runs: int) -> str:
    """What :func:`optimize_timesteps` did, in words."""
    name = coords[0].name
    free = ("; then again with the first time free, from that grid and from a free-start DP grid"
            if free_start else "")
    return (f"reference: adaptive dopri5 at rtol=atol={reference_rtol:g}; initial grid: the better of the "
            f"default ({spacing}) and GITS-style DP over {candidates} levels uniform in {name}; compass search on "
            f"the softmax logits of the {name} increments of the {transitions - 1} free levels{free}; {runs} "
            "solver runs")


def _search_space(model: DiffusionModel, default: list, denoise_to_zero: bool, candidates: int,
                  free_start: bool = False):
    """(the kept final step to σ = 0 as a list, the number of transitions between noise levels, the search
    coordinates — with the first time kept, then (``free_start``) free; none where no level can move —, the
    DP's fine candidate levels)."""
    to_zero = denoise_to_zero and len(default) > 2
    tail = [default[-1]] if to_zero else []          # the final step to σ = 0, kept as it is
    levels = default[:-1] if to_zero else default    # the noise levels: the first (unless free) and last are kept
    transitions = len(levels) - 1
    coords = [_Coordinate(model.schedule, levels[0], levels[-1], free) for free in (False, True)
              if (free and free_start) or (not free and transitions > 1)]
    fine = (_Coordinate(model.schedule, levels[0], levels[-1]).levels(torch.zeros(candidates - 1,
                                                                                  dtype=torch.float64))
            if coords else levels)
    return tail, transitions, coords, fine


def _improve(model, objective, coord, fine: list, trajectory: list, tail: list, transitions: int,
             cost: torch.Tensor, start: list, start_err: float, evaluations: int) -> tuple[list, float]:
    """Stages 2–3 in one coordinate: the compass search from the better of ``start`` (the default grid) and
    the DP grid; with the first time free, from each of ``start`` (the fixed-start search's result) and the
    free-start DP grid — a local search, it can end in a better grid from a worse start —, the better kept."""
    skip = (torch.tensor([_rms(start_state(model.schedule, trajectory[0], fine[0], t), trajectory[i])
                          for i, t in enumerate(fine)], dtype=torch.float64) if coord.free_start else None)
    dp_grid = [fine[i] for i in _dp_path(cost, transitions, skip)] + tail
    dp_err = objective(dp_grid)
    if coord.free_start:
        found = [_compass_search(objective, coord, g, e, tail, evaluations)
                 for g, e in ((start, start_err), (dp_grid, dp_err))]
        return min(found, key=lambda r: r[1])
    best, best_err = (dp_grid, dp_err) if dp_err < start_err else (start, start_err)
    return _compass_search(objective, coord, best, best_err, tail, evaluations)


def _check_solver(solver: str, options: dict):
    """The configured solver, refused (ValueError) if it is adaptive or stochastic."""
    slv = get_solver(solver, **options)
    if slv.adaptive:
        raise ValueError(f"optimize_timesteps: {slv.name!r} chooses its own steps at run time, so it has no grid "
                         "to optimise; give a fixed-grid solver (e.g. dpmpp_2m, dpmpp_3m, unipc, deis, heun)")
    if slv.is_stochastic:
        raise ValueError(f"optimize_timesteps: {slv.name!r} with these options draws noise, so its error on a "
                         "calibration batch is a random variable; give a deterministic solver (e.g. ddim with "
                         "eta=0, dpmpp_2m_sde with eta=0, dpmpp_2m)")
    return slv


def _check_budget(evaluations, candidates, reference_rtol, steps: int, free_start=False) -> int:
    """The DP grid's number of levels (``candidates``, ``None``: max(64, 2·steps)), after refusing a step count
    above :data:`MAX_STEPS`, a bad search budget, DP grid size or reference tolerance (ValueError) or a
    free_start that is not a bool (TypeError), before any model call."""
    if not isinstance(free_start, bool):
        raise TypeError(f"free_start must be True or False, got {free_start!r}")
    if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 0:
        raise ValueError(f"evaluations must be an integer >= 0 (solver runs of the search), got {evaluations!r}")
    if check_steps(steps) > MAX_STEPS:
        raise ValueError(f"optimize_timesteps handles at most {MAX_STEPS:,} steps (its DP initialiser scores every "
                         f"pair of 2·steps levels on the calibration batch, work growing with steps²), got "
                         f"steps={steps}; give fewer steps, or sample on a default spacing at this count")
    candidates = max(DEFAULT_CANDIDATES, 2 * steps) if candidates is None else candidates
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not (
            2 * steps <= candidates <= MAX_CANDIDATES):
        raise ValueError(f"candidates must be an integer in [{2 * steps}, {MAX_CANDIDATES}] (levels of the DP grid: "
                         f"at least 2·steps, at most MAX_CANDIDATES; None: max({DEFAULT_CANDIDATES}, 2·steps)), "
                         f"got {candidates!r}")
    if isinstance(reference_rtol, bool) or not isinstance(reference_rtol, (int, float)) or not (
            1e-12 <= reference_rtol <= 1e-3):
        raise ValueError(f"reference_rtol must be a number in [1e-12, 1e-3], got {reference_rtol!r}")
    return candidates


def start_state(schedule, x_T: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
    """The starting states drawn at ``t_from`` as the prior's draw at a later ``t_to`` (a free-start grid's
    first time): scaled by ``schedule.prior_std(t_to) / prior_std(t_from)`` — unchanged on VP schedules,
    σ'/σ on VE and flow schedules — which is what :func:`solvers.initial_noise` with ``t=t_to`` gives from the
    same seeds."""
    if t_to == t_from:
        return x_T
    return x_T * (schedule.prior_std(t_to) / schedule.prior_std(t_from))


def _points(model: DiffusionModel, grid: list):
    from .base import points_at
    return points_at(model.schedule, model, grid)


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def _reference(model, x_T, grid: list, rtol: float) -> tuple[torch.Tensor, list, int, float]:
    """The accurate solution over ``grid`` (adaptive dopri5; the interior times are outputs, not steps).

    Returns:
        (final states, the states at the grid times from the first on (the final states last), model calls,
        estimated error: the RMS difference from a run at 10× the tolerance).
    """
    states = [x_T]
    run = sample(model, x_T, "adaptive", timesteps=grid, method="dopri5", rtol=rtol, atol=rtol, timing=False,
                 callback=lambda info: states.append(info.x))
    check = sample(model, x_T, "adaptive", timesteps=[grid[0], grid[-1]] if len(grid) == 2 else
                   [grid[0], grid[-2], grid[-1]], method="dopri5", rtol=10 * rtol, atol=10 * rtol, timing=False)
    return run.samples, states, run.nfe + check.nfe, _rms(run.samples, check.samples)


def _dp_costs(model: DiffusionModel, levels: list, trajectory: list) -> torch.Tensor:
    """cost[i, j]: the RMS local error of one first-order (DDIM) step from the reference state at level i to
    level j > i (inf elsewhere).  One model call per level but the last (the denoised output on the reference
    trajectory)."""
    m = len(levels)
    pts = _points(model, levels)
    with torch.no_grad():
        den = [model.denoise(trajectory[i], levels[i]) for i in range(m - 1)]
    cost = torch.full((m, m), math.inf, dtype=torch.float64)
    for i in range(m - 1):
        p = pts[i]
        for j in range(i + 1, m):
            q = pts[j]
            x_hat = trajectory[i] * (q.sigma / p.sigma) + den[i] * (q.alpha - p.alpha * q.sigma / p.sigma)
            cost[i, j] = _rms(x_hat, trajectory[j])
    return cost


def _dp_path(cost: torch.Tensor, transitions: int, skip: Optional[torch.Tensor] = None) -> list:
    """GITS-style initial grid: the indices 0 = i_0 < … < i_K = m − 1 (K = ``transitions``) whose steps have the
    least summed ``cost`` (:func:`_dp_costs`).  With ``skip`` (a free start) i_0 may be any level, at the cost
    ``skip[i_0]``: the RMS difference between the start state and the reference state there."""
    m = cost.shape[0]
    # best[k, j]: least cost of reaching level j in k steps; back[k, j]: the level before j on that path.
    best = torch.full((transitions + 1, m), math.inf, dtype=torch.float64)
    back = torch.zeros((transitions + 1, m), dtype=torch.long)
    best[0, 0] = 0.0
    if skip is not None:
        best[0, 1:] = skip[1:]
    for k in range(1, transitions + 1):
        total = best[k - 1][:, None] + cost
        best[k], back[k] = total.min(dim=0)
    path = [m - 1]
    for k in range(transitions, 0, -1):
        path.append(int(back[k, path[-1]]))
    return path[::-1]


def _compass_search(objective, coord, grid: list, err: float, tail: list, budget: int) -> tuple[list, float]:
    """Improve ``grid`` by a compass search on the logits of its levels' increments, within ``budget`` runs.

    Each sweep tries every logit ± δ in turn and keeps the first improvement; a sweep without one halves δ
    (from 0.5 down to 1e-3).  Deterministic; the error never rises.
    """
    theta = coord.logits(grid[:len(grid) - len(tail)])
    delta, runs = 0.5, 0
    while runs < budget and delta >= 1e-3:
        improved = False
        for k in range(theta.numel()):
            for sign in (1.0, -1.0):
                if runs >= budget:
                    break
                trial = theta.clone()
                trial[k] += sign * delta
                cand = coord.levels(trial) + tail
                runs += 1
                cand_err = objective(cand)
                if cand_err < err:
                    theta, grid, err, improved = trial, cand, cand_err, True
                    break
        if not improved:
            delta /= 2
    return grid, err


class _Objective:
    """RMS error of the solver's final samples on a grid against the reference; counts its runs and calls.

    A grid the solver cannot use (points merged by rounding) or that gives NaN/Inf scores +inf.
    """

    def __init__(self, model, x_T, ref, solver: str, options: dict, t0: float):
        self.model, self.x_T, self.ref, self.solver, self.options = model, x_T, ref, solver, options
        self.t0 = t0
        self.runs = 0
        self.nfe = 0

    def __call__(self, grid: list) -> float:
        try:
            validate_grid(self.model.schedule, grid)
        except ValueError:
            return math.inf
        self.runs += 1
        try:
            x = start_state(self.model.schedule, self.x_T, self.t0, grid[0])
            res = sample(self.model, x, self.solver, timesteps=grid, timing=False, **self.options)
        except NonFiniteError:
            self.nfe += len(grid) - 1
            return math.inf
        self.nfe += res.nfe
        return _rms(res.samples, self.ref)


class _Coordinate:
    """The monotone search coordinate s (λ, or −t where λ is infinite at an end) between the levels hi > lo.

    A grid's levels between hi and lo are s-increments; ``logits`` ↔ ``levels`` maps them through a softmax,
    so every logit vector gives a strictly increasing s (decreasing t) from s(hi) to s(lo).  With
    ``free_start`` the first increment is the skipped stretch before the grid's first level (which is then
    not ``hi``); it is kept at least ``SKIP_FLOOR`` of a mean step so that the search can grow it.
    """

    SKIP_FLOOR = 0.02

    def __init__(self, schedule, hi: float, lo: float, free_start: bool = False):
        self.schedule, self.free_start = schedule, free_start
        lam = [float(schedule.log_snr(torch.tensor(v, dtype=torch.float64))) for v in (hi, lo)]
        self.use_lam = all(math.isfinite(v) for v in lam)
        self.name = "log-SNR λ" if self.use_lam else "t"
        self.hi, self.lo = hi, lo
        self.s0, self.s1 = (lam[0], lam[1]) if self.use_lam else (-hi, -lo)

    def s(self, ts) -> torch.Tensor:
        t = torch.as_tensor(ts, dtype=torch.float64)
        return self.schedule.log_snr(t) if self.use_lam else -t

    def t(self, s: torch.Tensor) -> list:
        ts = self.schedule.t_from_log_snr(s) if self.use_lam else -s
        return [float(v) for v in torch.as_tensor(ts, dtype=torch.float64).reshape(-1)]

    def levels(self, logits: torch.Tensor) -> list:
        """The grid levels hi, …, lo (len(logits) + 1 of them) whose s-increments are softmax(logits)."""
        frac = torch.cumsum(torch.softmax(logits, 0), 0)[:-1]
        inner = self.t(self.s0 + (self.s1 - self.s0) * frac) if frac.numel() else []
        return ([] if self.free_start else [self.hi]) + inner + [self.lo]

    def logits(self, levels: list) -> torch.Tensor:
        """The logits (log of the s-increments) of a grid's levels from hi (or, free, from before) to lo."""
        s = self.s(levels)
        if not self.free_start:
            s[0] = self.s0
        s[-1] = self.s1
        if self.free_start:
            s = torch.cat([torch.tensor([self.s0], dtype=torch.float64), s])
        inc = torch.diff(s).clamp_min(1e-12 * abs(self.s1 - self.s0))
        if self.free_start:
            inc[0] = inc[0].clamp_min(self.SKIP_FLOOR * abs(self.s1 - self.s0) / (len(inc) - 1))
        return torch.log(inc)

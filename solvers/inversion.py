"""Inversion: run the probability-flow ODE from data to noise (DDIM inversion and its higher-order kin).

DDIM inversion (Song et al. 2021, §5.4 "encoding"; Dhariwal & Nichol 2021, App. F) is the DDIM/Euler step
taken on an *increasing* grid: from x at t the step to t' > t is

    x' = α'·D(x, t) + σ'·ε̂(x, t),

the same update as sampling with the roles of the two points swapped.  Every deterministic fixed-grid
solver here computes its coefficients from the two (or more) points of a step, whatever their order, so
:func:`invert` simply runs the solver's own ``step`` over the reversed grid — Euler/DDIM, Heun, DPM-Solver++,
UniPC, DEIS, iPNDM all invert with their own order.  Stochastic solvers (no deterministic inverse) and the
adaptive solver (which integrates towards increasing λ only) are refused.

The model cannot be evaluated at σ = 0, so inversion starts at a small noise level ``t_from`` (default
the schedule's ``default_t_end``) and takes ``x0`` as the state there — the same approximation, O(σ(t_from)),
that sampling makes when it stops at ``t_end`` without the final denoising step.  Sampling back with the
reversed grid (``solvers.sample(model, res.samples, solver, timesteps=res.timesteps[::-1])``) returns
``x0`` up to the two solvers' discretisation errors.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .base import StepContext, points_at
from .grids import make_grid, validate_grid
from .loop import SampleResult, StepInfo, check_call, check_callback
from .model import DiffusionModel
from .registry import get_solver

__all__ = ["invert"]


def invert(model: DiffusionModel, x0: torch.Tensor, solver: str = "ddim", steps: Optional[int] = 10, *,
           timesteps: Optional[Sequence[float]] = None, spacing: str = "logsnr", t_from: Optional[float] = None,
           t_to: Optional[float] = None, dtype: Union[None, torch.dtype, str] = None,
           callback: Optional[Callable[[StepInfo], Any]] = None, **solver_options) -> SampleResult:
    """Integrate the probability-flow ODE from ``x0`` at a low noise level up to ``t_to`` (noise).

    Args:
        model: the :class:`~solvers.DiffusionModel`.
        x0: the data (or any state at ``t_from``), (batch, …): a real floating tensor.
        solver: a deterministic fixed-grid solver (``"ddim"`` with ``eta=0``, ``"euler"``, ``"heun"`` without
            churn, ``"dpmpp_2m"``, ``"unipc"``, ``"deis"``, ``"ipndm"``, …).
        steps: number of steps (ignored with ``timesteps``, except that it must agree if given).
        timesteps: an explicit strictly *increasing* grid of solver times; ``timesteps[0]`` must be a time
            the model can be evaluated at (σ > 0).
        spacing: spacing of the generated grid (see :func:`solvers.grids.make_grid`; the grid is the
            sampling grid from ``t_to`` to ``t_from`` without the step to σ = 0, reversed).
        t_from, t_to: the ends (defaults: ``schedule.default_t_end`` and ``schedule.t_max``).
        dtype: dtype of the state: a real floating ``torch.dtype`` or its name (e.g. ``"float64"``).
        callback: called with a :class:`~solvers.StepInfo` after every step.
        **solver_options: options of the solver.

    Returns:
        A :class:`~solvers.SampleResult` whose ``samples`` are the states at ``timesteps[-1]`` (the noise) and
        whose ``timesteps`` is the increasing grid used.

    Raises:
        ValueError: a stochastic or adaptive solver, a grid that is not increasing or starts at σ = 0, bad steps.
        TypeError: an x0 or dtype that is not real floating; a callback that is not callable.
    """
    dtype = check_call(model, x0, "x0", dtype, steps)
    check_callback(callback)
    slv = _deterministic_solver(solver, solver_options)
    grid = _increasing_grid(model.schedule, timesteps, steps, spacing, t_from, t_to)
    points = points_at(model.schedule, model, grid)
    if points[0].conv is None:
        raise ValueError(f"inversion starts where the model can be evaluated (σ > 0); t={grid[0]} is not such a "
                         f"time ({points[0].conv_error}). x0 is taken as the state at the first grid time.")
    slv.check(points)
    x = x0 if dtype is None else x0.to(dtype)
    ctx = StepContext(model, points, None, None, batch=x0.shape[0])
    t0 = time.perf_counter()
    x, orders = _run_steps(slv, ctx, x, grid, callback)
    total = time.perf_counter() - t0
    return SampleResult(samples=x, nfe=ctx.nfe, model_rows=ctx.model_rows, timesteps=grid, orders=orders,
                        solver=slv.name, options=slv.options(), spacing=spacing if timesteps is None else None,
                        denoise_to_zero=None, time_total=total, time_model=float("nan"),
                        time_solver=float("nan"), seeds=[], nfe_per_sample=ctx.nfe_per_sample())


def _deterministic_solver(solver: str, solver_options: dict):
    """The named solver with its options; stochastic and adaptive solvers, which have no inverse, raise."""
    slv = get_solver(solver, **solver_options)
    if slv.is_stochastic or slv.adaptive:
        raise ValueError(f"invert needs a deterministic fixed-grid solver; {slv.name!r} with "
                         f"{slv.options()} is {'adaptive' if slv.adaptive else 'stochastic'} (e.g. use 'ddim' "
                         "with eta=0, 'euler', 'heun' without churn, 'dpmpp_2m', 'unipc', 'deis', 'ipndm')")
    return slv


def _increasing_grid(schedule, timesteps, steps: Optional[int], spacing: str, t_from: Optional[float],
                     t_to: Optional[float]) -> list:
    """The increasing grid (data → noise) of an :func:`invert` call, as a list of floats.

    An explicit ``timesteps`` must be strictly increasing and, reversed, a valid sampling grid; ``steps``, if
    also given, must agree with it.  Otherwise the sampling grid from ``t_to`` to ``t_from`` (no step to σ = 0)
    is built and reversed.
    """
    if timesteps is None:
        if steps is None:
            raise ValueError("give steps (a positive integer) or an explicit timesteps grid")
        return make_grid(schedule, steps, spacing=spacing, t_start=t_to, t_end=t_from, denoise_to_zero=False)[::-1]
    try:
        grid = [float(v) for v in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
    except (TypeError, ValueError):
        raise ValueError("timesteps must be a 1-D sequence of numbers") from None
    if len(grid) >= 2 and not all(b > a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"invert needs a strictly increasing grid (data → noise), got {grid}")
    validate_grid(schedule, grid[::-1])
    if steps is not None and steps != len(grid) - 1:
        raise ValueError(f"steps={steps} disagrees with the {len(grid) - 1} steps of the given timesteps; "
                         "pass steps=None or the matching count")
    return grid


def _run_steps(slv, ctx: StepContext, x: torch.Tensor, grid: list, callback) -> tuple[torch.Tensor, list]:
    """The solver's own steps over the increasing grid; returns (final state, order used on each step)."""
    state = slv.init_state(ctx)
    orders = []
    with torch.no_grad():
        for i in range(ctx.steps):
            # The solver's own step, from the lower noise level to the higher one.
            x, state, order = slv.step(ctx, i, x, state)
            orders.append(order)
            if callback is not None:
                callback(StepInfo(step=i, t=grid[i], t_next=grid[i + 1], x=x, order=order, nfe=ctx.nfe))
    return x, orders

"""Time grids: decreasing lists of solver times, from noise to data, computed once on the host.

A grid for ``steps`` solver steps has ``steps + 1`` points.  With ``denoise_to_zero=True`` (the default,
the convention of DDIM, DDPM, EDM and k-diffusion) the spacing places ``steps`` noise levels between
``t_start`` and ``t_end`` and the grid ends with the schedule's ``t_zero`` (σ = 0): the last step lands on
the data, and the model is never evaluated there.  With ``denoise_to_zero=False`` (the convention of the
DPM-Solver code) the spacing places all ``steps + 1`` points between ``t_start`` and ``t_end``.

Spacings:

* ``uniform``   — uniform in t.  With ``denoise_to_zero`` and no explicit ``t_end`` the levels are
  ``linspace(t_start, t_zero, steps + 1)[:-1]``: uniform *including* the final point (flow matching's grid).
* ``logsnr``    — uniform in λ = log(α/σ) (DPM-Solver's recommendation).
* ``karras``    — σ/α spaced as (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, ρ = 7 (EDM eq. 5).
* ``quadratic`` — t_end + (t_start − t_end)·(i/(n−1))², dense near the data.  On a :class:`DiscreteVP` it
  is the DDIM code's CIFAR-10 grid exactly: ``int((linspace(0, sqrt(0.8·N), n))²)``.
* ``leading`` / ``trailing`` / ``linspace`` — diffusers' integer spacings on a :class:`DiscreteVP`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from .schedules import DiscreteVP, Schedule
from .validation import check_real

# A generous bound: the finest grids in use have ~2,000 steps (a DiscreteVP has 1,000 trained times).  Far
# above it the per-point coefficients alone take seconds and gigabytes before the first step (10⁷ steps: a
# MemoryError after 14 s), so a larger count is refused up front.
MAX_STEPS = 100_000

SPACINGS = ("uniform", "logsnr", "karras", "quadratic", "leading", "trailing", "linspace")
DISCRETE_SPACINGS = ("leading", "trailing", "linspace")

__all__ = ["SPACINGS", "MAX_STEPS", "check_steps", "make_grid", "validate_grid"]


def check_steps(steps) -> int:
    """``steps`` as an int if it is a positive integer (not a bool) of at most :data:`MAX_STEPS`.

    Raises:
        ValueError: saying what was given and what is accepted.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > MAX_STEPS:
        raise ValueError(f"steps={steps} is above the limit of {MAX_STEPS:,} steps (a sanity bound: the finest "
                         "grids in use have ~2,000); give fewer steps")
    return int(steps)


def _levels(schedule: Schedule, spacing: str, n: int, t_start: float, t_end: float, rho: float) -> list[float]:
    """``n`` decreasing levels from t_start to t_end (inclusive) under a continuous spacing."""
    if n == 1:
        return [t_start]
    u = np.linspace(0.0, 1.0, n)
    if spacing == "uniform":
        return list(t_start + (t_end - t_start) * u)
    if spacing == "quadratic":
        return list(t_end + (t_start - t_end) * (1.0 - u) ** 2)
    if spacing == "logsnr":
        lam0, lam1 = float(schedule.log_snr(t_start)), float(schedule.log_snr(t_end))
        lams = torch.tensor(lam0 + (lam1 - lam0) * u, dtype=torch.float64)
        ts = schedule.t_from_log_snr(lams).tolist()
    elif spacing == "karras":
        s_max, s_min = float(schedule.sigma_ve(t_start)), float(schedule.sigma_ve(t_end))
        if not math.isfinite(s_max):
            raise ValueError(f"karras spacing needs a finite σ/α at t_start={t_start} "
                             f"({type(schedule).__name__}); start lower")
        sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        ts = schedule.t_from_sigma_ve(torch.tensor(sig, dtype=torch.float64)).tolist()
    else:  # pragma: no cover - guarded by the caller
        raise AssertionError(spacing)
    # The inverse maps are exact up to rounding: pin the ends so that they are exactly the ones asked for.
    ts[0], ts[-1] = t_start, t_end
    return ts


def _discrete_levels(schedule: DiscreteVP, spacing: str, n: int, steps_offset: int) -> list[float]:
    big_n = schedule.num_train_timesteps
    if n > big_n:
        raise ValueError(f"spacing {spacing!r} cannot place {n} levels on {big_n} trained timesteps")
    if spacing == "leading":
        ratio = big_n // n
        ts = (np.arange(0, n) * ratio).round()[::-1] + steps_offset
    elif spacing == "trailing":
        ratio = big_n / n
        ts = np.round(np.arange(big_n, 0, -ratio)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, big_n - 1, n).round()[::-1]
    elif spacing == "quadratic":
        ts = (np.linspace(0, np.sqrt(big_n * 0.8), n) ** 2).astype(np.int64)[::-1]
    else:  # pragma: no cover
        raise AssertionError(spacing)
    return [float(v) for v in ts]


def make_grid(schedule: Schedule, steps: int, *, spacing: str = "logsnr", t_start: Optional[float] = None,
              t_end: Optional[float] = None, denoise_to_zero: bool = True, rho: float = 7.0,
              steps_offset: int = 0) -> list[float]:
    """Build a decreasing grid of ``steps + 1`` solver times (see the module docstring).

    Args:
        schedule: the model's schedule.
        steps: number of solver steps (1 … :data:`MAX_STEPS`).
        spacing: one of :data:`SPACINGS`.
        t_start, t_end: the first and last noise level (defaults: ``schedule.t_max`` and
            ``schedule.default_t_end``).  Not accepted by the discrete spacings, which fix their points.
        denoise_to_zero: end with a step to σ = 0 (``schedule.t_zero``).
        rho: ρ of the Karras spacing.
        steps_offset: diffusers' ``steps_offset`` for the ``leading`` spacing.

    Raises:
        ValueError: bad steps, unknown spacing, a spacing that does not fit the schedule, or a range that
            leaves the schedule's.
        TypeError: a ``denoise_to_zero`` that is not a bool (a string such as ``"no"`` would read as True).
    """
    steps = check_steps(steps)
    if not isinstance(denoise_to_zero, (bool, np.bool_)):
        raise TypeError(f"denoise_to_zero must be True or False, got {denoise_to_zero!r}")
    denoise_to_zero = bool(denoise_to_zero)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    check_real("make_grid", "rho", rho, low=0.0, low_open=True)
    n = int(steps) if denoise_to_zero else int(steps) + 1
    discrete = isinstance(schedule, DiscreteVP)
    if spacing in DISCRETE_SPACINGS and not discrete:
        raise ValueError(f"spacing {spacing!r} is defined on a DiscreteVP schedule only, not on "
                         f"{type(schedule).__name__}; use one of uniform, logsnr, karras, quadratic")
    if discrete and spacing in DISCRETE_SPACINGS + ("quadratic",) and (t_start is not None or t_end is not None):
        raise ValueError(f"spacing {spacing!r} on a DiscreteVP fixes its own points; "
                         "t_start/t_end cannot be set with it (use 'uniform', 'logsnr' or 'karras')")
    if discrete and spacing in DISCRETE_SPACINGS + ("quadratic",):
        levels = _discrete_levels(schedule, spacing, n, steps_offset)
    else:
        start = schedule.t_max if t_start is None else float(t_start)
        if spacing == "uniform" and denoise_to_zero and t_end is None:
            levels = list(np.linspace(start, schedule.t_zero, n + 1)[:-1])
        else:
            end = schedule.default_t_end if t_end is None else float(t_end)
            if not end < start and n > 1:
                raise ValueError(f"t_end={end} must be below t_start={start}")
            _check_range_ends(schedule, spacing, start, end, denoise_to_zero)
            levels = _levels(schedule, spacing, n, start, end, rho)
    grid = [float(v) for v in levels] + ([float(schedule.t_zero)] if denoise_to_zero else [])
    validate_grid(schedule, grid)
    return grid


def _check_range_ends(schedule: Schedule, spacing: str, start: float, end: float, denoise_to_zero: bool) -> None:
    """The ends of a continuous spacing's range must be levels it can place (before any grid is computed)."""
    name, t_zero = type(schedule).__name__, float(schedule.t_zero)
    if spacing == "logsnr":
        lam_start, lam_end = (float(schedule.log_snr(torch.tensor(v, dtype=torch.float64))) for v in (start, end))
        if not math.isfinite(lam_end):
            raise ValueError(f"t_end must be > t_zero = {t_zero} for log-SNR spacing: λ = log(α/σ) is {lam_end} at "
                             f"t_end={end} on {name}. To end at the data use denoise_to_zero=True with "
                             f"t_end > t_zero (default {schedule.default_t_end}), which adds the step to σ = 0")
        if not math.isfinite(lam_start):
            raise ValueError(f"spacing 'logsnr' needs a finite log-SNR λ = log(α/σ) at t_start, but it is "
                             f"{lam_start} at t_start={start} on {name} (α = 0 there): start just below it "
                             f"(e.g. t_start={start * (1 - 1e-3):.6g}) or use spacing='uniform'")
    if denoise_to_zero and end <= t_zero:
        raise ValueError(f"t_end={end} is not above t_zero={t_zero} (σ = 0) of {name}, but denoise_to_zero=True "
                         f"already adds the final step to t_zero after t_end: give t_end > t_zero (default "
                         f"{schedule.default_t_end}), or denoise_to_zero=False to end the spacing itself at t_zero")


def validate_grid(schedule: Schedule, timesteps: Sequence[float]) -> list[float]:
    """Check an explicit grid: at least two points, finite, strictly decreasing, inside the schedule.

    Every point but the last is a time the network is evaluated at, so it must lie in
    [``t_min``, ``t_max``]; the last may be anywhere down to ``t_zero``.

    Returns:
        The grid as a list of floats.
    """
    try:
        ts = [float(v) for v in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
    except (TypeError, ValueError):
        raise ValueError("timesteps must be a 1-D sequence of numbers") from None
    if len(ts) < 2:
        raise ValueError(f"timesteps needs at least 2 points (one step), got {len(ts)}")
    if not all(math.isfinite(v) for v in ts):
        raise ValueError(f"timesteps must be finite, got {ts}")
    bad = [i for i in range(len(ts) - 1) if not ts[i + 1] < ts[i]]
    if bad:
        i = bad[0]
        raise ValueError(f"timesteps must be strictly decreasing (noise → data): point {i + 1} "
                         f"({ts[i + 1]}) is not below point {i} ({ts[i]})")
    lo, hi = schedule.t_min, schedule.t_max
    for i, v in enumerate(ts[:-1]):
        if not lo <= v <= hi * (1 + 1e-12):
            raise ValueError(f"timesteps[{i}] = {v} is outside the range [{lo}, {hi}] where "
                             f"{type(schedule).__name__} can be evaluated")
    if ts[-1] < schedule.t_zero:
        raise ValueError(f"the last time {ts[-1]} is below t_zero = {schedule.t_zero} (σ = 0) of "
                         f"{type(schedule).__name__}")
    return ts

"""What every solver stands on: host-side coefficients of a time point, the step context, the base class.

A solver is a small immutable object (a dataclass of its options) with

* ``name``, ``order``, ``stochastic`` and ``reference`` as class attributes;
* ``nfe(grid)`` — the exact number of model calls it makes on a grid;
* ``init_state()`` and ``step(ctx, i, x, state) -> (x_next, state, order_used)``: one step from grid point
  i to i + 1.  History lives in ``state``, never on the solver.

The sampling loop (:mod:`solvers.loop`) owns everything else: the grid, its coefficients (computed once on
the host, so a step never synchronises with the device), model calls and their count, noise, timing.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional, Sequence, Union

import torch

from .model import DiffusionModel
from .noise import SeedStreams
from .schedules import Schedule

__all__ = ["Point", "points_at", "StepContext", "Solver", "LowerOrderFinal", "multistep_order"]

LowerOrderFinal = Union[bool, Literal["auto"]]


@dataclass(frozen=True)
class Point:
    """Host-side (float64) quantities at one solver time t."""

    t: float
    alpha: float
    sigma: float
    lam: float          # log-SNR λ = log(α/σ); +inf at σ = 0
    sigma_ve: float     # σ/α
    zero: bool          # σ = 0: the data; the model is never evaluated here
    model_time: float
    conv: Optional[tuple]  # (a, b): x0 = a·x + b·net(x); None where the model cannot be evaluated
    conv_error: Optional[str]
    drift: float        # f(t) of the forward SDE
    g2: float           # g²(t) of the forward SDE
    ode_scale: float    # s(t): the ODE state is y = x / s
    ode_time: float     # ρ(t): the ODE's independent variable
    ode_p: float        # dy/dρ = p·x + q·D(x, t)
    ode_q: float


def points_at(schedule: Schedule, model: Optional[DiffusionModel], ts: Sequence[float]) -> list[Point]:
    """Coefficients at the times ``ts``, computed in one vectorised float64 pass."""
    t = torch.tensor([float(v) for v in ts], dtype=torch.float64)
    with torch.no_grad():
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        da, ds = schedule.d_alpha(t), schedule.d_sigma(t)
        lam = schedule.log_snr(t)
        model_time = schedule.model_time(t)
    out = []
    for i, tv in enumerate(t.tolist()):
        a, s, dai, dsi = float(alpha[i]), float(sigma[i]), float(da[i]), float(ds[i])
        zero = s == 0.0
        conv, conv_error = None, None
        if model is not None and not zero:
            try:
                conv = model.conversion(tv)
            except ValueError as e:
                conv_error = str(e)
        if zero:
            conv_error = f"t={tv} is the data (σ = 0): the model is not evaluated there"
        with torch.no_grad():
            drift = dai / a if a != 0 else math.inf
            g2 = 2.0 * s * dsi - 2.0 * drift * s * s if a != 0 else math.inf
        if schedule.ode_form == "ve":
            ode_scale, ode_time = a, (s / a if a != 0 else math.inf)
            ode_p = 1.0 / s if s != 0 else math.inf
            ode_q = -a / s if s != 0 else -math.inf
        else:
            ode_scale, ode_time = 1.0, tv
            ode_p = dsi / s if s != 0 else math.inf
            ode_q = dai - dsi * a / s if s != 0 else -math.inf
        out.append(Point(t=tv, alpha=a, sigma=s, lam=float(lam[i]), sigma_ve=(s / a if a != 0 else math.inf),
                         zero=zero, model_time=float(model_time[i]), conv=conv, conv_error=conv_error,
                         drift=drift, g2=g2, ode_scale=ode_scale, ode_time=ode_time, ode_p=ode_p, ode_q=ode_q))
    return out


class StepContext:
    """What a solver step may use: the grid's points, the counted model, per-sample noise.

    Attributes:
        points: :class:`Point` for each grid time; ``points[i]`` → ``points[i + 1]`` is step i.
        steps: number of steps (``len(points) - 1``).
        nfe: model calls so far; ``model_rows``: network batch rows so far.
    """

    def __init__(self, model: DiffusionModel, points: list[Point], noise: Optional[SeedStreams],
                 timer=None):
        self.model = model
        self.schedule = model.schedule
        self.points = points
        self.steps = len(points) - 1
        self.nfe = 0
        self.model_rows = 0
        self._noise = noise
        self._timer = timer

    def denoise(self, x: torch.Tensor, p: Point) -> torch.Tensor:
        """D(x, t) at point p: one counted model call."""
        if p.conv is None:
            raise ValueError(f"cannot evaluate the model at t={p.t}: {p.conv_error}")
        self.nfe += 1
        self.model_rows += x.shape[0] * self.model.rows_per_sample
        if self._timer is not None:
            self._timer.start()
        d = self.model.denoise(x, p.t, coeffs=p.conv, model_time=p.model_time)
        if self._timer is not None:
            self._timer.stop()
        return d

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """Per-sample standard normal noise shaped like ``like`` (from the solver stream of each seed)."""
        if self._noise is None:
            raise RuntimeError("this solver draws noise but the loop gave it no seed streams")
        return self._noise.randn(like.shape[1:], dtype=like.dtype, device=like.device)

    def point(self, t: float) -> Point:
        """Coefficients at an off-grid time (intermediate stages, churned points)."""
        return points_at(self.schedule, self.model, [t])[0]

    def point_list(self, ts: Sequence[float]) -> list[Point]:
        """Coefficients at several off-grid times, in one vectorised pass."""
        return points_at(self.schedule, self.model, ts)


def multistep_order(i: int, steps: int, max_order: int, lower_order_final: bool, to_zero: bool) -> int:
    """The order a multistep method uses on step i (0-based) of ``steps``.

    Warm-up: step i has at most i + 1 past model outputs.  With ``lower_order_final`` the order also drops
    to the number of steps left (the rule of the DPM-Solver code and diffusers).  A step to σ = 0 is
    always first order: there λ = +inf and the higher-order corrections vanish or are undefined.
    """
    if to_zero:
        return 1
    order = min(max_order, i + 1)
    if lower_order_final:
        order = min(order, steps - i)
    return max(order, 1)


def resolve_lower_order_final(value: LowerOrderFinal, steps: int) -> bool:
    """``"auto"`` → True below 15 steps (diffusers' threshold); booleans pass through."""
    if value == "auto":
        return steps < 15
    if isinstance(value, bool):
        return value
    raise ValueError(f"lower_order_final must be True, False or 'auto', got {value!r}")


@dataclass(frozen=True)
class Solver:
    """Base of all solvers.  Subclasses are frozen dataclasses whose fields are their options."""

    name: ClassVar[str] = "solver"
    order: ClassVar[Optional[int]] = None
    stochastic: ClassVar[bool] = False
    reference: ClassVar[str] = ""
    evals_per_step: ClassVar[int] = 1

    @property
    def is_stochastic(self) -> bool:
        """Whether this configured solver draws noise (e.g. DDIM only when η > 0)."""
        return self.stochastic

    def options(self) -> dict:
        """The solver's options as a plain dict (recorded with every result)."""
        return dataclasses.asdict(self)

    def nfe(self, grid: Sequence[float], t_zero: float) -> int:
        """Model calls on ``grid``: ``evals_per_step`` per step, one on a final step to σ = 0."""
        steps = len(grid) - 1
        ends_at_zero = grid[-1] == t_zero
        return steps * self.evals_per_step - (self.evals_per_step - 1 if ends_at_zero else 0)

    def check(self, points: list[Point]) -> None:
        """Raise ValueError if this solver cannot integrate over these points (called before sampling)."""
        for p in points[:-1]:
            if p.conv is None:
                raise ValueError(f"{self.name}: cannot evaluate the model at t={p.t}: {p.conv_error}")

    def init_state(self, ctx: "StepContext") -> Any:
        """The solver's state before step 0 (history buffers, precomputed stage times)."""
        return None

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any, int]:
        raise NotImplementedError

"""What every solver stands on: host-side coefficients of a time point, the step context, the base class.

A solver is a small immutable object (a dataclass of its options) with

* ``name``, ``order``, ``stochastic`` and ``reference`` as class attributes;
* ``nfe(grid)`` — the exact number of model calls it makes on a grid (``None`` for the solvers that choose
  their steps at run time, which declare ``adaptive = True``);
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

__all__ = ["Point", "points_at", "StepContext", "Solver", "LogSNRSolver", "LowerOrderFinal", "multistep_order",
           "check_lower_order_final", "resolve_lower_order_final"]

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


def _conversions(model: Optional[DiffusionModel], t: torch.Tensor, zero: list[bool]
                 ) -> tuple[list, list]:
    """The x0 conversion (a, b) at each time — one vectorised call — and, where it is singular, why.

    Falls back to one call per point only when some point is singular, to say which one.
    """
    n = len(zero)
    conv: list = [None] * n
    errors: list = [None] * n
    live = [i for i in range(n) if not zero[i]]
    if model is None or not live:
        return conv, errors
    if hasattr(model, "conversion_at"):
        try:
            a, b = model.conversion_at(t[live])
        except ValueError:
            pass
        else:
            for i, ai, bi in zip(live, a.tolist(), b.tolist()):
                conv[i] = (ai, bi)
            return conv, errors
    for i in live:
        try:
            conv[i] = model.conversion(float(t[i]))
        except ValueError as e:
            errors[i] = str(e)
    return conv, errors


def points_at(schedule: Schedule, model: Optional[DiffusionModel], ts: Sequence[float]) -> list[Point]:
    """Coefficients at the times ``ts``, computed in one vectorised float64 pass.

    The schedule and the model's conversion are evaluated once on the whole grid; the loop below is plain
    Python floats (per-point tensor work cost ~90 µs a point, more than a sampling step of a small model).
    """
    t = torch.tensor([float(v) for v in ts], dtype=torch.float64)
    with torch.no_grad():
        columns = [schedule.alpha(t), schedule.sigma(t), schedule.d_alpha(t), schedule.d_sigma(t),
                   schedule.log_snr(t), schedule.model_time(t)]
    ts_f = t.tolist()
    alpha, sigma, da, ds, lam, model_time = (torch.broadcast_to(c, t.shape).tolist() for c in columns)
    zeros = [s == 0.0 for s in sigma]
    convs, conv_errors = _conversions(model, t, zeros)
    out = []
    for i, tv in enumerate(ts_f):
        a, s, dai, dsi = alpha[i], sigma[i], da[i], ds[i]
        zero = zeros[i]
        conv, conv_error = convs[i], conv_errors[i]
        if zero:
            conv_error = f"t={tv} is the data (σ = 0): the model is not evaluated there"
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
        out.append(Point(t=tv, alpha=a, sigma=s, lam=lam[i], sigma_ve=(s / a if a != 0 else math.inf),
                         zero=zero, model_time=model_time[i], conv=conv, conv_error=conv_error,
                         drift=drift, g2=g2, ode_scale=ode_scale, ode_time=ode_time, ode_p=ode_p, ode_q=ode_q))
    return out


TIME_TABLE_MAX = 1 << 22       # entries (points × batch) of a grid's network-time table; larger → fill per call
TIME_TABLES_PER_GRID = 4       # (device, dtype, batch) tables kept with one cached grid


class StepContext:
    """What a solver step may use: the grid's points, the counted model, per-sample noise.

    Attributes:
        points: :class:`Point` for each grid time; ``points[i]`` → ``points[i + 1]`` is step i.
        steps: number of steps (``len(points) - 1``).
        nfe: model calls so far; ``model_rows``: network batch rows so far.
    """

    def __init__(self, model: DiffusionModel, points: list[Point], noise: Optional[SeedStreams],
                 timer=None, batch: Optional[int] = None, time_tables: Optional[dict] = None):
        self.model = model
        self.schedule = model.schedule
        self.points = points
        self.steps = len(points) - 1
        self.nfe = 0
        self.model_rows = 0
        self.batch = batch
        self._noise = noise
        self._timer = timer
        self._whole_batch_calls = 0
        self._row_calls: Optional[torch.Tensor] = None  # per-sample calls made through denoise_at
        self._point_index = {id(q): i for i, q in enumerate(points)}
        self._tables = {} if time_tables is None else time_tables

    def _model_time(self, x: torch.Tensor, p: Point):
        """The network time input at point p.

        For a grid point: row i of a (points, batch) table of the grid's network times, made once per grid,
        device, dtype and batch size (kept with the cached grid), so a model call launches no fill kernel and
        the sampling loop makes no host→device copy.  Each row is an ordinary contiguous (batch,) tensor
        (networks must not modify their inputs in place: a row is reused by the next call on the same grid).
        For an off-grid point, or a table over ``TIME_TABLE_MAX`` entries, the host float (filled per call).
        """
        i = self._point_index.get(id(p))
        batch = x.shape[0]
        if i is None or self.points[i] is not p or len(self.points) * batch > TIME_TABLE_MAX:
            return p.model_time
        t_dtype = self.model.time_dtype(x)
        key = (x.device, t_dtype, batch)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= TIME_TABLES_PER_GRID:
                self._tables.clear()
            times = torch.tensor([q.model_time for q in self.points], dtype=t_dtype)
            table = self._tables[key] = times.unsqueeze(1).expand(-1, batch).contiguous().to(x.device)
        return table[i]

    def denoise(self, x: torch.Tensor, p: Point) -> torch.Tensor:
        """D(x, t) at point p for the whole batch: one counted model call."""
        return self._whole_batch_call(x, p, lambda: self.model.denoise(x, p.t, coeffs=p.conv,
                                                                        model_time=self._model_time(x, p)))

    def denoise_combine(self, x: torch.Tensor, p: Point, c_x: float, c_d: float) -> torch.Tensor:
        """c_x·x + c_d·D(x, t) at point p: one counted model call, fused with the update
        (:meth:`DiffusionModel.denoise_combine`; its time counts as model time)."""
        return self._whole_batch_call(x, p, lambda: self.model.denoise_combine(
            x, p.t, c_x, c_d, coeffs=p.conv, model_time=self._model_time(x, p)))

    def _whole_batch_call(self, x: torch.Tensor, p: Point, call):
        if p.conv is None:
            raise ValueError(f"cannot evaluate the model at t={p.t}: {p.conv_error}")
        self.nfe += 1
        self._whole_batch_calls += 1
        self.model_rows += x.shape[0] * self.model.rows_per_sample
        if self._timer is not None:
            self._timer.start()
        d = call()
        if self._timer is not None:
            self._timer.stop()
        return d

    def denoise_at(self, x: torch.Tensor, t: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """D(x, t) with one solver time per row of ``x`` (adaptive solvers): one counted, batched model call.

        Args:
            x: the states, (n, …); n may be a subset of the batch.
            t: float64 tensor (n,) of solver times, one per row.
            rows: the batch indices of x's rows (default: all rows, n = batch); each is credited one model
                call in :meth:`nfe_per_sample`.
        """
        self.nfe += 1
        self.model_rows += x.shape[0] * self.model.rows_per_sample
        if self._row_calls is None:
            self._row_calls = torch.zeros(self.batch if self.batch is not None else x.shape[0], dtype=torch.long)
        if rows is None:
            self._row_calls += 1
        else:
            self._row_calls[rows.cpu()] += 1
        if self._timer is not None:
            self._timer.start()
        d = self.model.denoise_at(x, t)
        if self._timer is not None:
            self._timer.stop()
        return d

    def nfe_per_sample(self) -> Optional[list[int]]:
        """Model calls each sample took part in (``None`` when the batch size is unknown to the context)."""
        n = self.batch if self.batch is not None else (None if self._row_calls is None else len(self._row_calls))
        if n is None:
            return None
        calls = torch.full((n,), self._whole_batch_calls, dtype=torch.long)
        if self._row_calls is not None:
            calls += self._row_calls
        return calls.tolist()

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


def check_lower_order_final(name: str, value) -> None:
    """Refuse a ``lower_order_final`` option other than True, False or ``"auto"`` (``name``: the solver's)."""
    if value != "auto" and not isinstance(value, bool):
        raise ValueError(f"{name}: lower_order_final must be True, False or 'auto', got {value!r}")


def resolve_lower_order_final(value: LowerOrderFinal, steps: int, below: int = 15) -> bool:
    """``"auto"`` → True below ``below`` steps (default 15, diffusers' threshold; a solver may measure its own);
    booleans pass through."""
    if value == "auto":
        return steps < below
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
    adaptive: ClassVar[bool] = False  # step sizes chosen at run time: nfe() cannot be declared (returns None)
    # Whether the solver can be the predictor of a predictor-corrector sampler (pc): a fixed-grid step from one
    # level to the next.  Correctors, samplers built of other solvers and adaptive ones cannot.
    can_predict: ClassVar[bool] = True
    # The time grid of the solver's own paper (a :data:`solvers.grids.SPACINGS` name) and why; a discrete
    # spacing (``trailing``) means "uniform in t" on continuous schedules.  ``paper_spacing_by_data`` maps a
    # data set (a model card's ``reference``) to the (spacing, why) its paper used there on a discrete
    # schedule, e.g. DDIM's quadratic grid on CIFAR-10.
    default_spacing: ClassVar[str] = "logsnr"
    default_spacing_note: ClassVar[str] = "library default"
    paper_spacing_by_data: ClassVar[dict] = {}
    # Steps in log-SNR λ: needs λ finite at every evaluated time, so a grid cannot start where α = 0.
    steps_in_log_snr: ClassVar[bool] = False

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


@dataclass(frozen=True)
class LogSNRSolver(Solver):
    """Base of the solvers that step in λ, which must be finite wherever the model is evaluated; their paper
    grid is uniform in λ."""

    steps_in_log_snr: ClassVar[bool] = True
    default_spacing: ClassVar[str] = "logsnr"

    def check(self, points):
        super().check(points)
        for p in points[:-1]:
            if not math.isfinite(p.lam):
                raise ValueError(f"{self.name} steps in log-SNR λ, which is infinite at t={p.t} (α = 0 there); "
                                 f"start the grid just below it (e.g. t_start={p.t * (1 - 1e-3):.6g}) or use "
                                 "euler/heun, which integrate in t")

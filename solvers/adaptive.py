"""An error-controlled solver of the probability-flow ODE with a step size per sample.

The ODE is integrated in a variable u that increases from noise to data, with state y:

* diffusion schedules (``ode_form="ve"``), and every schedule under the ``dpm23`` pair: u = λ = log(α/σ) =
  −log(σ/α), y = x̃ = x/α:  dy/du = D − y; in λ the step sizes stay within a decade or two from σ_max to
  σ_min (in σ they span four).
* rectified flow (``ode_form="native"``) under the Runge–Kutta pairs: u = −t, y = x:
  dy/du = −(p(t)·x + q(t)·D)  (see ``Point``).

An embedded explicit Runge–Kutta pair (Bogacki–Shampine 3(2) or Dormand–Prince 5(4); both FSAL) or the
exponential-integrator pair DPM-Solver-2(3) in λ (``dpm23``, the default where λ is finite at the start; see
:class:`Adaptive`) gives a step and an error estimate; a PI controller (Gustafsson; Hairer & Wanner II, §IV.2) picks the
next step from the last two error norms.  Everything that decides a step — its size, the error norm, the
acceptance — is computed per sample, and every sample sits at its own time u; the network is called once
per stage on the not-yet-finished samples with one time per row (``StepContext.denoise_at``).  So a sample's
trajectory never depends on its batch-mates (unlike k-diffusion's and the DPM-Solver code's adaptive
samplers, which pick one step size for the whole batch).

The grid: the solver integrates from the first grid time to the last noise level (the last grid time, or
the one before it when the grid ends at σ = 0, where it then returns D with one more model call).  The
steps are its own: the interior grid times do not change them.  They are *output* times: the state at each
interior grid time is the cubic Hermite interpolant of the step that covers it (third order; the
integration itself is never restarted there), so callbacks see the trajectory at the grid times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional, Sequence

import torch

from .base import Point, Solver, StepContext
from .model import lanewise

__all__ = ["Adaptive", "ButcherTableau", "TABLEAUS", "METHODS"]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit embedded Runge–Kutta pair that checks its own consistency.

    Attributes:
        c, a: nodes and the strictly lower-triangular stage matrix (``a[i]`` has i entries).
        b: weights of the solution (order ``order``); ``b_err``: b − b̂, the weights of the error estimate
            (b̂ of order ``error_order``).
        fsal: the last stage is f at the solution (``a[-1] == b``, ``c[-1] == 1``): it is the next step's first.
    """

    name: str
    c: tuple
    a: tuple
    b: tuple
    b_err: tuple
    order: int
    error_order: int

    def __post_init__(self):
        s = len(self.c)
        if not (len(self.a) == len(self.b) == len(self.b_err) == s):
            raise ValueError(f"{self.name}: c, a, b and b_err must all have {s} entries")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"{self.name}: row {i} of a must have {i} entries (explicit method)")
            if abs(sum(row) - self.c[i]) > 1e-14:
                raise ValueError(f"{self.name}: row {i} of a must sum to c[{i}]")
        if abs(sum(self.b) - 1.0) > 1e-14 or abs(sum(self.b_err)) > 1e-14:
            raise ValueError(f"{self.name}: b must sum to 1 and b_err to 0 (consistency)")
        if not (self.c[-1] == 1.0 and all(abs(x - y) < 1e-15 for x, y in zip(self.a[-1], self.b))):
            raise ValueError(f"{self.name}: only FSAL pairs are supported (last row of a = b, c[-1] = 1)")

    @property
    def stages(self) -> int:
        return len(self.c)


TABLEAUS = {
    "bs3": ButcherTableau(
        "bs3", c=(0.0, 1 / 2, 3 / 4, 1.0),
        a=((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        b=(2 / 9, 1 / 3, 4 / 9, 0.0),
        b_err=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
        order=3, error_order=2),
    "dopri5": ButcherTableau(
        "dopri5", c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        a=((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
           (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
           (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
           (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
        b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
        b_err=(35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
               -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40),
        order=5, error_order=4),
}


# The exponential-integrator pair (order, error order); its stages are in Adaptive._attempt_exponential.
EXPONENTIAL = {"dpm23": (3, 2)}
METHODS = ("auto", *TABLEAUS, *EXPONENTIAL)


def _rms(v: torch.Tensor) -> torch.Tensor:
    """Root mean square of each row, as a float64 CPU tensor."""
    return v.reshape(v.shape[0], -1).double().pow(2).mean(dim=1).sqrt().cpu()


def _pow(v: torch.Tensor, p: float) -> torch.Tensor:
    """v**p elementwise, the same for a sample wherever it sits in the batch."""
    return lanewise(lambda a: a ** p, v)


def _finite_rows(v: torch.Tensor) -> torch.Tensor:
    """Whether every entry of each row of ``v`` is finite: a bool (n,) host tensor."""
    return torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1).cpu()


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row (n,) host tensor shaped to broadcast against ``like``."""
    return v.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


@dataclass(frozen=True)
class Adaptive(Solver):
    """Adaptive Runge–Kutta on the probability-flow ODE with a PI step-size controller per sample.

    A step is accepted when the RMS over the sample's entries of err/(atol + rtol·max(|y|, |y_new|)) is at
    most 1; the next step is h·clip(0.9·e_n^{−0.7/k}·e_{n−1}^{0.4/k}, 0.2, 5) (k = error order + 1; no
    growth right after a rejection).  The first step size comes from Hairer's starting-step heuristic
    (one model call) unless ``h_init`` (in u, see the module docstring) is given.

    Options: ``rtol``, ``atol``, ``method``, ``h_init``, ``max_steps`` (attempts per sample before giving up
    with an error).  Methods:

    * ``"dpm23"`` — DPM-Solver-2(3) (Lu et al. 2022a, §4.3; k-diffusion's ``sample_dpm_adaptive``): an
      exponential integrator in λ on y = x/α, whose linear part is exact; third order with a second-order
      error estimate, 2 model calls per attempt + 1 at each accepted point.  Any schedule where λ is finite
      at the start (rectified flow included, from below t = 1).
    * ``"bs3"`` (Bogacki–Shampine 3(2), 3 calls per attempt) and ``"dopri5"`` (Dormand–Prince 5(4), 6 calls).
    * ``"auto"`` (default) — ``dpm23`` where λ is finite at the grid's first time, else ``bs3``.

    Measured on the exact 2-D ring mixture (VP linear, t = 1 → 1e-3, atol = rtol/10, 64 samples; see
    ``bench/studies/low_nfe_measure.py``): at rtol 1e-2 / 1e-3 / 1e-4, dpm23 reaches an RMS error of
    5.1e-3 / 6.2e-4 / 7.5e-5 with 49 / 91 / 166 model calls per sample, bs3 1.2e-2 / 1.5e-3 / 1.7e-4 with
    60 / 107 / 204.  Order 3 (bs3, dpm23, auto) or 5 (dopri5).  The model calls depend on the problem and
    the tolerances: ``nfe()`` is ``None``; ``SampleResult.nfe`` counts batched calls and
    ``SampleResult.nfe_per_sample`` each sample's own.
    """

    rtol: float = 1e-3
    atol: float = 1e-3
    method: Literal["auto", "bs3", "dopri5", "dpm23"] = "auto"
    h_init: Optional[float] = None
    max_steps: int = 10_000

    name: ClassVar[str] = "adaptive"
    can_predict: ClassVar[bool] = False  # no fixed grid to predict along
    order: ClassVar[int] = 3
    adaptive: ClassVar[bool] = True
    reference: ClassVar[str] = ("Lu et al. 2022a (DPM-Solver-23, §4.3); Bogacki & Shampine 1989; Dormand & "
                                "Prince 1980; PI control: Gustafsson 1991, Hairer & Wanner, Solving ODEs II, §IV.2")

    safety: ClassVar[float] = 0.9
    factor_min: ClassVar[float] = 0.2
    factor_max: ClassVar[float] = 5.0

    def __post_init__(self):
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"adaptive: {name} must be a finite number >= 0, got {v!r}")
        if self.rtol == 0 and self.atol == 0:
            raise ValueError("adaptive: rtol and atol cannot both be 0")
        if self.method not in METHODS:
            raise ValueError(f"adaptive: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.h_init is not None and (isinstance(self.h_init, bool) or not isinstance(self.h_init, (int, float))
                                        or not (self.h_init > 0 and math.isfinite(self.h_init))):
            raise ValueError(f"adaptive: h_init must be a positive number or None, got {self.h_init!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"adaptive: max_steps must be a positive integer, got {self.max_steps!r}")
        object.__setattr__(self, "order", 3 if self.method == "auto" else self._orders(self.method)[0])

    @staticmethod
    def _orders(method: str) -> tuple[int, int]:
        """(order, error order) of a method."""
        return EXPONENTIAL[method] if method in EXPONENTIAL else (TABLEAUS[method].order, TABLEAUS[method].error_order)

    def resolved_method(self, points: Sequence[Point]) -> str:
        """The method used on a grid: ``"auto"`` → ``dpm23`` where λ is finite at the first point, else ``bs3``."""
        if self.method != "auto":
            return self.method
        return "dpm23" if math.isfinite(points[0].lam) else "bs3"

    @property
    def tableau(self) -> ButcherTableau:
        """The Runge–Kutta pair of ``method`` (bs3 or dopri5)."""
        return TABLEAUS[self.method]

    def nfe(self, grid: Sequence[float], t_zero: float) -> None:
        """Not known before sampling (the steps depend on the problem): ``None``."""
        return None

    def check(self, points: list[Point]) -> None:
        super().check(points)
        last = points[-2] if points[-1].zero else points[-1]
        if last.conv is None:
            raise ValueError(f"adaptive: cannot evaluate the model at the last noise level t={last.t}: "
                             f"{last.conv_error}")

    # -- the ODE in (u, y) ----------------------------------------------------------------------------
    def _ve(self, ctx: StepContext) -> bool:
        """Whether the ODE is integrated in (λ, x/α): always for dpm23, for the RK pairs on VE-form schedules."""
        return ctx.schedule.ode_form == "ve" or self.resolved_method(ctx.points) in EXPONENTIAL

    def _scale(self, ctx: StepContext, p: Point) -> float:
        """y = x / scale at point p."""
        return p.alpha if self._ve(ctx) else p.ode_scale

    def _u(self, ctx: StepContext, p: Point) -> float:
        """The integration variable u at point p."""
        u = p.lam if self._ve(ctx) else -p.t
        if not math.isfinite(u):
            raise ValueError(f"adaptive integrates in λ = log(α/σ), which is infinite at t={p.t}; start the grid "
                             "just below it")
        return u

    def _times(self, ctx: StepContext, u: torch.Tensor) -> torch.Tensor:
        """Solver time t of each u (float64, host)."""
        return lanewise(ctx.schedule.t_from_log_snr, u) if self._ve(ctx) else -u

    def _rhs(self, ctx: StepContext, u: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """dy/du for the rows ``rows`` of the batch at their own times u (one batched model call)."""
        s = ctx.schedule
        t = self._times(ctx, u)
        if self._ve(ctx):
            alpha = _col(lanewise(s.alpha, t), y)
            return ctx.denoise_at(y * alpha, t, rows) - y
        denoised = ctx.denoise_at(y, t, rows)
        alpha, sigma, da, ds = lanewise(lambda tt: (s.alpha(tt), s.sigma(tt), s.d_alpha(tt), s.d_sigma(tt)), t)
        p, q = _col(ds / sigma, y), _col(da - ds * alpha / sigma, y)
        return -(p * y + q * denoised)

    # -- the sampling-loop interface --------------------------------------------------------------------
    def init_state(self, ctx: StepContext):
        pts = ctx.points
        last = pts[-2] if pts[-1].zero else pts[-1]
        self._u(ctx, pts[0])
        return {"u_end": self._u(ctx, last), "started": False, "method": self.resolved_method(pts)}

    def _start(self, ctx: StepContext, x: torch.Tensor, p: Point, state: dict) -> dict:
        n = x.shape[0]
        rows = torch.arange(n)
        u = torch.full((n,), self._u(ctx, p), dtype=torch.float64)
        y = x / self._scale(ctx, p)
        f = self._rhs(ctx, u, y, rows)
        finite = _finite_rows(y) & _finite_rows(f)
        span = state["u_end"] - float(u[0])
        if self.h_init is not None:
            h = torch.full((n,), min(float(self.h_init), span), dtype=torch.float64)
        else:
            # Hairer's starting step (Solving ODEs I, II.4), per sample: one model call.
            scale = self.atol + self.rtol * y.abs()
            d0, d1 = _rms(y / scale), _rms(f / scale)
            h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).clamp(max=span)
            f1 = self._rhs(ctx, u + h0, y + _col(h0, y) * f, rows)
            finite &= _finite_rows(f1)
            d2 = _rms((f1 - f) / scale) / h0
            dmax = torch.maximum(d1, d2)
            h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6),
                             _pow(0.01 / dmax.clamp_min(1e-300), 1.0 / (self._orders(state["method"])[1] + 1)))
            h = torch.minimum(torch.minimum(100 * h0, h1), torch.full_like(h0, span))
        state = {**state, "started": True, "u": u, "y": y, "f": f, "h": h, "span": span,
                 "u_prev": u.clone(), "y_prev": y.clone(), "f_prev": f.clone(),
                 "err_prev": torch.ones(n, dtype=torch.float64), "rejected": torch.zeros(n, dtype=torch.bool),
                 "attempts": torch.zeros(n, dtype=torch.long)}
        # A sample whose state or model output is already NaN/Inf (on either call of the starting step) cannot be
        # integrated: it ends as NaN (and the loop reports it by row).
        self._retire(state, (~finite).nonzero().flatten())
        return state

    @staticmethod
    def _retire(state: dict, rows: torch.Tensor) -> None:
        """End the integration of ``rows`` with a NaN state (their model output was not finite)."""
        if rows.numel() == 0:
            return
        dev = rows.to(state["y"].device)
        for key in ("y", "f", "y_prev", "f_prev"):
            state[key][dev] = math.nan
        state["u"][rows] = state["u_end"]
        state["u_prev"][rows] = state["u_end"]

    def _advance(self, ctx: StepContext, state: dict, target: float) -> None:
        """Take accepted steps (in place on ``state``) until every sample has reached u ≥ target."""
        u_end = state["u_end"]
        while True:
            rows = (state["u"] < target).nonzero().flatten()
            if rows.numel() == 0:
                return
            if bool((state["attempts"][rows] >= self.max_steps).any()):
                bad = rows[state["attempts"][rows] >= self.max_steps].tolist()
                raise RuntimeError(f"adaptive: samples {bad[:20]} needed more than max_steps={self.max_steps} "
                                   f"step attempts (rtol={self.rtol}, atol={self.atol}); loosen the tolerances "
                                   "or raise max_steps")
            state["attempts"][rows] += 1
            u, y, f = state["u"][rows], state["y"][rows], state["f"][rows]
            left = u_end - u
            h = torch.minimum(state["h"][rows], left)
            last_step = h >= left
            if state["method"] in EXPONENTIAL:
                y_new, f_new, norm, failed = self._attempt_exponential(ctx, u, y, f, h, rows)
            else:
                y_new, f_new, norm, failed = self._attempt(ctx, TABLEAUS[state["method"]], u, y, f, h, rows)
            ok = torch.isfinite(norm) & (norm <= 1.0)
            self._control(state, rows, h, norm, ok, self._orders(state["method"])[1])
            # A NaN/Inf model output ends its sample as NaN at once: the loop then raises NonFiniteError (or
            # flags the row), as for every solver.  Retrying with a smaller step would hide a broken network.
            self._retire(state, rows[failed])
            # A step that keeps failing down to a vanishing size: a finite error that cannot be met is an
            # error; a non-finite one (not from the model, e.g. 0/0 with atol=0) ends the sample as NaN.
            stalled = ~ok & ~failed & (state["h"][rows] < 1e-10 * state["span"])
            if bool(stalled.any()):
                finite_fail = stalled & torch.isfinite(norm)
                if bool(finite_fail.any()):
                    raise RuntimeError(f"adaptive: the step size of samples {rows[finite_fail].tolist()[:20]} fell "
                                       f"below 1e-10 of the interval without meeting rtol={self.rtol}, "
                                       f"atol={self.atol}; the model may be discontinuous or the tolerances too tight")
                self._retire(state, rows[stalled])
                ok = ok & ~stalled
            if bool(ok.any()):
                self._accept(ctx, state, rows, ok, torch.where(last_step, torch.full_like(u, u_end), u + h),
                             norm, y_new, f_new, target)

    def _accept(self, ctx: StepContext, state: dict, rows: torch.Tensor, ok: torch.Tensor, u_next: torch.Tensor,
                norm: torch.Tensor, y_new: torch.Tensor, f_new: Optional[torch.Tensor], target: float) -> None:
        """Move the rows ``rows[ok]`` to their new point (in place on ``state``).

        ``f_new`` is ``None`` for the exponential pair, whose last stage is not at the new point: f there is
        then one more model call, made only where it will be used (a next step, or the dense output at a
        target before the end; a sample that has reached the end with nothing left to interpolate needs none).
        """
        acc, sel = rows[ok], ok.nonzero().flatten()
        dev_sel = sel.to(y_new.device)
        state["err_prev"][acc] = norm[sel].clamp_min(1e-4)
        for key in ("u", "y", "f"):
            state[key + "_prev"][acc] = state[key][acc]
        state["u"][acc] = u_next[sel]
        state["y"][acc] = y_new[dev_sel]
        if f_new is not None:
            state["f"][acc] = f_new[dev_sel]
            return
        need = (u_next[sel] < state["u_end"]) | (target < state["u_end"])
        state["f"][acc] = 0.0  # never read where not computed: the sample has finished
        if bool(need.any()):
            rows_f = acc[need]
            f = self._rhs(ctx, state["u"][rows_f], state["y"][rows_f.to(y_new.device)], rows_f)
            state["f"][rows_f.to(y_new.device)] = f
            # The first model call at the new point: a NaN/Inf output ends its sample as NaN (as in a step).
            self._retire(state, rows_f[~_finite_rows(f)])

    def _attempt(self, ctx: StepContext, tab: ButcherTableau, u: torch.Tensor, y: torch.Tensor, f: torch.Tensor,
                 h: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One embedded Runge–Kutta step of size h from (u, y) with f = dy/du there, for the batch rows ``rows``.

        Returns:
            (y_new, f at y_new, the error norm of each row, and a bool mask of the rows whose model output was
            NaN/Inf on this step) — the norm and the mask on the host.
        """
        hc = _col(h, y)
        # Runge–Kutta stages (the first is f at the step's start, kept from the last step: FSAL).
        ks = [f]
        y_stage = y
        for i in range(1, tab.stages):
            y_stage = y
            for aij, kj in zip(tab.a[i], ks):
                if aij != 0.0:
                    y_stage = y_stage + (hc * aij) * kj
            ks.append(self._rhs(ctx, u + tab.c[i] * h, y_stage, rows))
        y_new = y_stage  # FSAL: the last stage's input is the solution, its output f there
        err = sum((hc * e) * k for e, k in zip(tab.b_err, ks) if e != 0.0)
        norm, failed = self._norm(err, y, y_new, ks[1:])
        return y_new, ks[-1], norm, failed

    def _norm(self, err: torch.Tensor, y: torch.Tensor, y_new: torch.Tensor, stages: list
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(each row's RMS of err/(atol + rtol·max(|y|, |y_new|)), the rows whose new stages are not finite)."""
        scale = self.atol + self.rtol * torch.maximum(y.abs(), y_new.abs())
        norm = _rms(err / scale)
        failed = torch.zeros(y.shape[0], dtype=torch.bool)
        if not bool(torch.isfinite(norm).all()):
            # y, f and h are finite, so a stage is non-finite only where the model returned NaN/Inf (checked
            # only when some norm is not finite: no extra pass over the batch on a clean step).
            for k in stages:
                failed |= ~_finite_rows(k)
        return norm, failed

    def _attempt_exponential(self, ctx: StepContext, u: torch.Tensor, y: torch.Tensor, f: torch.Tensor,
                             h: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor,
                                                                           torch.Tensor]:
        """One DPM-Solver-2(3) step in λ (u = λ, y = x/α, f = D − y) for the batch rows ``rows``.

        The exact solution is y(λ + h) = e^{−h}·y + ∫₀ʰ e^{−(h−τ)}·D(λ + τ) dτ.  With E_k(h) the integral of
        e^{−(h−τ)}·τ^{k−1}/(k−1)! (E₁ = 1 − e^{−h}, E₂ = h − 1 + e^{−h}) and stages at r₁ = ⅓, r₂ = ⅔ (the third-
        order singlestep DPM-Solver++ of Lu et al. 2022b, Alg. 1 form; DPM-Solver-23 of Lu et al. 2022a, §4.3):
        y₁ = y + E₁(r₁h)·f,  y₂ = y + E₁(r₂h)·f + E₂(r₂h)·(D₁ − D)/(r₁h);
        high (order 3): y + E₁(h)·f + E₂(h)·(D₂ − D)/(r₂h);  low (order 2): the same with (D₁ − D)/(r₁h).
        Two model calls; f at the new point is made on acceptance (see :meth:`_accept`).

        Returns:
            (y_new, None, the error norm of each row, the rows whose model output was NaN/Inf) — as ``_attempt``.
        """
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        e1 = lambda z: -torch.expm1(-z)           # noqa: E731  E₁(z) = 1 − e^{−z}
        e2 = lambda z: z + torch.expm1(-z)        # noqa: E731  E₂(z) = z − 1 + e^{−z}
        d0 = f + y
        # Stage 1: first-order step to λ + h/3.
        y1 = y + _col(e1(r1 * h), y) * f
        f1 = self._rhs(ctx, u + r1 * h, y1, rows)
        d1_slope = (f1 + y1 - d0) / _col(r1 * h, y)
        # Stage 2: second-order step to λ + 2h/3.
        y2 = y + _col(e1(r2 * h), y) * f + _col(e2(r2 * h), y) * d1_slope
        f2 = self._rhs(ctx, u + r2 * h, y2, rows)
        # Third-order solution and the second-order one (the error estimate is their difference).
        base = y + _col(e1(h), y) * f
        y_new = base + _col(e2(h) / (r2 * h), y) * (f2 + y2 - d0)
        y_low = base + _col(e2(h), y) * d1_slope
        norm, failed = self._norm(y_new - y_low, y, y_new, [f1, f2])
        return y_new, None, norm, failed

    def _control(self, state: dict, rows: torch.Tensor, h: torch.Tensor, norm: torch.Tensor,
                 ok: torch.Tensor, error_order: int) -> None:
        """The PI controller: the next step size of ``rows`` (in place on ``state``) from this step's error norm."""
        k_exp = error_order + 1
        beta1, beta2 = 0.7 / k_exp, 0.4 / k_exp
        norm_safe = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, math.inf))
        grow = self.safety * _pow(norm_safe.clamp_min(1e-10), -beta1) * _pow(state["err_prev"][rows], beta2)
        grow = grow.clamp(self.factor_min, self.factor_max)
        grow = torch.where(state["rejected"][rows], grow.clamp(max=1.0), grow)
        shrink = (self.safety * _pow(norm_safe, -1.0 / k_exp)).clamp(self.factor_min, 1.0)
        state["h"][rows] = h * torch.where(ok, grow, shrink)
        state["rejected"][rows] = ~ok

    @staticmethod
    def _dense(state: dict, target: float) -> torch.Tensor:
        """y at u = target from the cubic Hermite interpolant of each sample's last step (which covers it).

        For the exponential pair (u = λ, f = D − y) the interpolant is of w = e^{u − u₀}·y, whose derivative
        e^{u − u₀}·D carries no linear part: the e^{−h} decay of y is then exact, not interpolated.
        """
        u0, u1 = state["u_prev"], state["u"]
        y0, y1, f0, f1 = state["y_prev"], state["y"], state["f_prev"], state["f"]
        span = u1 - u0
        theta = torch.where(span > 0, (target - u0) / span.clamp_min(1e-300), torch.ones_like(span))
        th, dh = _col(theta, y1), _col(span, y1)
        if state["method"] in EXPONENTIAL:
            grow = torch.exp(dh)
            y1, f0, f1 = grow * y1, f0 + y0, grow * (f1 + y1)
        h00 = (1 + 2 * th) * (1 - th) ** 2
        h10 = th * (1 - th) ** 2
        h01 = th * th * (3 - 2 * th)
        h11 = th * th * (th - 1)
        w = h00 * y0 + h10 * dh * f0 + h01 * y1 + h11 * dh * f1
        return w * torch.exp(-th * dh) if state["method"] in EXPONENTIAL else w

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        p, q = ctx.points[i], ctx.points[i + 1]
        if q.zero:
            # Every sample is at the last noise level p: the final denoising step.
            return ctx.denoise(x, p), state, 1
        if not state["started"]:
            state = self._start(ctx, x, p, state)
        else:
            state = dict(state)
        target = self._u(ctx, q)
        self._advance(ctx, state, target)
        if target >= state["u_end"]:
            y = state["y"]  # every sample ends exactly at u_end
        else:
            y = self._dense(state, target)
        return y * self._scale(ctx, q), state, self._orders(state["method"])[0]

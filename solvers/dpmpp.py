"""DPM-Solver++ (Lu et al. 2022b): exponential integrators in the data prediction D and log-SNR λ.

Notation at step i: h = λ_n − λ (> 0), φ = e^{−h} − 1 (``expm1(-h)``), the past model outputs
D_{i−1}, D_{i−2} at λ_{i−1}, λ_{i−2}.  The first-order update (= DDIM) is
x_n = (σ_n/σ)·x − α_n·φ·D.  Every step to σ = 0 (λ = +inf) returns D: it is first order by nature.

``lower_order_final`` (``"auto"`` → True below 15 steps, the diffusers rule; True; False) lowers the order
of the last steps to the number of steps left.  The order used on every step is reported in
``SampleResult.orders``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import LowerOrderFinal, Solver, StepContext, multistep_order, resolve_lower_order_final


def _validate_lower_order_final(name: str, value) -> None:
    if value != "auto" and not isinstance(value, bool):
        raise ValueError(f"{name}: lower_order_final must be True, False or 'auto', got {value!r}")


class _LogSNRSolver(Solver):
    """Mixin check: these solvers step in λ, which must be finite wherever the model is evaluated."""

    def check(self, points):
        super().check(points)
        for p in points[:-1]:
            if not math.isfinite(p.lam):
                raise ValueError(f"{self.name} steps in log-SNR λ, which is infinite at t={p.t} (α = 0 there); "
                                 f"start the grid just below it (e.g. t_start={p.t * (1 - 1e-3):.6g}) or use "
                                 "euler/heun, which integrate in t")


@dataclass(frozen=True)
class DPMSolverPPMultistep(_LogSNRSolver):
    """Shared step of DPM-Solver++(2M) and (3M); ``max_order`` is fixed by the subclass."""

    lower_order_final: LowerOrderFinal = "auto"

    max_order: ClassVar[int] = 2

    def __post_init__(self):
        _validate_lower_order_final(self.name, self.lower_order_final)

    def init_state(self, ctx: StepContext):
        return {"history": [], "lower_final": resolve_lower_order_final(self.lower_order_final, ctx.steps)}

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        p, q = ctx.points[i], ctx.points[i + 1]
        denoised = ctx.denoise(x, p)
        history = state["history"]  # past (D, λ), most recent last
        order = multistep_order(i, ctx.steps, self.max_order, state["lower_final"], q.zero)
        order = min(order, len(history) + 1)
        state = {"history": (history + [(denoised, p.lam)])[-(self.max_order - 1):] if self.max_order > 1 else [],
                 "lower_final": state["lower_final"]}
        if q.zero:
            return denoised, state, 1
        h = q.lam - p.lam
        phi = math.expm1(-h)
        c_x = q.sigma / p.sigma
        if order == 1:
            # First-order step (DDIM).
            return torch.add(x * c_x, denoised, alpha=-q.alpha * phi), state, 1
        d_prev, lam_prev = history[-1]
        r0 = (p.lam - lam_prev) / h
        d1_0 = (denoised - d_prev) / r0
        if order == 2:
            # Second-order multistep step (Lu et al. 2022b, Algorithm 2).
            x_next = torch.add(x * c_x, denoised, alpha=-q.alpha * phi)
            return torch.add(x_next, d1_0, alpha=-0.5 * q.alpha * phi), state, 2
        # Third-order multistep step (the DPM-Solver code's multistep_dpm_solver_third_update).
        d_prev2, lam_prev2 = history[-2]
        r1 = (lam_prev - lam_prev2) / h
        d1_1 = (d_prev - d_prev2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x_next = torch.add(x * c_x, denoised, alpha=-q.alpha * phi)
        x_next = torch.add(x_next, d1, alpha=q.alpha * (phi / h + 1.0))
        x_next = torch.add(x_next, d2, alpha=-q.alpha * ((phi + h) / (h * h) - 0.5))
        return x_next, state, 3


@dataclass(frozen=True)
class DPMSolverPP2M(DPMSolverPPMultistep):
    """DPM-Solver++(2M): second-order multistep in D and λ (Lu et al. 2022b, Algorithm 2).

    D' = (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1}, r = h_{i−1}/h_i;  x_n = (σ_n/σ)·x − α_n·φ·D'.
    Order 2 (first step order 1); 1 model call per step.
    """

    name: ClassVar[str] = "dpmpp_2m"
    order: ClassVar[int] = 2
    max_order: ClassVar[int] = 2
    reference: ClassVar[str] = "Lu et al. 2022b (DPM-Solver++), Algorithm 2"


@dataclass(frozen=True)
class DPMSolverPP3M(DPMSolverPPMultistep):
    """DPM-Solver++(3M): third-order multistep in D and λ (the DPM-Solver code, ``order=3``).

    Order 3 (warm-up steps of order 1 and 2); 1 model call per step.
    """

    name: ClassVar[str] = "dpmpp_3m"
    order: ClassVar[int] = 3
    max_order: ClassVar[int] = 3
    reference: ClassVar[str] = "Lu et al. 2022b (DPM-Solver++), §4 and the official code's order-3 multistep"


@dataclass(frozen=True)
class DPMSolverPP2S(_LogSNRSolver):
    """DPM-Solver++(2S): second-order singlestep, intermediate point at λ + r·h (r = ½).

    u = (σ_s/σ)·x − α_s·(e^{−rh} − 1)·D;  x_n = (σ_n/σ)·x − α_n·φ·[(1 − 1/(2r))·D + 1/(2r)·D(u, s)].
    Order 2; 2 model calls per step, 1 on the final step to σ = 0.
    """

    r: float = 0.5

    name: ClassVar[str] = "dpmpp_2s"
    order: ClassVar[int] = 2
    evals_per_step: ClassVar[int] = 2
    reference: ClassVar[str] = "Lu et al. 2022b (DPM-Solver++), Algorithm 1 (singlestep, order 2)"

    def __post_init__(self):
        if not isinstance(self.r, (int, float)) or not 0 < self.r < 1:
            raise ValueError(f"dpmpp_2s: r must be in (0, 1), got {self.r!r}")

    def init_state(self, ctx: StepContext):
        # Intermediate times depend only on the grid: compute their coefficients once.
        pts, mids = ctx.points, []
        for i in range(ctx.steps):
            if pts[i + 1].zero:
                mids.append(None)
            else:
                lam_s = pts[i].lam + self.r * (pts[i + 1].lam - pts[i].lam)
                mids.append(float(ctx.schedule.t_from_log_snr(lam_s)))
        valid = [m for m in mids if m is not None]
        points = iter(ctx.point_list(valid) if valid else [])
        return [None if m is None else next(points) for m in mids]

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, mids):
        p, q = ctx.points[i], ctx.points[i + 1]
        denoised = ctx.denoise(x, p)
        if q.zero:
            return denoised, mids, 1
        s = mids[i]
        h = q.lam - p.lam
        # Intermediate first-order step to λ + r·h.
        u = torch.add(x * (s.sigma / p.sigma), denoised, alpha=-s.alpha * math.expm1(-self.r * h))
        denoised_s = ctx.denoise(u, s)
        # Second-order step with the intermediate prediction.
        w = 1.0 / (2.0 * self.r)
        d = torch.add(denoised * (1.0 - w), denoised_s, alpha=w)
        return torch.add(x * (q.sigma / p.sigma), d, alpha=-q.alpha * math.expm1(-h)), mids, 2


@dataclass(frozen=True)
class DPMSolverPP2MSDE(_LogSNRSolver):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, §5; k-diffusion's ``sample_dpmpp_2m_sde``, midpoint form).

    With η (default 1) and h = λ_n − λ:
    x_n = (σ_n/σ)·e^{−ηh}·x + α_n·(1 − e^{−(1+η)h})·D
          + ½·α_n·(1 − e^{−(1+η)h})·(D − D_{i−1})/r  (from the second step)
          + σ_n·sqrt(1 − e^{−2ηh})·z.
    η = 0 is the deterministic DPM-Solver++(2M) with the midpoint correction.  Stochastic for η > 0
    (declared order 1: the strong order of the SDE scheme); 1 model call per step.
    """

    eta: float = 1.0
    lower_order_final: LowerOrderFinal = "auto"

    name: ClassVar[str] = "dpmpp_2m_sde"
    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = True
    reference: ClassVar[str] = "Lu et al. 2022b (DPM-Solver++), §5; k-diffusion sample_dpmpp_2m_sde"

    def __post_init__(self):
        if not isinstance(self.eta, (int, float)) or self.eta < 0:
            raise ValueError(f"dpmpp_2m_sde: eta must be >= 0, got {self.eta!r}")
        _validate_lower_order_final(self.name, self.lower_order_final)

    @property
    def is_stochastic(self) -> bool:
        return self.eta > 0

    def init_state(self, ctx: StepContext):
        return {"prev": None, "lower_final": resolve_lower_order_final(self.lower_order_final, ctx.steps)}

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        p, q = ctx.points[i], ctx.points[i + 1]
        denoised = ctx.denoise(x, p)
        prev = state["prev"]
        order = multistep_order(i, ctx.steps, 2, state["lower_final"], q.zero)
        order = min(order, 1 if prev is None else 2)
        new_state = {"prev": (denoised, p.lam), "lower_final": state["lower_final"]}
        if q.zero:
            return denoised, new_state, 1
        h = q.lam - p.lam
        eta_h = self.eta * h
        c_d = -q.alpha * math.expm1(-h - eta_h)
        x_next = torch.add(x * (q.sigma / p.sigma * math.exp(-eta_h)), denoised, alpha=c_d)
        if order == 2:
            d_prev, lam_prev = prev
            r = (p.lam - lam_prev) / h
            x_next = torch.add(x_next, denoised - d_prev, alpha=0.5 * c_d / r)
        if self.eta > 0:
            x_next = torch.add(x_next, ctx.noise(x), alpha=q.sigma * math.sqrt(-math.expm1(-2.0 * eta_h)))
        return x_next, new_state, order

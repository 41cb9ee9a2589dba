"""Heun's second-order method on the probability-flow ODE: EDM Algorithm 2, with its optional churn."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Solver, StepContext
from .first_order import ode_euler_update


@dataclass(frozen=True)
class Heun(Solver):
    """Heun's method (explicit trapezoid) with EDM's stochastic churn (Karras et al. 2022, Algorithm 2).

    Per step, in the schedule's ODE form (x̃ = x/α against σ̃ = σ/α for diffusion schedules):

    1. churn: if S_tmin ≤ σ̃ ≤ S_tmax, γ = min(S_churn/N, √2 − 1), σ̂ = σ̃(1 + γ) and
       x̂ = x̃ + sqrt(σ̂² − σ̃²)·S_noise·z (σ̂ capped at the schedule's ``t_max``); else σ̂ = σ̃, x̂ = x̃;
    2. Euler step from (x̂, σ̂) — the model is evaluated at the churned point;
    3. unless σ̃_n = 0: the 2nd-order correction with the slope at the Euler end point.

    Options follow EDM's names: ``s_churn`` (0 = deterministic), ``s_tmin``, ``s_tmax``, ``s_noise``.
    Order 2; 2 model calls per step, 1 on the final step to σ = 0 (2N − 1 for N steps ending at σ = 0).
    """

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    name: ClassVar[str] = "heun"
    order: ClassVar[int] = 2
    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 2
    reference: ClassVar[str] = "Karras et al. 2022 (EDM), Algorithm 2"

    def __post_init__(self):
        for field in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
            v = getattr(self, field)
            if not isinstance(v, (int, float)) or v < 0 or (math.isnan(v)):
                raise ValueError(f"heun: {field} must be a non-negative number, got {v!r}")
        if self.s_tmin > self.s_tmax:
            raise ValueError(f"heun: s_tmin={self.s_tmin} must not exceed s_tmax={self.s_tmax}")

    @property
    def is_stochastic(self) -> bool:
        return self.s_churn > 0

    def init_state(self, ctx: StepContext):
        # Churned times depend only on the grid: compute their coefficients once.
        churned = []
        n = ctx.steps
        for p in ctx.points[:-1]:
            gamma = 0.0
            if self.s_churn > 0 and math.isfinite(p.sigma_ve) and self.s_tmin <= p.sigma_ve <= self.s_tmax:
                gamma = min(self.s_churn / n, math.sqrt(2.0) - 1.0)
            if gamma > 0:
                t_hat = min(float(ctx.schedule.t_from_sigma_ve(p.sigma_ve * (1 + gamma))), ctx.schedule.t_max)
                churned.append(ctx.point(t_hat) if t_hat > p.t else None)
            else:
                churned.append(None)
        return churned

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, churned):
        p, q = ctx.points[i], ctx.points[i + 1]
        hat = churned[i]
        if hat is not None:
            # Increase noise temporarily (in x̃ = x/α, then back to the schedule's x).
            std = math.sqrt(hat.sigma_ve ** 2 - p.sigma_ve ** 2) * self.s_noise
            x = (x / p.alpha + std * ctx.noise(x)) * hat.alpha
            p = hat
        denoised = ctx.denoise(x, p)
        if q.zero:
            return denoised, churned, 1
        # Euler step.
        c_x, c_d = ode_euler_update(p.ode_p, p.ode_q, p, q)
        x_next = torch.add(x * c_x, denoised, alpha=c_d)
        # Apply 2nd order correction: y_n = ŷ + Δρ·(d + d')/2.
        denoised_next = ctx.denoise(x_next, q)
        d_cur = torch.add(x * p.ode_p, denoised, alpha=p.ode_q)
        d_prime = torch.add(x_next * q.ode_p, denoised_next, alpha=q.ode_q)
        drho = q.ode_time - p.ode_time
        x_next = (x / p.ode_scale + (0.5 * drho) * (d_cur + d_prime)) * q.ode_scale
        return x_next, churned, 2

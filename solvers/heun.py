"""Heun's second-order method on the probability-flow ODE: EDM Algorithm 2, with its optional churn."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Solver, StepContext
from .first_order import ode_euler_update
from .validation import check_real


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
    default_spacing: ClassVar[str] = "karras"
    default_spacing_note: ClassVar[str] = "EDM ρ=7 spacing (Karras et al. 2022)"
    order: ClassVar[int] = 2
    stochastic: ClassVar[bool] = True
    evals_per_step: ClassVar[int] = 2
    reference: ClassVar[str] = "Karras et al. 2022 (EDM), Algorithm 2"

    def __post_init__(self):
        for field in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
            # s_tmax may be +inf (its default: churn at every level); the others must be finite.
            check_real("heun", field, getattr(self, field), low=0.0, allow_inf=field == "s_tmax")
        if self.s_tmin > self.s_tmax:
            raise ValueError(f"heun: s_tmin={self.s_tmin} must not exceed s_tmax={self.s_tmax}")

    @property
    def is_stochastic(self) -> bool:
        return self.s_churn > 0

    def init_state(self, ctx: StepContext):
        # Churned times depend only on the grid: compute their coefficients once.
        # (one vectorised pass over the churned steps: per-step schedule calls would cost more than a step).
        n = ctx.steps
        if self.s_churn == 0:
            return [None] * n
        gamma = min(self.s_churn / n, math.sqrt(2.0) - 1.0)
        churn = [i for i, p in enumerate(ctx.points[:-1])
                 if math.isfinite(p.sigma_ve) and self.s_tmin <= p.sigma_ve <= self.s_tmax]
        if not churn:
            return [None] * n
        raised = torch.tensor([ctx.points[i].sigma_ve * (1 + gamma) for i in churn], dtype=torch.float64)
        t_hats = ctx.schedule.t_from_sigma_ve(raised).clamp(max=ctx.schedule.t_max).tolist()
        keep = {i: t for i, t in zip(churn, t_hats) if t > ctx.points[i].t}
        hats = iter(ctx.point_list(list(keep.values())) if keep else [])
        return [next(hats) if i in keep else None for i in range(n)]

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, churned):
        p, q = ctx.points[i], ctx.points[i + 1]
        hat = churned[i]
        if hat is not None:
            # Increase noise temporarily (in x̃ = x/α, then back to the schedule's x).
            std = math.sqrt(hat.sigma_ve ** 2 - p.sigma_ve ** 2) * self.s_noise
            x = (x / p.alpha + std * ctx.noise(x)) * hat.alpha
            p = hat
        if q.zero:
            return ctx.denoise(x, p), churned, 1
        # Euler step x_e = c_x·x + c_D·D, fused with the model call (DiffusionModel.denoise_combine).
        c_x, c_d = ode_euler_update(p.ode_p, p.ode_q, p, q)
        x_euler = ctx.denoise_combine(x, p, c_x, c_d)
        # Apply 2nd order correction: y_n = y + Δρ·(d + d')/2 with d = p·x + q·D at both ends, i.e.
        # x_n = s_n/s·x + k·(p·x + q·D + p'·x_e + q'·D'), k = Δρ·s_n/2.  D = (x_e − c_x·x)/c_D eliminates D
        # (k·q/c_D = ½: no cancellation is amplified), and the model call at x_e is fused too.
        k = 0.5 * (q.ode_time - p.ode_time) * q.ode_scale
        w_d = k * p.ode_q / c_d  # weight of D = (x_e − c_x·x)/c_D
        x_next = ctx.denoise_combine(x_euler, q, k * q.ode_p + w_d, k * q.ode_q)
        return x_next.add_(x, alpha=q.ode_scale / p.ode_scale + k * p.ode_p - w_d * c_x), churned, 2

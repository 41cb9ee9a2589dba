"""First-order solvers: Euler (probability-flow ODE), DDIM / DDPM (η-ancestral), Euler–Maruyama (reverse SDE).

Notation at step i: the current point has α, σ (``p``), the next α_n, σ_n (``q``); D = D(x, t) is the
denoised prediction and ε̂ = (x − α·D)/σ the implied noise.  Every step to σ = 0 returns D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import Point, Solver, StepContext
from .validation import check_real


def ode_euler_update(d_x: float, d_d: float, p: Point, q: Point) -> tuple[float, float]:
    """Coefficients (c_x, c_D) of one Euler step of dy/dρ = p·x + q·D from point p to point q.

    The ODE state is y = x/s (s = ``ode_scale``); the step is y_n = y + (ρ_n − ρ)·(p·x + q·D), so
    x_n = s_n·(x/s + Δρ·(p·x + q·D)).  ``d_x``/``d_d`` are the derivative's coefficients (usually
    ``p.ode_p``/``p.ode_q``, averaged for Heun's correction).
    """
    drho = q.ode_time - p.ode_time
    return q.ode_scale / p.ode_scale + q.ode_scale * drho * d_x, q.ode_scale * drho * d_d


@dataclass(frozen=True)
class Euler(Solver):
    """Euler's method on the probability-flow ODE.

    In the ODE form of the schedule (``Schedule.ode_form``): for diffusion schedules dx̃/dσ̃ = ε̂ with
    x̃ = x/α, σ̃ = σ/α (Karras et al. 2022, eq. 4 and Algorithm 1 with σ(t) = t, s(t) = 1; k-diffusion's
    ``sample_euler``; diffusers' ``EulerDiscreteScheduler``); for rectified flow dx/dt = u(x, t).  In both
    forms one Euler step is algebraically the same update as DDIM with η = 0, x_n = α_n·D + σ_n·ε̂
    (Song et al. 2021, DDIM §4.3) — a fact the tests check.

    Order 1; 1 model call per step.
    """

    name: ClassVar[str] = "euler"
    default_spacing: ClassVar[str] = "karras"
    default_spacing_note: ClassVar[str] = "EDM ρ=7 spacing (Karras et al. 2022)"
    order: ClassVar[int] = 1
    reference: ClassVar[str] = "Karras et al. 2022 (EDM), Algorithm 1; Song et al. 2021 (DDIM), §4.3"

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        p, q = ctx.points[i], ctx.points[i + 1]
        if q.zero:
            return ctx.denoise(x, p), state, 1
        # Euler step x_n = c_x·x + c_D·D, fused with the model call (DiffusionModel.denoise_combine).
        c_x, c_d = ode_euler_update(p.ode_p, p.ode_q, p, q)
        return ctx.denoise_combine(x, p, c_x, c_d), state, 1


@dataclass(frozen=True)
class DDIM(Solver):
    """DDIM (Song et al. 2021, eq. 12) with η ∈ [0, 1]: η = 0 deterministic, η = 1 ancestral (DDPM, β̃).

    x_n = α_n·D + sqrt(σ_n² − c²)·ε̂ + c·z,  c = η·σ_n·sqrt(1 − (σ̃_n/σ̃)²)  (σ̃ = σ/α),

    which on a VP schedule is DDIM's σ_t(η) = η·sqrt((1−ᾱ_{t−1})/(1−ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_{t−1}), and on any
    schedule the ancestral step of k-diffusion in VE form.  No noise on the step to σ = 0.

    Order 1; 1 model call per step; stochastic when η > 0.
    """

    eta: float = 0.0

    name: ClassVar[str] = "ddim"
    # DDIM's uniform skip, aligned to start at the last trained step: the DDIM code's range(0, N, N // steps)
    # starts at step 0 when steps = 1, evaluating the network on pure noise as if it were clean data.
    default_spacing: ClassVar[str] = "trailing"
    default_spacing_note: ClassVar[str] = ("DDIM's uniform skip for non-CIFAR data (Song et al. 2021, App. D.2), "
                                           "aligned to start at the last trained step (Lin et al. 2024)")
    paper_spacing_by_data: ClassVar[dict] = {
        "cifar10-train": ("quadratic", "DDIM's CIFAR-10 grid (Song et al. 2021, Table 1)")}
    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = True
    reference: ClassVar[str] = "Song, Meng & Ermon 2021 (DDIM), eq. 12 and 16"

    def __post_init__(self):
        check_real(self.name, "eta", self.eta, low=0.0, high=1.0)

    @property
    def is_stochastic(self) -> bool:
        return self.eta > 0

    def noise_std(self, p: Point, q: Point) -> float:
        """Std c of the noise injected on the step p → q."""
        if self.eta == 0:
            return 0.0
        ratio = q.sigma_ve / p.sigma_ve if math.isfinite(p.sigma_ve) else 0.0
        return self.eta * q.sigma * math.sqrt(max(0.0, 1.0 - ratio * ratio))

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        p, q = ctx.points[i], ctx.points[i + 1]
        if q.zero:
            return ctx.denoise(x, p), state, 1
        c = self.noise_std(p, q)
        c_mean = self.mean_noise_coefficient(p, q)
        # x_n = α_n·D + c_mean·ε̂ with ε̂ = (x − α·D)/σ, fused with the model call.
        c_x, c_d = c_mean / p.sigma, q.alpha - c_mean * p.alpha / p.sigma
        x_next = ctx.denoise_combine(x, p, c_x, c_d)
        if c > 0:
            x_next.add_(ctx.noise(x), alpha=c)
        return x_next, state, 1

    def mean_noise_coefficient(self, p: Point, q: Point) -> float:
        c = self.noise_std(p, q)
        return math.sqrt(max(0.0, q.sigma * q.sigma - c * c))


@dataclass(frozen=True)
class DDPM(DDIM):
    """Ancestral sampling of Ho et al. 2020 (Algorithm 2): the posterior mean plus noise.

    ``variance="small"`` uses the posterior variance β̃ (= DDIM with η = 1; diffusers' default
    ``fixed_small``); ``"large"`` uses β_t = 1 − α²/α_n² with the same mean, as in Ho et al.'s CIFAR-10
    samples (``fixed_large``; variance-preserving schedules only).  No noise on the step to σ = 0.

    Order 1; 1 model call per step; stochastic.
    """

    eta: float = 1.0
    variance: Literal["small", "large"] = "small"

    name: ClassVar[str] = "ddpm"
    reference: ClassVar[str] = "Ho, Jain & Abbeel 2020 (DDPM), Algorithm 2"

    def __post_init__(self):
        if isinstance(self.eta, bool) or self.eta != 1.0:
            raise ValueError(f"ddpm is DDIM with eta=1 (got eta={self.eta!r}); use solver='ddim' to choose "
                             "another eta")
        if self.variance not in ("small", "large"):
            raise ValueError(f"ddpm: variance must be 'small' or 'large', got {self.variance!r}")

    def check(self, points):
        super().check(points)
        if self.variance == "large" and not all(abs(p.alpha ** 2 + p.sigma ** 2 - 1) < 1e-9 for p in points):
            raise ValueError("ddpm: variance='large' (β_t) is defined on variance-preserving schedules only")

    def noise_std(self, p: Point, q: Point) -> float:
        if self.variance == "small":
            return super().noise_std(p, q)
        return math.sqrt(max(0.0, 1.0 - (p.alpha / q.alpha) ** 2))

    def mean_noise_coefficient(self, p: Point, q: Point) -> float:
        # The mean is the posterior mean for either variance: DDIM's η = 1 coefficient.
        c_small = DDIM.noise_std(self, p, q)
        return math.sqrt(max(0.0, q.sigma * q.sigma - c_small * c_small))


@dataclass(frozen=True)
class EulerMaruyama(Solver):
    """Euler–Maruyama on the reverse-time SDE dx = [f(t)·x − g²(t)·∇log p_t(x)] dt + g(t) dw̄
    (Song et al. 2021, eq. 6), in the schedule's own time t, with ∇log p_t = (α·D − x)/σ².

    x_n = x + Δt·(f·x − g²·(α·D − x)/σ²) + sqrt(g²·|Δt|)·z,  Δt = t_n − t < 0.

    The step to σ = 0 returns D (the "denoise" last step of Song et al.'s code).  Strong order ½, weak
    order 1 (declared order 1); 1 model call per step; stochastic.
    """

    name: ClassVar[str] = "euler_maruyama"
    default_spacing: ClassVar[str] = "uniform"
    default_spacing_note: ClassVar[str] = "uniform in t (Song et al. 2021, score SDE)"
    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = True
    reference: ClassVar[str] = "Song et al. 2021 (score SDE), eq. 6; Kloeden & Platen 1992"

    def check(self, points):
        super().check(points)
        for p in points[:-1]:
            if not (math.isfinite(p.drift) and math.isfinite(p.g2)):
                raise ValueError(f"euler_maruyama: the SDE coefficients are not finite at t={p.t} "
                                 f"({type(p).__name__}: f={p.drift}, g²={p.g2}); start the grid lower")

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        p, q = ctx.points[i], ctx.points[i + 1]
        if q.zero:
            return ctx.denoise(x, p), state, 1
        dt = q.t - p.t
        # Drift step on the reverse SDE, fused with the model call.
        c_x = 1.0 + dt * p.drift + dt * p.g2 / (p.sigma * p.sigma)
        c_d = -dt * p.g2 * p.alpha / (p.sigma * p.sigma)
        x_next = ctx.denoise_combine(x, p, c_x, c_d)
        # Diffusion step.
        return x_next.add_(ctx.noise(x), alpha=math.sqrt(max(0.0, -p.g2 * dt))), state, 1

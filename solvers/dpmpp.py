"""DPM-Solver++ (Lu et al. 2022b): exponential integrators in the data prediction D and log-SNR λ.

Notation at step i: h = λ_n − λ (> 0), φ = e^{−h} − 1 (``expm1(-h)``), the past model outputs
D_{i−1}, D_{i−2} at λ_{i−1}, λ_{i−2}.  The first-order update (= DDIM) is
x_n = (σ_n/σ)·x − α_n·φ·D.  Every step to σ = 0 (λ = +inf) returns D: it is first order by nature.

``lower_order_final`` (``"auto"``; True; False) lowers the order of the last steps to the number of steps
left.  ``"auto"`` is True below 15 steps (the diffusers rule) for 2M and 2M SDE, and below 6 steps for 3M
(measured: see :class:`DPMSolverPP3M`).  The order used on every step is reported in
``SampleResult.orders``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import (LogSNRSolver, LowerOrderFinal, StepContext, check_lower_order_final, multistep_order,
                   resolve_lower_order_final)
from .validation import check_real


_PAPER_SPACING = "DPM-Solver++: uniform in log-SNR (Lu et al. 2022)"  # the papers' grid, for every variant

@dataclass(frozen=True)
class DPMSolverPPMultistep(LogSNRSolver):
    """Shared step of DPM-Solver++(2M) and (3M); ``max_order`` is fixed by the subclass."""

    lower_order_final: LowerOrderFinal = "auto"
    solver_type: str = "midpoint"

    max_order: ClassVar[int] = 2
    d2_weight: ClassVar[float] = 2.0  # weight of the second-difference term (see the third-order step)
    lower_final_below: ClassVar[int] = 15  # lower_order_final="auto" lowers the last orders below this many steps
    solver_types: ClassVar[tuple] = ("midpoint", "heun")

    def __post_init__(self):
        check_lower_order_final(self.name, self.lower_order_final)
        if self.solver_type not in self.solver_types:
            names = [repr(v) for v in self.solver_types]
            valid = ", ".join(names[:-1]) + " or " + names[-1]
            raise ValueError(f"{self.name}: solver_type must be {valid} (the form of the second-order step, as "
                             f"diffusers' DPMSolverMultistepScheduler names it), got {self.solver_type!r}")

    def init_state(self, ctx: StepContext):
        lower = resolve_lower_order_final(self.lower_order_final, ctx.steps, self.lower_final_below)
        # solver_type="auto" (3M): the midpoint form where the last orders are lowered, else the φ₂ form.
        heun = self.solver_type == "heun" or (self.solver_type == "auto" and not lower)
        return {"history": [], "lower_final": lower, "heun": heun}

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        p, q = ctx.points[i], ctx.points[i + 1]
        denoised = ctx.denoise(x, p)
        history = state["history"]  # past (D, λ), most recent last
        order = multistep_order(i, ctx.steps, self.max_order, state["lower_final"], q.zero)
        order = min(order, len(history) + 1)
        state = {"history": (history + [(denoised, p.lam)])[-(self.max_order - 1):] if self.max_order > 1 else [],
                 "lower_final": state["lower_final"], "heun": state["heun"]}
        if q.zero:
            return denoised, state, 1
        h = q.lam - p.lam
        phi = math.expm1(-h)
        c_x = q.sigma / p.sigma
        a_phi = q.alpha * phi
        if order == 1:
            # First-order step (DDIM).
            return (x * c_x).add_(denoised, alpha=-a_phi), state, 1
        # Every update is x_n = c_x·x + Σ_k c_k·D_{i−k} with host-side coefficients c_k: one new tensor per
        # step, accumulated in place (fewer batch-sized temporaries and passes than forming d1, d2 first).
        d_prev, lam_prev = history[-1]
        r0 = (p.lam - lam_prev) / h
        if order == 2 and state["heun"]:
            # The φ₂ form (diffusers' solver_type="heun", k-diffusion's 3M SDE warm-up):
            # x_n = c_x·x − α_n·φ·D + α_n·φ₂·d1_0, φ₂ = φ/h + 1.
            c1 = q.alpha * (phi / h + 1.0)
            terms = ((denoised, -a_phi + c1 / r0), (d_prev, -c1 / r0))
        elif order == 2:
            # Second-order multistep step (Lu et al. 2022b, Algorithm 2): x_n = c_x·x − α_n·φ·(D + d1_0/2),
            # d1_0 = (D − D_{i−1})/r0.
            terms = ((denoised, -a_phi * (1.0 + 0.5 / r0)), (d_prev, 0.5 * a_phi / r0))
        else:
            # Third-order multistep step (the DPM-Solver code's multistep_dpm_solver_third_update, with
            # d1 ≈ h·D' and d2 ≈ ½h²·D'').  The exact integral of the quadratic through the last three
            # outputs weighs d2 by 2·φ₃ (φ₃ = (φ + h)/h² − ½ ≈ −h/6, the h³/6·D'' Taylor term); the official
            # code and diffusers weigh it by φ₃, which leaves an O(h³) local error: second order.
            # x_n = c_x·x − α_n·φ·D + c1·d1 + c2·d2 with d1 = (1 + w)·d1_0 − w·d1_1, w = r0/(r0 + r1),
            # d2 = (d1_0 − d1_1)/(r0 + r1), d1_0 = (D − D_{i−1})/r0, d1_1 = (D_{i−1} − D_{i−2})/r1.
            d_prev2, lam_prev2 = history[-2]
            r1 = (lam_prev - lam_prev2) / h
            w = r0 / (r0 + r1)
            c1 = q.alpha * (phi / h + 1.0)
            c2 = -self.d2_weight * q.alpha * ((phi + h) / (h * h) - 0.5)
            u = c1 * (1.0 + w) + c2 / (r0 + r1)  # weight of d1_0
            v = -c1 * w - c2 / (r0 + r1)         # weight of d1_1
            terms = ((denoised, -a_phi + u / r0), (d_prev, -u / r0 + v / r1), (d_prev2, -v / r1))
        x_next = x * c_x
        for tensor, coef in terms:
            x_next.add_(tensor, alpha=coef)
        return x_next, state, order


@dataclass(frozen=True)
class DPMSolverPP2M(DPMSolverPPMultistep):
    """DPM-Solver++(2M): second-order multistep in D and λ (Lu et al. 2022b, Algorithm 2).

    D' = (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1}, r = h_{i−1}/h_i;  x_n = (σ_n/σ)·x − α_n·φ·D'.
    Order 2 (first step order 1); 1 model call per step.
    """

    name: ClassVar[str] = "dpmpp_2m"
    default_spacing_note: ClassVar[str] = _PAPER_SPACING
    order: ClassVar[int] = 2
    max_order: ClassVar[int] = 2
    reference: ClassVar[str] = "Lu et al. 2022b (DPM-Solver++), Algorithm 2"


@dataclass(frozen=True)
class DPMSolverPP3M(DPMSolverPPMultistep):
    """DPM-Solver++(3M): third-order multistep in D and λ (the DPM-Solver code, ``order=3``).

    x_n = (σ_n/σ)·x − α_n·φ₁·D + α_n·φ₂·d1 − w·α_n·φ₃·d2.  The published weight w = 1 (the official code,
    diffusers, k-diffusion's 3M SDE; ``official_d2=True``, the default) is half the Taylor weight: second order
    as the step shrinks.  The consistent weight w = 2 (``official_d2=False``) is the exact integral of the
    quadratic through the last three outputs: third order (tests/solvers/test_convergence.py measures both),
    better from about 40 steps.  The default is the published weight because it is the better one at 5–20
    steps: measured RMS error on the exact mixtures (VP linear, logsnr grid, 256 samples, lower_order_final
    False; ``python -m bench.studies.low_nfe_measure multistep``), published vs consistent, at 10 steps:
    gmm2d 0.094 vs 0.19 (grid ending at σ = 0) and 0.081 vs 0.16 (ending at t = 1e-3); 64-D gmm 0.060 vs
    0.084 and 0.045 vs 0.061; at 20 steps 0.021 vs 0.027, 0.019 vs 0.025, 0.011 vs 0.013, 0.010 vs 0.012.

    ``lower_order_final="auto"`` lowers the last orders below 6 steps only (not below 15 as for 2M): from 6
    steps on, keeping order 3 to the end was better in every measured case (e.g. published weight, 8 steps,
    grid ending at t = 1e-3: gmm2d 0.11 vs 0.22 lowered; 10 steps, ending at σ = 0: 64-D gmm 0.060 vs 0.076),
    at 4–5 steps lowering was better in most.

    ``solver_type`` is the form of the order-2 steps (the warm-up, and lowered final steps): ``"midpoint"``
    (diffusers' default, D + d1_0/2) or ``"heun"`` (the φ₂ form, k-diffusion's 3M SDE warm-up); ``"auto"``
    (the default) takes the midpoint form where the last orders are lowered and the φ₂ form elsewhere.
    Measured against k-diffusion's 3M on its own grids (``python -m bench.studies.low_nfe_measure peers``,
    exact mixtures, 256 samples): the midpoint form everywhere was 0.36–0.93× k-diffusion's error at 5 steps
    but up to 1.07× at 10 (64-D, polyexponential grid); the φ₂ form everywhere equals k-diffusion's at
    10–20 steps and was up to 1.07× worse at 5; ``"auto"`` is never worse than k-diffusion's (0.36–0.93× at
    5 steps, equal at 10–20), though the midpoint form stays 0.6 % better in one of the 24 cases (2-D, 10 steps).

    Order 3 (warm-up steps of order 1 and 2) with ``official_d2=False``; 2 as h → 0 with the published weight;
    1 model call per step.
    """

    official_d2: bool = True
    solver_type: str = "auto"

    solver_types: ClassVar[tuple] = ("auto", "midpoint", "heun")
    name: ClassVar[str] = "dpmpp_3m"
    default_spacing_note: ClassVar[str] = _PAPER_SPACING
    order: ClassVar[int] = 3
    max_order: ClassVar[int] = 3
    lower_final_below: ClassVar[int] = 6
    reference: ClassVar[str] = ("Lu et al. 2022b (DPM-Solver++), §4 and the official code's order-3 multistep "
                                "(official_d2=False: the Taylor-consistent second-difference weight)")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.official_d2, bool):
            raise ValueError(f"dpmpp_3m: official_d2 must be True or False, got {self.official_d2!r}")
        # The declared (convergence) order: the published weight leaves an O(h³) local error.
        object.__setattr__(self, "order", 2 if self.official_d2 else 3)

    @property
    def d2_weight(self) -> float:
        """Weight of the second-difference term: 2 (Taylor-consistent) or 1 (the official code)."""
        return 1.0 if self.official_d2 else 2.0


@dataclass(frozen=True)
class DPMSolverPP2S(LogSNRSolver):
    """DPM-Solver++(2S): second-order singlestep, intermediate point at λ + r·h (r = ½).

    u = (σ_s/σ)·x − α_s·(e^{−rh} − 1)·D;  x_n = (σ_n/σ)·x − α_n·φ·[(1 − 1/(2r))·D + 1/(2r)·D(u, s)].
    Order 2; 2 model calls per step, 1 on the final step to σ = 0.
    """

    r: float = 0.5

    name: ClassVar[str] = "dpmpp_2s"
    default_spacing_note: ClassVar[str] = _PAPER_SPACING
    order: ClassVar[int] = 2
    evals_per_step: ClassVar[int] = 2
    reference: ClassVar[str] = "Lu et al. 2022b (DPM-Solver++), Algorithm 1 (singlestep, order 2)"

    def __post_init__(self):
        check_real("dpmpp_2s", "r", self.r, low=0.0, high=1.0, low_open=True, high_open=True)

    def init_state(self, ctx: StepContext):
        # Intermediate times depend only on the grid: compute their coefficients once, in one vectorised
        # pass (per-step schedule calls cost more than the steps of a small model).
        pts = ctx.points
        steps = [i for i in range(ctx.steps) if not pts[i + 1].zero]
        if not steps:
            return [None] * ctx.steps
        lam_s = torch.tensor([pts[i].lam + self.r * (pts[i + 1].lam - pts[i].lam) for i in steps],
                             dtype=torch.float64)
        mids = iter(ctx.point_list(ctx.schedule.t_from_log_snr(lam_s).tolist()))
        return [next(mids) if not pts[i + 1].zero else None for i in range(ctx.steps)]

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, mids):
        p, q = ctx.points[i], ctx.points[i + 1]
        denoised = ctx.denoise(x, p)
        if q.zero:
            return denoised, mids, 1
        s = mids[i]
        h = q.lam - p.lam
        # Intermediate first-order step to λ + r·h.
        u = (x * (s.sigma / p.sigma)).add_(denoised, alpha=-s.alpha * math.expm1(-self.r * h))
        denoised_s = ctx.denoise(u, s)
        # Second-order step with the intermediate prediction: x_n = (σ_n/σ)·x − α_n·φ·((1 − w)·D + w·D_s).
        w = 1.0 / (2.0 * self.r)
        a_phi = q.alpha * math.expm1(-h)
        x_next = (x * (q.sigma / p.sigma)).add_(denoised, alpha=-a_phi * (1.0 - w))
        return x_next.add_(denoised_s, alpha=-a_phi * w), mids, 2


@dataclass(frozen=True)
class DPMSolverPP2MSDE(LogSNRSolver):
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
    default_spacing_note: ClassVar[str] = _PAPER_SPACING
    order: ClassVar[int] = 1
    stochastic: ClassVar[bool] = True
    reference: ClassVar[str] = "Lu et al. 2022b (DPM-Solver++), §5; k-diffusion sample_dpmpp_2m_sde"

    def __post_init__(self):
        check_real("dpmpp_2m_sde", "eta", self.eta, low=0.0)
        check_lower_order_final(self.name, self.lower_order_final)

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
        # One new tensor per step, accumulated in place (see DPMSolverPPMultistep.step).
        x_next = x * (q.sigma / p.sigma * math.exp(-eta_h))
        if order == 2:
            d_prev, lam_prev = prev
            r = (p.lam - lam_prev) / h
            x_next.add_(denoised, alpha=c_d * (1.0 + 0.5 / r)).add_(d_prev, alpha=-0.5 * c_d / r)
        else:
            x_next.add_(denoised, alpha=c_d)
        if self.eta > 0:
            x_next.add_(ctx.noise(x), alpha=q.sigma * math.sqrt(-math.expm1(-2.0 * eta_h)))
        return x_next, new_state, order

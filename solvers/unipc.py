"""UniPC (Zhao et al. 2023): the multistep predictor UniP and the corrector UniC, in D and log-SNR λ.

Notation at step i from λ_s = λ_i to λ_t = λ_{i+1}: h = λ_t − λ_s, the past model outputs D_i, D_{i−1}, …
at λ_i, λ_{i−1}, …, r_m = (λ_{i−m} − λ_i)/h, and with B(h) = e^{−h} − 1 ("bh2") or −h ("bh1"):

    UniP-p:  x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·D_i − α_t·B(h)·Σ_{m=1}^{p−1} a_m·(D_{i−m} − D_i)/r_m
    UniC-p:  x_t^c = (σ_t/σ_s)·x_s^c − α_t·(e^{−h} − 1)·D_i
                     − α_t·B(h)·[Σ_{m=1}^{p−1} c_m·(D_{i−m} − D_i)/r_m + c_p·(D_t − D_i)]

where the a_m, c_m solve the order conditions Σ_m a_m·r_m^{k−1} = k!·φ_{k+1}(−h)·(−h)/B(h) (UniPC's
Algorithm 2/3; p = 2 takes a_1 = ½ and UniC-1 takes c_1 = ½, as the official code and diffusers do).  D_t is
the model output at the predicted point x_t — the next step's model call — so the corrector costs no model
call: UniPC-p is order p + 1 at one model call per step.  The corrected state x_t^c is what the next
predictor step starts from; the model is not re-evaluated at it.

All coefficients depend on the grid only: they are computed once per grid, on the host, as weights of a
linear combination of x and the stored D's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import numpy as np
import torch

from .base import (LogSNRSolver, LowerOrderFinal, Point, StepContext, check_lower_order_final, multistep_order,
                   resolve_lower_order_final)

__all__ = ["UniPC", "unipc_weights"]


def unipc_weights(s: Point, t: Point, past: list[Point], order: int, variant: str, corrector: bool
                  ) -> tuple[float, list[float]]:
    """Coefficients of one UniP (``corrector=False``) or UniC step from point s to point t.

    Args:
        s, t: the step's ends (λ finite at both).
        past: the points of the earlier outputs D_{i−1}, D_{i−2}, … (most recent first; ``order − 1`` used).
        order: p.
        variant: ``"bh1"`` or ``"bh2"``.
        corrector: UniC (the weights then end with the one of D_t).

    Returns:
        (c_x, w) with x_t = c_x·x_s + Σ_j w_j·D_j over D_i, D_{i−1}, …, D_{i−p+1} (UniP) or
        D_t, D_i, D_{i−1}, …, D_{i−p+1} (UniC).
    """
    h = t.lam - s.lam
    hh = -h  # data prediction: the exponential integrator runs in −λ
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [(past[m].lam - s.lam) / h for m in range(order - 1)] + [1.0]
    # The right-hand sides b_k = k!·h·φ_{k+1}/B(h), by the recursion of the official code.
    h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    big_r = np.array([[r ** (k - 1) for r in rks] for k in range(1, order + 1)])
    if corrector:
        rhos = [0.5] if order == 1 else list(np.linalg.solve(big_r, np.array(b)))
    else:
        rhos = [] if order == 1 else [0.5] if order == 2 else list(np.linalg.solve(big_r[:-1, :-1], np.array(b[:-1])))
    c_x = t.sigma / s.sigma
    scale = -t.alpha * b_h
    # Expand Σ_m ρ_m·(D_{i−m} − D_i)/r_m (+ ρ_p·(D_t − D_i)) into weights of the D's.
    w_past = [scale * rhos[m] / rks[m] for m in range(order - 1)]
    w_now = -t.alpha * h_phi_1 - sum(w_past)
    if corrector:
        w_t = scale * rhos[-1]
        return c_x, [w_t, w_now - w_t] + w_past
    return c_x, [w_now] + w_past


@dataclass(frozen=True)
class UniPC(LogSNRSolver):
    """UniPC multistep (Zhao et al. 2023, Algorithms 2–3; diffusers' ``UniPCMultistepScheduler``).

    Data prediction, B(h) = ``variant`` (``"bh2"``: e^{−h} − 1, the diffusers default and the paper's choice
    for few steps; ``"bh1"``: −h).  Step i: evaluate D at the predicted x_i; correct x_i with UniC (from the
    second step on, with the previous step's order); store D_i; predict x_{i+1} with UniP of order
    min(solver_order, i + 1), lowered to the steps left when ``lower_order_final`` says so (default
    ``"auto"``: below 15 steps, as for DPM-Solver++ here; ``True`` is diffusers' UniPC rule, at every step
    count — its uncorrected first-order last step then makes the method second order as the steps shrink).
    A step to σ = 0 returns D_i (at the predicted x_i, as diffusers does), so the last point is never
    corrected.  ``use_corrector=False`` gives UniP alone.  ``SampleResult.orders`` reports UniP's order p
    of each step.  ``correct_last=True`` also corrects the last point of a grid that does not end at σ = 0, with
    one more model call there (diffusers does this when its σ list repeats the last level: Karras, exponential or
    beta sigmas with ``final_sigmas_type="sigma_min"``).

    Order ``solver_order`` + 1 with the corrector (``solver_order`` 1–3, default 2 → order 3), ``solver_order``
    without; 1 model call per step.
    """

    solver_order: int = 2
    variant: Literal["bh1", "bh2"] = "bh2"
    use_corrector: bool = True
    lower_order_final: LowerOrderFinal = "auto"
    correct_last: bool = False

    name: ClassVar[str] = "unipc"
    default_spacing_note: ClassVar[str] = "UniPC: uniform in log-SNR (Zhao et al. 2023, as DPM-Solver++)"
    order: ClassVar[int] = 3
    reference: ClassVar[str] = "Zhao et al. 2023 (UniPC), Algorithms 2-3 (B(h) variants); diffusers UniPCMultistep"

    def __post_init__(self):
        v = self.solver_order
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 3:
            raise ValueError(f"unipc: solver_order must be an integer from 1 to 3, got {v!r}")
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {self.variant!r}")
        if not isinstance(self.use_corrector, bool):
            raise ValueError(f"unipc: use_corrector must be True or False, got {self.use_corrector!r}")
        check_lower_order_final(self.name, self.lower_order_final)
        if not isinstance(self.correct_last, bool):
            raise ValueError(f"unipc: correct_last must be True or False, got {self.correct_last!r}")
        # The declared order of this configuration (the class attribute is the default configuration's).
        object.__setattr__(self, "order", v + (1 if self.use_corrector else 0))

    def init_state(self, ctx: StepContext):
        pts, lower = ctx.points, resolve_lower_order_final(self.lower_order_final, ctx.steps)
        # correct_last's call at the last point counts as one more step for the lower-order rule (diffusers' σ
        # list holds it as a zero-length step).
        counted = ctx.steps + (1 if self.correct_last and self.use_corrector and not pts[-1].zero else 0)
        orders, predictors, correctors = [], [], []
        for i in range(ctx.steps):
            s, t = pts[i], pts[i + 1]
            order = min(multistep_order(i, counted, self.solver_order, lower, t.zero), i + 1)
            orders.append(order)
            past = [pts[i - m] for m in range(1, order)]
            predictors.append(None if t.zero else unipc_weights(s, t, past, order, self.variant, False))
            # UniC at point i + 1 (applied at the start of step i + 1, once D_{i+1} is known).
            use_c = self.use_corrector and not t.zero and (i + 1 < ctx.steps or self.correct_last)
            correctors.append(unipc_weights(s, t, past, order, self.variant, True) if use_c else None)
        return {"history": [], "x_prev": None, "orders": orders, "predictors": predictors,
                "correctors": correctors}

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        p, q = ctx.points[i], ctx.points[i + 1]
        denoised = ctx.denoise(x, p)
        history = state["history"]  # D_{i−1}, D_{i−2}, … (most recent first)
        corrector: Optional[tuple] = state["correctors"][i - 1] if i > 0 else None
        if corrector is not None and not q.zero:
            # UniC: correct x_i with the model output at the predicted x_i.
            c_x, weights = corrector
            x_c = state["x_prev"] * c_x
            for w, d in zip(weights, [denoised] + history):
                x_c = torch.add(x_c, d, alpha=w)
            x = x_c
        history = ([denoised] + history)[:self.solver_order]
        state = {**state, "history": history, "x_prev": x}
        if q.zero:
            return denoised, state, 1
        # UniP: predict x_{i+1}.
        c_x, weights = state["predictors"][i]
        x_next = x * c_x
        for w, d in zip(weights, history):
            x_next = torch.add(x_next, d, alpha=w)
        if i + 1 == ctx.steps and state["correctors"][i] is not None:  # correct_last: UniC at the last point
            c_x, weights = state["correctors"][i]
            x_c = x * c_x
            for w, d in zip(weights, [ctx.denoise(x_next, q)] + history):
                x_c = torch.add(x_c, d, alpha=w)
            x_next = x_c
        return x_next, state, state["orders"][i]

    def nfe(self, grid, t_zero: float) -> int:
        """One call per step, and one more at the last point with ``correct_last`` (not at σ = 0)."""
        extra = self.correct_last and self.use_corrector and grid[-1] != t_zero
        return super().nfe(grid, t_zero) + (1 if extra else 0)

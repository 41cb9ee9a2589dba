"""Adams–Bashforth methods on the ε-form of the probability-flow ODE: DEIS (tAB/ρAB/log-ρ) and iPNDM.

In the variance-exploding variables x̃ = x/α and ρ = σ/α (EDM's x and σ) the probability-flow ODE is

    dx̃/dρ = ε̂(x̃, ρ) = (x̃ − D)/ρ,

and a step from ρ to ρ_n integrates it exactly, x̃_n = x̃ + ∫_ρ^{ρ_n} ε̂ dρ'.  A multistep method replaces ε̂ by
the polynomial through the last k model outputs ε̂_i, ε̂_{i−1}, … in some variable v(ρ) and integrates that
polynomial exactly, which gives weights w_j with x̃_n = x̃ + Σ_j w_j·ε̂_{i−j}:

* DEIS (Zhang & Chen 2022) — v = t ("tAB", the paper's default), v = ρ ("ρAB") or v = log ρ (diffusers'
  ``DEISMultistepScheduler``, ``solver_type="logrho"``);
* iPNDM (Zhang & Chen 2022, §3.4; k-diffusion's ``sample_ipndm``) — the classic constant-step Adams–Bashforth
  weights (3/2, −1/2), (23, −16, 5)/12, (55, −59, 37, −9)/24 applied to ρ_n − ρ whatever the step sizes, or
  with ``variable_step=True`` the exact variable-step weights (k-diffusion's ``sample_ipndm_v``, = ρAB).

All weights depend on the grid only: they are computed once per grid, on the host, in ``init_state``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import numpy as np
import torch

from .base import (LowerOrderFinal, Solver, StepContext, check_lower_order_final, multistep_order,
                   resolve_lower_order_final)
from .schedules import Schedule

__all__ = ["DEIS", "IPNDM", "adams_weights"]

# Constant-step Adams–Bashforth weights (most recent output first).
AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}

_GAUSS_NODES = 24   # per panel: the log-ρ integrands are entire (polynomial × e^u), exact to rounding
_T_PANELS = 16      # t(ρ) is only piecewise smooth on DiscreteVP (log α is interpolated linearly)


def _lagrange_basis(nodes: Sequence[float], v: np.ndarray) -> np.ndarray:
    """L_j(v) for the Lagrange basis on ``nodes``: array (len(nodes), len(v))."""
    out = np.ones((len(nodes), v.size))
    for j, vj in enumerate(nodes):
        for k, vk in enumerate(nodes):
            if k != j:
                out[j] *= (v - vk) / (vj - vk)
    return out


def adams_weights(rho_nodes: Sequence[float], rho_from: float, rho_to: float, variable: str,
                  schedule: Schedule | None = None) -> list[float]:
    """Weights w_j = ∫_{ρ_from}^{ρ_to} L_j(v(ρ)) dρ of the polynomial through the nodes in the variable v.

    Args:
        rho_nodes: ρ = σ/α of the past model outputs, most recent first (``rho_nodes[0] == rho_from``).
        rho_from, rho_to: the step's ends (ρ_to may be 0 for ``"rho"``).
        variable: ``"rho"``, ``"logrho"`` or ``"t"`` (the schedule's time, through ``schedule``).
        schedule: needed for ``"t"``.

    Returns:
        One weight per node.  With one node the weight is ρ_to − ρ_from (Euler) for every variable.
    """
    if len(rho_nodes) == 1:
        return [rho_to - rho_from]
    g, gw = np.polynomial.legendre.leggauss(_GAUSS_NODES)
    if variable == "rho":
        # A polynomial in ρ: Gauss–Legendre in ρ is exact.
        rho = 0.5 * (rho_to - rho_from) * g + 0.5 * (rho_to + rho_from)
        basis = _lagrange_basis(list(rho_nodes), rho)
        return list(basis @ gw * 0.5 * (rho_to - rho_from))
    if not (rho_from > 0 and rho_to > 0):
        raise ValueError(f"adams_weights: variable {variable!r} needs ρ > 0 at both ends, got {rho_from}, {rho_to}")
    # Integrate in u = log ρ (dρ = e^u du): the integrand is smooth even when the step spans decades of ρ.
    u0, u1 = math.log(rho_from), math.log(rho_to)
    panels = 1 if variable == "logrho" else _T_PANELS
    edges = np.linspace(u0, u1, panels + 1)
    u = np.concatenate([0.5 * (b - a) * g + 0.5 * (b + a) for a, b in zip(edges[:-1], edges[1:])])
    w = np.concatenate([gw * 0.5 * (b - a) for a, b in zip(edges[:-1], edges[1:])]) * np.exp(u)
    if variable == "logrho":
        basis = _lagrange_basis([math.log(r) for r in rho_nodes], u)
    elif variable == "t":
        if schedule is None:
            raise ValueError("adams_weights: variable 't' needs the schedule")
        to_t = lambda r: schedule.t_from_sigma_ve(torch.as_tensor(r, dtype=torch.float64)).numpy()  # noqa: E731
        basis = _lagrange_basis(list(to_t(np.asarray(rho_nodes))), to_t(np.exp(u)))
    else:
        raise ValueError(f"adams_weights: unknown variable {variable!r}; valid: rho, logrho, t")
    return list(basis @ w)


class _VEMultistep(Solver):
    """Shared pieces: ρ must be finite wherever the model is evaluated; ε̂ history; the step itself."""

    def check(self, points):
        super().check(points)
        for p in points[:-1]:
            if not math.isfinite(p.sigma_ve):
                raise ValueError(f"{self.name} steps in ρ = σ/α, which is infinite at t={p.t} (α = 0 there); "
                                 f"start the grid just below it or use euler/heun")

    def _check_solver_order(self, highest: int, declared: int) -> None:
        v = self.solver_order
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= highest:
            raise ValueError(f"{self.name}: solver_order must be an integer from 1 to {highest}, got {v!r}")
        # The declared order is the configuration's (the class attribute is the default configuration's).
        object.__setattr__(self, "order", declared)

    def _ab_step(self, ctx: StepContext, i: int, x: torch.Tensor, state: dict):
        """One step x̃_n = x̃ + Σ_j w_j·ε̂_{i−j} with the precomputed weights of step i."""
        p, q = ctx.points[i], ctx.points[i + 1]
        denoised = ctx.denoise(x, p)
        eps = torch.add(x, denoised, alpha=-p.alpha) / p.sigma  # ε̂ = (x − α·D)/σ = dx̃/dρ
        history = ([eps] + state["history"])[:self.solver_order]
        state = {**state, "history": history}
        weights, order = state["weights"][i], state["orders"][i]
        if weights is None:
            # Step to σ = 0 (first order by nature in log ρ): the Euler step lands on D.
            return denoised, state, 1
        # Adams–Bashforth step in x̃ = x/α.
        x_next = x / p.alpha
        for w, e in zip(weights, history):
            x_next = torch.add(x_next, e, alpha=w)
        return x_next * q.alpha, state, order


@dataclass(frozen=True)
class DEIS(_VEMultistep):
    """DEIS multistep (Zhang & Chen 2022, "tAB-DEIS"/"ρAB-DEIS"; diffusers' ``DEISMultistepScheduler``).

    x̃_n = x̃ + Σ_j w_j·ε̂_{i−j}, w_j = ∫_ρ^{ρ_n} L_j(v) dρ with L_j the Lagrange basis through the last
    ``solver_order`` outputs in the variable v = ``variable``: ``"logrho"`` (diffusers' only choice, the
    default), ``"rho"`` or ``"t"`` (the schedule's time; the paper's tAB).  Warm-up: step i has order
    min(solver_order, i + 1); ``lower_order_final`` (``"auto"`` = below 15 steps, diffusers' rule) lowers the
    last steps to the number of steps left.  A step to σ = 0 returns D (log ρ = −∞ there).

    Order ``solver_order`` (1–3, default 2 as in diffusers); 1 model call per step.
    """

    solver_order: int = 2
    variable: Literal["logrho", "rho", "t"] = "logrho"
    lower_order_final: LowerOrderFinal = "auto"

    name: ClassVar[str] = "deis"
    order: ClassVar[int] = 2
    reference: ClassVar[str] = "Zhang & Chen 2022 (DEIS), §4 (tAB/ρAB); diffusers DEISMultistepScheduler (logrho)"

    def __post_init__(self):
        self._check_solver_order(3, self.solver_order)
        if self.variable not in ("logrho", "rho", "t"):
            raise ValueError(f"deis: variable must be 'logrho', 'rho' or 't', got {self.variable!r}")
        check_lower_order_final(self.name, self.lower_order_final)

    def init_state(self, ctx: StepContext):
        pts, lower = ctx.points, resolve_lower_order_final(self.lower_order_final, ctx.steps)
        weights, orders = [], []
        for i in range(ctx.steps):
            q = pts[i + 1]
            order = min(multistep_order(i, ctx.steps, self.solver_order, lower, q.zero), i + 1)
            orders.append(order)
            if q.zero:
                weights.append(None)
                continue
            nodes = [pts[i - j].sigma_ve for j in range(order)]
            weights.append(adams_weights(nodes, pts[i].sigma_ve, q.sigma_ve, self.variable, ctx.schedule))
        return {"history": [], "weights": weights, "orders": orders}

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        return self._ab_step(ctx, i, x, state)


@dataclass(frozen=True)
class IPNDM(_VEMultistep):
    """iPNDM: Adams–Bashforth on dx̃/dρ = ε̂ (Zhang & Chen 2022, §3.4; k-diffusion's ``sample_ipndm``).

    Step i uses order min(solver_order, i + 1) with the constant-step weights
    x̃_n = x̃ + (ρ_n − ρ)·(55·ε̂_i − 59·ε̂_{i−1} + 37·ε̂_{i−2} − 9·ε̂_{i−3})/24 (order 4; lower orders alike).
    Those weights are exact for constant steps in ρ only: on any other grid (log-SNR, Karras, …) the weight
    error is O(h) times a first difference of ε̂, an O(h³) local error, so the method is second order as the
    steps shrink (measured in tests/solvers/test_multistep_orders.py) — declared order min(solver_order, 2).  It is
    order ``solver_order`` on grids uniform in ρ.  ``variable_step=True`` uses the exact variable-step
    weights ∫ L_j(ρ) dρ (k-diffusion's ``sample_ipndm_v``; = DEIS with ``variable="rho"``): order
    ``solver_order`` on any smooth grid.

    Unlike the λ- and log-ρ-based solvers, the polynomial in ρ stays finite at ρ = 0, so the step to σ = 0 is
    an Adams–Bashforth step of the same order (as in k-diffusion), not a return of D.  No lower-order final
    steps.

    ``solver_order`` 1–4 (default 4); declared order min(solver_order, 2), or solver_order with
    ``variable_step``; 1 model call per step.
    """

    solver_order: int = 4
    variable_step: bool = False

    name: ClassVar[str] = "ipndm"
    order: ClassVar[int] = 2
    reference: ClassVar[str] = ("Zhang & Chen 2022 (DEIS), §3.4 (iPNDM); k-diffusion sample_ipndm / "
                                "sample_ipndm_v")

    def __post_init__(self):
        if not isinstance(self.variable_step, bool):
            raise ValueError(f"ipndm: variable_step must be True or False, got {self.variable_step!r}")
        self._check_solver_order(4, self.solver_order if self.variable_step else min(self.solver_order, 2))

    def init_state(self, ctx: StepContext):
        pts = ctx.points
        weights, orders = [], []
        for i in range(ctx.steps):
            p, q = pts[i], pts[i + 1]
            order = min(self.solver_order, i + 1)
            orders.append(order)
            if self.variable_step:
                nodes = [pts[i - j].sigma_ve for j in range(order)]
                weights.append(adams_weights(nodes, p.sigma_ve, q.sigma_ve, "rho"))
            else:
                weights.append([(q.sigma_ve - p.sigma_ve) * w for w in AB_WEIGHTS[order]])
        return {"history": [], "weights": weights, "orders": orders}

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        return self._ab_step(ctx, i, x, state)

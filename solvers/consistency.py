"""Consistency sampling (Song et al. 2023): one step x0 = f(x_T, T), or multistep with re-noising."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Solver, StepContext
from .validation import check_real


@dataclass(frozen=True)
class Consistency(Solver):
    """Consistency-model sampling (Song et al. 2023, Algorithm 1).

    The model must be a consistency function f(x, t) ≈ the probability-flow ODE's end point, wrapped as a
    ``DiffusionModel`` with ``prediction="x0"``.  Step i evaluates x0 = f(x, t_i); unless the next point is
    the last, it re-noises to the next time with the forward process, x = α_n·x0 + sqrt(σ_n² − α_n²·σ_b²)·z
    (σ_b = ``sigma_boundary``, the consistency model's ε: 0.002 for EDM-style models, where Song et al.
    re-noise with sqrt(τ² − ε²)).  With one step (grid [T, t_zero]) this is one-step generation, with
    no noise at all.

    No ODE order (it is exact for an exact consistency function); 1 model call per step; stochastic when
    it has more than one step.
    """

    sigma_boundary: float = 0.0

    name: ClassVar[str] = "consistency"
    order: ClassVar[None] = None
    stochastic: ClassVar[bool] = True
    reference: ClassVar[str] = "Song, Dhariwal, Chen & Sutskever 2023 (Consistency Models), Algorithm 1"

    def __post_init__(self):
        check_real("consistency", "sigma_boundary", self.sigma_boundary, low=0.0)

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        p, q = ctx.points[i], ctx.points[i + 1]
        x0 = ctx.denoise(x, p)
        if q.zero or i == ctx.steps - 1:
            return x0, state, 1
        # Re-noise to the next time.
        std = math.sqrt(max(0.0, q.sigma ** 2 - (q.alpha * self.sigma_boundary) ** 2))
        return torch.add(x0 * q.alpha, ctx.noise(x), alpha=std), state, 1

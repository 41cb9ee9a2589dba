"""Langevin dynamics on the score: annealed Langevin sampling and predictor–corrector sampling.

One Langevin step at a noise level t targets the marginal p_t (Song et al. 2021, Algorithm 5, "Langevin
corrector"):

    s = ∇log p_t(x) = (α·D(x, t) − x)/σ²,   z ~ N(0, I),   x ← x + δ·s + sqrt(2δ)·z,

with the step size δ from one of two rules (``step_rule``, default ``"sigma2"``: stable in any dimension),
both set by the target signal-to-noise ratio r = ``snr``:

* ``"snr"`` — δ = 2·(r·‖z‖/‖s‖)² per sample: the step whose ratio ‖δ·s‖/‖sqrt(2δ)·z‖ is r (Song et al.
  2021).  Song et al.'s code averages the two norms over the batch, which couples the samples; here they
  are each sample's own, so sample i never depends on its batch.  In high dimension both norms concentrate
  (‖z‖² ≈ d, ‖s‖² ≈ d/v with v the variance of p_t along the sample) and δ ≈ 2r²·v.  In low dimension
  they do not: on a 2-D mixture ‖z‖²/‖s‖² is heavy-tailed (a ratio of two χ²₂-like variables), a few
  percent of the steps exceed the stability limit δ < 2v, and the chain blows up — use ``"sigma2"`` there.
* ``"sigma2"`` — δ = 2·r²·σ², the same for every sample: annealed Langevin's step ∝ σ² (Song & Ermon 2019,
  Algorithm 1: α_i = ε·σ_i²/σ_L², i.e. δ = α_i/2), with the constant the "snr" rule gives where p_t is
  close to N(·, σ²): a deterministic schedule, stable whatever the dimension (δ/v ≤ 2r²).

Song et al.'s VP corrector also multiplies δ by α_i = 1 − β_i of their 1000-step discretisation (within
2% of 1 on the linear schedule).  Both rules above give the same chain in x and in x/α (δ scales with α²),
so no such factor is applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Sequence

import torch

from .base import Point, Solver, StepContext
from .registry import available_solvers, get_solver, solver_class

__all__ = ["Langevin", "PredictorCorrector", "langevin_step"]

STEP_RULES = ("snr", "sigma2")


def langevin_step(ctx: StepContext, x: torch.Tensor, p: Point, snr: float, rule: str = "snr") -> torch.Tensor:
    """One Langevin step at point p (one model call); ``rule`` picks the step size δ (module docstring)."""
    denoised = ctx.denoise(x, p)
    score = torch.add(denoised * p.alpha, x, alpha=-1.0) / (p.sigma * p.sigma)
    z = ctx.noise(x)
    if rule == "sigma2":
        # δ = 2·r²·σ²: the same for every sample.
        delta = 2.0 * snr * snr * p.sigma * p.sigma
        return x + delta * score + math.sqrt(2.0 * delta) * z
    shape = (-1,) + (1,) * (x.dim() - 1)
    z_norm = z.reshape(x.shape[0], -1).norm(dim=1)
    # A zero score (x exactly at a mode of p_t) would give δ = ∞: such a sample takes no step.
    s_norm = score.reshape(x.shape[0], -1).norm(dim=1)
    delta = torch.where(s_norm > 0, 2.0 * (snr * z_norm / s_norm.clamp_min(1e-300)) ** 2, torch.zeros_like(s_norm))
    delta = delta.reshape(shape)
    # Langevin step.
    return x + delta * score + torch.sqrt(2.0 * delta) * z


def _check_positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def _check_snr(owner: str, value, rule) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{owner}: snr must be a positive number, got {value!r}")
    if rule not in STEP_RULES:
        raise ValueError(f"{owner}: step_rule must be one of {', '.join(STEP_RULES)}, got {rule!r}")


@dataclass(frozen=True)
class Langevin(Solver):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) with the SNR step rule above.

    Step i runs ``steps_per_level`` Langevin steps at the noise level t_i and hands x unchanged to the next
    level (Song et al.'s corrector-only sampler, predictor "none"; on a VP schedule x keeps its scale, which
    changes little between neighbouring levels, whereas x/α would have to shrink by α_i/α_{i+1}).  A step to
    σ = 0 runs its Langevin steps and returns the denoised D(x, t_i) — one more model call (the final
    denoising step of Song et al.'s and Jolicoeur-Martineau et al.'s samplers).  No ODE or SDE is
    discretised, so no order.

    NFE: ``steps_per_level`` × steps, + 1 on a grid that ends at σ = 0.  Stochastic.
    """

    steps_per_level: int = 5
    snr: float = 0.16
    step_rule: Literal["snr", "sigma2"] = "sigma2"

    name: ClassVar[str] = "langevin"
    can_predict: ClassVar[bool] = False  # a corrector: it stays at one noise level
    order: ClassVar[None] = None
    stochastic: ClassVar[bool] = True
    reference: ClassVar[str] = ("Song & Ermon 2019 (NCSN), Algorithm 1; step rule of Song et al. 2021 "
                                "(score SDE), Algorithm 5")

    def __post_init__(self):
        _check_positive_int(self.name, "steps_per_level", self.steps_per_level)
        _check_snr(self.name, self.snr, self.step_rule)

    def nfe(self, grid: Sequence[float], t_zero: float) -> int:
        return (len(grid) - 1) * self.steps_per_level + (1 if grid[-1] == t_zero else 0)

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        p, q = ctx.points[i], ctx.points[i + 1]
        for _ in range(self.steps_per_level):
            x = langevin_step(ctx, x, p, self.snr, self.step_rule)
        if q.zero:
            # Final denoising step.
            return ctx.denoise(x, p), state, 1
        return x, state, 1


@dataclass(frozen=True)
class PredictorCorrector(Solver):
    """Predictor–corrector sampling (Song et al. 2021, Algorithms 2–4): any registered solver as the
    predictor, followed at every level it reaches by ``corrector_steps`` Langevin steps at that level.

    Step i: x ← predictor step t_i → t_{i+1} (its own state, noise and order); then, unless t_{i+1} is σ = 0,
    ``corrector_steps`` Langevin corrector steps at t_{i+1}.  So the corrector runs at every level after
    the first, including a last level with σ > 0 (a grid with ``denoise_to_zero=False``), as in the paper's
    Algorithm 2; on a grid ending at σ = 0 the last step is the predictor's alone (its denoising step).
    Song et al.'s code corrects *before* each predictor step instead (at levels t_0 … t_{N−1}): the same
    number of corrector steps with one level shifted.  A multistep predictor keeps its history of model
    outputs from before the correction (as UniPC does with its own corrector).

    Options: ``predictor`` (a registered name), ``predictor_options`` (its options), ``corrector``
    (``"langevin"``), ``corrector_steps``, ``snr``.
    NFE: the predictor's + ``corrector_steps`` × (steps whose end point has σ > 0).  Stochastic; the order
    reported per step is the predictor's; the sampler itself is declared without an order.
    """

    predictor: str = "euler_maruyama"
    predictor_options: dict = field(default_factory=dict)
    corrector: str = "langevin"
    corrector_steps: int = 1
    snr: float = 0.16
    step_rule: Literal["snr", "sigma2"] = "sigma2"

    name: ClassVar[str] = "pc"
    can_predict: ClassVar[bool] = False  # built of a predictor already
    order: ClassVar[None] = None
    stochastic: ClassVar[bool] = True
    reference: ClassVar[str] = "Song et al. 2021 (score SDE), Algorithms 2-5 (predictor-corrector sampling)"

    def __post_init__(self):
        if not isinstance(self.predictor, str) or not solver_class(self.predictor).can_predict:
            others = ", ".join(n for n in available_solvers(aliases=False) if not solver_class(n).can_predict)
            raise ValueError(f"pc: predictor must be a registered fixed-grid solver other than {others}, got "
                             f"{self.predictor!r}")
        if not isinstance(self.predictor_options, dict):
            raise ValueError(f"pc: predictor_options must be a dict of the predictor's options, got "
                             f"{type(self.predictor_options).__name__}")
        if self.corrector != "langevin":
            raise ValueError(f"pc: corrector must be 'langevin' (the only corrector), got {self.corrector!r}")
        _check_positive_int(self.name, "corrector_steps", self.corrector_steps)
        _check_snr(self.name, self.snr, self.step_rule)
        object.__setattr__(self, "_predictor", get_solver(self.predictor, **self.predictor_options))

    @property
    def predictor_solver(self) -> Solver:
        """The configured predictor."""
        return self._predictor

    def nfe(self, grid: Sequence[float], t_zero: float) -> int:
        corrected = sum(1 for t in grid[1:] if t != t_zero)
        return self._predictor.nfe(grid, t_zero) + self.corrector_steps * corrected

    def check(self, points: list[Point]) -> None:
        self._predictor.check(points)
        for p in points[1:]:
            if not p.zero and p.conv is None:
                raise ValueError(f"pc: the corrector cannot evaluate the model at t={p.t}: {p.conv_error}")

    def init_state(self, ctx: StepContext):
        return self._predictor.init_state(ctx)

    def step(self, ctx: StepContext, i: int, x: torch.Tensor, state):
        q = ctx.points[i + 1]
        # Predictor step.
        x, state, order = self._predictor.step(ctx, i, x, state)
        if not q.zero:
            # Corrector steps at the new level.
            for _ in range(self.corrector_steps):
                x = langevin_step(ctx, x, q, self.snr, self.step_rule)
        return x, state, order

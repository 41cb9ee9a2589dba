"""diffusers' schedulers as peers of our solvers: the same method, time points and network, for parity and timing.

Used by ``tests/peers/test_peers_diffusers.py`` (parity to float64 rounding where diffusers allows it) and by
``python -m bench.perf`` (overhead and end-to-end throughput, both loops timed in one process).

What makes a comparison exact (see also ``../shared/PEERS.md``):

* **float64 tables.**  diffusers builds β, ᾱ and σ = sqrt((1 − ᾱ)/ᾱ) in float32.  :func:`make_scheduler`
  replaces them by the same formulas in float64 (Ho et al.'s linear β from 1e-4 to 0.02, identical to
  :meth:`solvers.schedules.DiscreteVP.linear`), and :func:`set_timesteps` re-evaluates the scheduler's own σ
  table in float64 at its own timesteps.  The values are the same to float32 rounding (checked); only the
  rounding goes.
* **the same grid.**  :func:`our_grid` turns the scheduler's time points into our solver times: integer
  timesteps stay integers (+ ``t_zero = −1``, the ᾱ = 1 point of ``set_alpha_to_one``/``final_sigmas_type=
  "zero"``, or 0 for ``"sigma_min"``); the σ-schedulers (Euler, Heun), whose timesteps are fractional and
  whose σ is interpolated linearly in σ rather than in log α, are matched by noise level: t = the time at
  which our schedule has their σ (``schedule.t_from_sigma_ve``).
* **the same start.**  Our state is the VP sample x (std 1 at the start); the σ-schedulers work on
  x/α = x·sqrt(σ² + 1).  :func:`peer_start` converts (diffusers itself would multiply by
  ``init_noise_sigma``, which is σ_max, not sqrt(σ_max² + 1), under "linspace"/"trailing" spacing).
* **the same noise.**  Our stochastic solvers draw sample i's noise from its own CPU generator
  (``SeedStreams(seeds, STREAM_SOLVER)``), one ``randn(sample_shape)`` per step.  diffusers' ``randn_tensor``
  given a *list* of generators draws row i as ``randn((1, *sample_shape), generator=generators[i])``: the
  same numbers in the same order.  So passing ``SeedStreams(...).generators`` as ``generator=`` reproduces our
  noise exactly, without copying tensors around (:func:`solver_generators`).
"""
from __future__ import annotations

import math

import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from solvers.noise import STREAM_SOLVER, SeedStreams, as_seeds
from solvers.schedules import DiscreteVP

__all__ = ["PEERS", "PeerSpec", "import_diffusers", "make_scheduler", "set_timesteps", "our_grid",
           "peer_start", "solver_generators", "run_peer", "TimedFn"]

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


class PeerSpec:
    """One of our solvers and the diffusers scheduler that implements the same method.

    Attributes:
        solver: our solver's name; ``options``: its options.
        scheduler: the diffusers class name; ``config``: its constructor options; ``step_kwargs``: extra
            arguments of its ``step``.
        note: how the two differ, if at all.
    """

    def __init__(self, solver: str, scheduler: str, config: dict, *, options: Optional[dict] = None,
                 step_kwargs: Optional[dict] = None, note: str = ""):
        self.solver, self.scheduler, self.config = solver, scheduler, dict(config)
        self.options = dict(options or {})
        self.step_kwargs = dict(step_kwargs or {})
        self.note = note

    @property
    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.solver}({opts})" if opts else self.solver


# DDIM's own prev_timestep = t − N // steps is only right for "leading" spacing (PEERS.md); steps_offset=0
# makes DDPM's last timestep 0, where diffusers adds no noise (with offset 1 its last step to ᾱ = 1 from
# t = 1 would add noise under "fixed_large"; ours never adds noise on the step to σ = 0).
_DISCRETE = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_schedule": "linear", "beta_start": BETA_START,
             "beta_end": BETA_END, "clip_sample": False, "timestep_spacing": "leading", "steps_offset": 0}
_DPM = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_schedule": "linear", "beta_start": BETA_START,
        "beta_end": BETA_END, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero",
        "lower_order_final": True}
_SIGMA = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_schedule": "linear", "beta_start": BETA_START,
          "beta_end": BETA_END}

PEERS: dict[str, PeerSpec] = {
    "ddim": PeerSpec("ddim", "DDIMScheduler", {**_DISCRETE, "set_alpha_to_one": True}, options={"eta": 0.0},
                     step_kwargs={"eta": 0.0}),
    "ddim_eta1": PeerSpec("ddim", "EulerAncestralDiscreteScheduler", _SIGMA, options={"eta": 1.0},
                          note="DDIM η = 1 is k-diffusion's ancestral Euler step in x/α, σ/α"),
    "ddpm": PeerSpec("ddpm", "DDPMScheduler", {**_DISCRETE, "variance_type": "fixed_small"},
                     options={"variance": "small"}),
    "dpmpp_2m": PeerSpec("dpmpp_2m", "DPMSolverMultistepScheduler", {**_DPM, "solver_order": 2}),
    "dpmpp_3m": PeerSpec("dpmpp_3m", "DPMSolverMultistepScheduler", {**_DPM, "solver_order": 3},
                         options={"official_d2": True, "solver_type": "midpoint"},
                         note="diffusers' (and the official code's) second-difference weight: official_d2=True; "
                              "its default order-2 form: solver_type='midpoint'"),
    "dpmpp_2s": PeerSpec("dpmpp_2s", "DPMSolverSinglestepScheduler", {**_DPM, "solver_order": 2},
                         note="same method family and cost per model call; diffusers' intermediate point is "
                              "the next grid timestep, ours the λ-midpoint, so the samples differ"),
    "euler": PeerSpec("euler", "EulerDiscreteScheduler", _SIGMA),
    "heun": PeerSpec("heun", "HeunDiscreteScheduler", _SIGMA),
}


def import_diffusers():
    """Import diffusers (an optional, test-only dependency) or raise ImportError saying how to get it."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised only without diffusers
        raise ImportError("the peer comparisons need diffusers: pip install -e '.[test]'") from e
    return diffusers


def linear_schedule() -> DiscreteVP:
    """Our schedule with the exact float64 values that :func:`make_scheduler` gives diffusers."""
    return DiscreteVP.linear(NUM_TRAIN_TIMESTEPS, BETA_START, BETA_END)


def make_scheduler(name: str, **config):
    """A diffusers scheduler by class name, with its β/ᾱ tables (and derived ones) in float64.

    Args:
        name: a class name in ``diffusers`` (e.g. ``"DDIMScheduler"``).
        **config: constructor options; must describe the linear β schedule of :func:`linear_schedule`.

    Returns:
        The scheduler, ready for :func:`set_timesteps`.
    """
    diffusers = import_diffusers()
    sched = getattr(diffusers, name)(**config)
    cfg = sched.config
    if (cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end) != (
            NUM_TRAIN_TIMESTEPS, "linear", BETA_START, BETA_END):
        raise ValueError(f"make_scheduler supports the linear schedule {BETA_START}..{BETA_END} over "
                         f"{NUM_TRAIN_TIMESTEPS} steps only (it replaces diffusers' float32 tables by float64)")
    alphas_cumprod = linear_schedule().alphas_cumprod.clone()
    betas = torch.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    if not torch.allclose(alphas_cumprod, sched.alphas_cumprod.double(), rtol=1e-5, atol=0):
        raise RuntimeError("diffusers' ᾱ table is not the linear schedule it was configured with")
    sched.betas, sched.alphas, sched.alphas_cumprod = betas, 1.0 - betas, alphas_cumprod
    if hasattr(sched, "alpha_t"):  # the DPM-Solver schedulers keep α, σ, λ tables too
        sched.alpha_t = alphas_cumprod.sqrt()
        sched.sigma_t = (1.0 - alphas_cumprod).sqrt()
        sched.lambda_t = sched.alpha_t.log() - sched.sigma_t.log()
    return sched


def set_timesteps(sched, steps: int) -> None:
    """``sched.set_timesteps(steps)``, then its σ table (if any) re-evaluated in float64.

    diffusers interpolates σ = sqrt((1 − ᾱ)/ᾱ) linearly in the (possibly fractional) timestep and rounds
    the table to float32; the same interpolation is redone here in float64 at the same timesteps.
    """
    for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas"):
        if getattr(sched.config, option, False):
            raise ValueError(f"set_timesteps re-evaluates diffusers' default σ table only; {option}=True is not "
                             "supported here")
    sched.set_timesteps(steps)
    if not hasattr(sched, "sigmas"):
        return
    abar = sched.alphas_cumprod.double().numpy()
    table = np.sqrt((1.0 - abar) / abar)
    levels = np.interp(sched.timesteps.double().numpy(), np.arange(table.size), table)
    last = float(sched.sigmas[-1])
    sigmas = torch.from_numpy(np.concatenate([levels, [0.0 if last == 0.0 else table[0]]]))
    if sigmas.shape != sched.sigmas.shape or not torch.allclose(sigmas, sched.sigmas.double(), rtol=1e-6):
        raise RuntimeError(f"{type(sched).__name__}: its σ table is not the interpolation this helper "
                             "assumes; update bench/studies/peers.set_timesteps")
    sched.sigmas = sigmas


def _sigma_levels(sched) -> list[float]:
    """The distinct noise levels σ of a σ-scheduler's grid, in order (Heun's are duplicated)."""
    return torch.unique_consecutive(sched.sigmas.double()).tolist()


def our_grid(sched, schedule: DiscreteVP) -> list[float]:
    """Our solver's grid for the time points of a scheduler after :func:`set_timesteps`.

    Integer-time schedulers (DDIM, DDPM, DPM-Solver): their timesteps, then −1 (ᾱ = 1) or, for
    ``final_sigmas_type="sigma_min"``, 0.  σ-schedulers (Euler, Heun): the times at which ``schedule`` has
    their σ levels, then −1.
    """
    sigma_based = type(sched).__name__.startswith(("Euler", "Heun"))
    if not sigma_based:
        ts = [float(v) for v in sched.timesteps.tolist()]
        final = getattr(sched.config, "final_sigmas_type", "zero")
        return ts + [0.0 if final == "sigma_min" else schedule.t_zero]
    levels = _sigma_levels(sched)
    if levels[-1] != 0.0:
        raise ValueError("our_grid: a σ-scheduler's grid must end at σ = 0")
    ts = schedule.t_from_sigma_ve(torch.tensor(levels[:-1], dtype=torch.float64)).tolist()
    # The inverse is exact to rounding only: keep the end levels inside the range the model is trained on.
    ts = [min(max(t, schedule.t_min), schedule.t_max) for t in ts]
    return ts + [schedule.t_zero]


def peer_start(sched, x_T: torch.Tensor, schedule: DiscreteVP, t_start: float) -> torch.Tensor:
    """The scheduler's starting sample for our starting state ``x_T`` at time ``t_start``.

    σ-schedulers work on x/α; the others on x itself.
    """
    if type(sched).__name__.startswith(("Euler", "Heun")):
        return x_T / float(schedule.alpha(t_start))
    return x_T.clone()


def solver_generators(seeds: Sequence[int], batch: int) -> list[torch.Generator]:
    """Generators that make diffusers draw exactly the noise our stochastic solvers draw for ``seeds``."""
    return SeedStreams(as_seeds(seeds, batch), STREAM_SOLVER).generators


class TimedFn:
    """Wrap a network ``fn(x, t)``: count its calls and add up the wall-clock time spent in it."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.fn(x, t)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def run_peer(sched, fn: Callable[[torch.Tensor, Any], torch.Tensor], sample: torch.Tensor, *,
             generator=None, step_kwargs: Optional[dict] = None) -> torch.Tensor:
    """The diffusers sampling loop of its pipelines, on a scheduler whose timesteps are set.

    For every timestep t: ``out = fn(scale_model_input(x, t), t)``, ``x = step(out, t, x).prev_sample``
    (the loop of ``DDPMPipeline``/``DDIMPipeline`` and of the Stable Diffusion pipelines).

    Args:
        sched: a scheduler after :func:`set_timesteps`.
        fn: the network, called as ``fn(x, t)`` with t one of ``sched.timesteps`` (a 0-dim tensor).
        sample: the starting sample (see :func:`peer_start`).
        generator: passed to ``step`` where the scheduler draws noise.
        step_kwargs: extra arguments of ``step`` (e.g. ``eta`` for DDIM).

    Returns:
        The final sample.
    """
    kwargs = dict(step_kwargs or {})
    if generator is not None:
        kwargs["generator"] = generator
    x = sample
    for t in sched.timesteps:
        out = fn(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **kwargs).prev_sample
    return x


class SigmaModel:
    """A Gaussian mixture's exact ε as a network: ``fn(x, t)`` evaluates it at the noise level σ̃ = ``sigma_of(t)``.

    Each side of a parity test maps its own time input to σ̃; the model records every σ̃ it is called at, so
    the two sides' calls can be compared one by one.
    """

    def __init__(self, mixture, sigma_of: Callable[[float], float]):
        self.mixture = mixture
        self.sigma_of = sigma_of
        self.levels: list[float] = []

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        times = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        if not bool((times == times[0]).all()):
            raise ValueError("SigmaModel expects one time per call")
        s_ve = float(self.sigma_of(float(times[0])))
        self.levels.append(s_ve)
        alpha = 1.0 / math.sqrt(1.0 + s_ve * s_ve)
        sigma = s_ve * alpha
        x0 = self.mixture.denoise(x, alpha, sigma)
        return (x - alpha * x0) / sigma

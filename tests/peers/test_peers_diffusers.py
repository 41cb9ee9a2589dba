"""Parity with diffusers' schedulers: the same method on the same model, time points and noise gives the same
samples.

The model is exact and cheap: a Gaussian mixture in R^8 (``pretrained.analytic.gmm_nd``) whose ε-prediction is
known in closed form at any noise level σ̃ = σ/α.  Each side maps its own time input to σ̃ — ours through
our schedule, diffusers' through its own ᾱ or σ table — so the comparison also checks that both evaluate the
network at the same noise levels (recorded and compared).  Everything is float64; diffusers' float32 β/ᾱ/σ
tables are replaced by the same formulas in float64 (``bench/studies/peers.py`` explains how and why).

Tolerances.  DDIM, DDPM and Heun compute in the sample's dtype: agreement to float64 rounding (``TOL_F64``;
observed ≤ 2e-12).  diffusers' ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler`` and
``DPMSolverMultistepScheduler`` cast the sample to float32 inside every ``step`` ("upcast to avoid precision
issues") and back, so their state carries one float32 rounding (2⁻²⁴ relative, |x| ≲ 3 here) per step:
``TOL_F32_STATE`` allows a few of those over ≤ 20 steps, still 5× inside the 1e-5 asked for (observed
≤ 7.2e-7).

What is not compared, and why:

* DPM-Solver++(2S) vs ``DPMSolverSinglestepScheduler(solver_order=2)``: diffusers takes the intermediate
  point of a second-order step at the *next timestep of its own integer grid* (order list 1, 2, 1, 2, …:
  each model call is a grid point), so its r = h₀/h changes from step to step, while ours is at the fixed
  λ-fraction r (½ by default).  No integer grid puts diffusers' intermediate points at λ-midpoints, so the
  two give different samples by construction; the scheduler appears only in the overhead benchmark.
* ``DDIMScheduler`` with "linspace"/"trailing" spacing: its previous timestep is t − N // steps whatever the
  spacing, so its steps do not land on its own timesteps (PEERS.md); only "leading" is DDIM on its grid.
* ``DDPMScheduler`` with ``steps_offset=1``: its last step, from t = 1 to ᾱ = 1, adds noise (β-variance
  under "fixed_large"); ours never adds noise on the step to σ = 0.  The test uses ``steps_offset=0``.
* our default ``dpmpp_3m`` (second difference weighted by 2·φ₃): diffusers, like the official code, uses
  φ₃; ``official_d2=True`` reproduces it, and a negative-control test shows the default differs.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
# diffusers 0.42 builds its σ tables with np.array(tensor), which NumPy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

import solvers  # noqa: E402
from bench.studies import peers as P  # noqa: E402
from pretrained.analytic import gmm_nd  # noqa: E402

TOL_F64 = 1e-10   # float64 rounding (2⁻⁵³ relative) accumulated over up to 1000 steps
TOL_F32_STATE = 2e-6
BATCH, DIM = 4, 8
SEEDS = list(range(100, 100 + BATCH))
MIXTURE = gmm_nd(dim=DIM, n_components=3, spread=1.5, std=0.4, seed=1)
SCHEDULE = P.linear_schedule()


def _ours(solver: str, grid: list, **options):
    """Sample with our solver on ``grid``; returns (result, the σ̃ levels the model saw)."""
    net = P.SigmaModel(MIXTURE, lambda t: SCHEDULE.sigma_ve(t))
    model = solvers.DiffusionModel(net, schedule=SCHEDULE, prediction="eps")
    x_T = solvers.initial_noise((BATCH, DIM), SEEDS, dtype=torch.float64)
    res = solvers.sample(model, x_T, solver, steps=None, timesteps=grid, seeds=SEEDS, **options)
    assert res.nfe == solvers.get_solver(solver, **options).nfe(grid, SCHEDULE.t_zero)
    return x_T, res, net.levels


def _peer_sigma_of(sched):
    """diffusers' own map from its time input to σ̃: its σ table for the σ-schedulers, else its ᾱ table."""
    if hasattr(sched, "sigmas") and type(sched).__name__.startswith(("Euler", "Heun")):
        table = {float(t): float(s) for t, s in zip(sched.timesteps, sched.sigmas)}
        return lambda t: table[t]
    abar = sched.alphas_cumprod.double()
    return lambda t: math.sqrt((1.0 - float(abar[int(t)])) / float(abar[int(t)]))


def _compare(key: str, steps: int, *, config=None, options=None, step_kwargs=None, stochastic=False,
             tol=TOL_F64):
    """Run ``PEERS[key]`` with overrides on both sides; assert equal samples, NFE and noise levels."""
    spec = P.PEERS[key]
    sched = P.make_scheduler(spec.scheduler, **{**spec.config, **(config or {})})
    P.set_timesteps(sched, steps)
    grid = P.our_grid(sched, SCHEDULE)
    opts = {**spec.options, **(options or {})}
    x_T, res, our_levels = _ours(spec.solver, grid, **opts)

    net = P.SigmaModel(MIXTURE, _peer_sigma_of(sched))
    generator = P.solver_generators(SEEDS, BATCH) if stochastic else None
    theirs = P.run_peer(sched, net, P.peer_start(sched, x_T, SCHEDULE, grid[0]), generator=generator,
                        step_kwargs={**spec.step_kwargs, **(step_kwargs or {})})

    assert res.nfe == len(net.levels) == len(sched.timesteps)
    assert our_levels == pytest.approx(net.levels, rel=1e-12)
    err = (res.samples - theirs).abs().max().item()
    print(f"{key} {steps} steps {config or ''} {options or ''}: max |ours − diffusers| = {err:.2e}")  # -rP
    assert err < tol, f"{key}: max |ours − diffusers| = {err:.3g} (tolerance {tol:g})"
    return sched, res


@pytest.mark.parametrize("steps, eta, steps_offset", [(10, 0.0, 0), (50, 0.0, 1), (10, 0.5, 1), (25, 1.0, 0)])
def test_ddim_matches_diffusers(steps, eta, steps_offset):
    """DDIM (η = 0 and η > 0 with the same noise) vs ``DDIMScheduler(set_alpha_to_one=True,
    clip_sample=False, timestep_spacing="leading")``; our grid is its timesteps + [−1] (ᾱ = 1)."""
    sched, res = _compare("ddim", steps, config={"steps_offset": steps_offset}, options={"eta": eta},
                          step_kwargs={"eta": eta}, stochastic=eta > 0)
    assert res.timesteps[-1] == SCHEDULE.t_zero and res.timesteps[0] == float(sched.timesteps[0])


@pytest.mark.parametrize("steps, variance, variance_type", [
    (10, "small", "fixed_small"), (100, "small", "fixed_small"), (10, "large", "fixed_large"),
    (1000, "large", "fixed_large")])  # the full chain once: Ho et al.'s CIFAR-10 setting
def test_ddpm_matches_diffusers(steps, variance, variance_type):
    """DDPM ancestral sampling vs ``DDPMScheduler`` given the same noise.

    The noise: diffusers' ``randn_tensor`` with a list of generators draws row i from generator i, exactly
    as our per-sample streams do, so ``generator=SeedStreams(seeds, STREAM_SOLVER).generators`` makes it draw
    our noise (no tensors passed around).  ``steps_offset=0`` puts its last timestep at 0, where it adds no
    noise — as ours never does on the step to σ = 0 (with offset 1 its last step from t = 1 would add
    β-variance noise under "fixed_large").
    """
    _compare("ddpm", steps, config={"variance_type": variance_type}, options={"variance": variance},
             stochastic=True)


def _record_orders(sched) -> list:
    """Make a DPMSolverMultistepScheduler record the order of each update it takes."""
    orders = []
    for order, name in ((1, "dpm_solver_first_order_update"), (2, "multistep_dpm_solver_second_order_update"),
                        (3, "multistep_dpm_solver_third_order_update")):
        method = getattr(sched, name)

        def spy(*args, _method=method, _order=order, **kwargs):
            orders.append(_order)
            return _method(*args, **kwargs)

        setattr(sched, name, spy)
    return orders


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("solver_order", [2, 3])
@pytest.mark.parametrize("steps, final_sigmas_type, lower_order_final", [
    (8, "zero", True), (8, "zero", False), (20, "zero", True),
    (8, "sigma_min", True), (8, "sigma_min", False), (20, "sigma_min", True)])
def test_dpmpp_multistep_matches_diffusers(solver_order, steps, final_sigmas_type, lower_order_final, solver_type):
    """DPM-Solver++(2M)/(3M) vs ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")``, with the
    final-step order policy matched explicitly and the orders compared step by step.

    diffusers' rule: the last step is first order if ``final_sigmas_type="zero"`` (a step to σ = 0 — ours is
    first order there by nature), or if ``lower_order_final`` and fewer than 15 steps; with
    ``lower_order_final`` and fewer than 15 steps the second-last step is at most second order.  Ours is
    given that rule explicitly (True below 15 steps; our ``"auto"`` is that rule for 2M but lowers 3M only
    below 6 steps, by measurement), ``False`` never lowers; a ``"sigma_min"`` grid ends at t = 0 (σ_min)
    instead of −1.

    3M uses ``official_d2=True`` (our default): the second difference weighed by φ₃, as diffusers and the
    official DPM-Solver code do; ``test_dpmpp_3m_consistent_weight_is_not_diffusers`` shows that our
    consistent 2·φ₃ weight differs far beyond the tolerance.  ``solver_type`` (the order-2 steps' form,
    midpoint or φ₂ = diffusers' "heun") is given to both.
    """
    key = "dpmpp_2m" if solver_order == 2 else "dpmpp_3m"
    spec = P.PEERS[key]
    sched = P.make_scheduler(spec.scheduler, **{**spec.config, "final_sigmas_type": final_sigmas_type,
                                                "lower_order_final": lower_order_final, "solver_type": solver_type})
    P.set_timesteps(sched, steps)
    their_orders = _record_orders(sched)
    grid = P.our_grid(sched, SCHEDULE)
    ours_lof = lower_order_final and steps < 15
    x_T, res, our_levels = _ours(spec.solver, grid, **{**spec.options, "lower_order_final": ours_lof,
                                                       "solver_type": solver_type})
    net = P.SigmaModel(MIXTURE, _peer_sigma_of(sched))
    theirs = P.run_peer(sched, net, P.peer_start(sched, x_T, SCHEDULE, grid[0]))

    assert res.orders == their_orders
    assert res.nfe == len(net.levels) == steps
    assert our_levels == pytest.approx(net.levels, rel=1e-12)
    err = (res.samples - theirs).abs().max().item()
    print(f"{key} {solver_type} {steps} steps {final_sigmas_type} lower_order_final={lower_order_final} "
          f"orders {res.orders}: "
          f"max |ours − diffusers| = {err:.2e}")  # shown with pytest -rP
    assert err < TOL_F32_STATE, f"max |ours − diffusers| = {err:.3g}"


def test_dpmpp_3m_consistent_weight_is_not_diffusers():
    """Negative control: with the consistent second-difference weight (official_d2=False), 3M is visibly not
    diffusers' 3M."""
    spec = P.PEERS["dpmpp_3m"]
    sched = P.make_scheduler(spec.scheduler, **spec.config)
    P.set_timesteps(sched, 10)
    grid = P.our_grid(sched, SCHEDULE)
    x_T, res, _ = _ours("dpmpp_3m", grid, official_d2=False)
    theirs = P.run_peer(sched, P.SigmaModel(MIXTURE, _peer_sigma_of(sched)), P.peer_start(sched, x_T, SCHEDULE, grid[0]))
    assert (res.samples - theirs).abs().max().item() > 100 * TOL_F32_STATE


@pytest.mark.parametrize("steps, spacing", [(7, "linspace"), (10, "trailing")])
def test_euler_matches_diffusers(steps, spacing):
    """Euler vs ``EulerDiscreteScheduler`` on the same σ levels.

    diffusers' σ at a fractional timestep is interpolated linearly in σ, ours in log α, so the times differ;
    our grid is the times at which our schedule has *its* σ levels (``schedule.t_from_sigma_ve``), and the
    model is a function of σ̃: both sides evaluate the same network at the same (x, σ̃).  Their state is
    x/α (``scale_model_input`` divides by sqrt(σ² + 1) = 1/α before the network), ours x.
    """
    _compare("euler", steps, config={"timestep_spacing": spacing}, tol=TOL_F32_STATE)


@pytest.mark.parametrize("steps", [5, 12])
def test_heun_matches_diffusers(steps):
    """Heun vs ``HeunDiscreteScheduler`` on the same σ levels (see the Euler test), churn off.

    diffusers duplicates its timesteps to fake the two stages: 2N − 1 model calls for N steps, the last
    step to σ = 0 being a single Euler step — our NFE must be the same.
    """
    sched, res = _compare("heun", steps)
    assert res.nfe == 2 * steps - 1 == len(sched.timesteps)


@pytest.mark.parametrize("steps", [6, 15])
def test_ddim_eta1_matches_euler_ancestral(steps):
    """DDIM with η = 1 vs ``EulerAncestralDiscreteScheduler`` (same noise): k-diffusion's ancestral step in
    x/α, σ/α — σ_down, σ_up — is DDIM's η = 1 step written in other variables."""
    _compare("ddim_eta1", steps, stochastic=True, tol=TOL_F32_STATE)


def test_peer_helpers_reject_other_schedules():
    """make_scheduler swaps in float64 tables for the linear schedule only; anything else is refused."""
    with pytest.raises(ValueError, match="linear schedule"):
        P.make_scheduler("DDIMScheduler", beta_schedule="squaredcos_cap_v2")

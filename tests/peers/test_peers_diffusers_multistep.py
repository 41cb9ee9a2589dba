"""Parity of UniPC and DEIS with diffusers' ``UniPCMultistepScheduler`` and ``DEISMultistepScheduler``.

Same method, same ε-model (an exact Gaussian mixture in R^8), same DiscreteVP time points, float64 on both
sides (``bench/studies/peers.py`` replaces diffusers' float32 β/ᾱ/σ tables by the same formulas in float64), so the
samples agree to float64 rounding — far inside the 1e-5 asked for.

The order policies are matched explicitly and compared step by step:

* UniPC — diffusers lowers the order to the steps left whenever ``lower_order_final=True`` (at any step
  count: our ``lower_order_final=True``; our default ``"auto"`` does so below 15 steps only, which keeps
  the order as the steps shrink) and corrects every point but the first and the last; its grid ends at
  σ = 0 (``final_sigmas_type="zero"``: our −1) or at ᾱ_0 ("sigma_min": our 0).
  Two diffusers configurations break at σ = 0: ``solver_type="bh1"`` (B(h) = −h = −∞ there) and
  ``lower_order_final=False`` (a second-order step to λ = ∞) give NaN/Inf; ours takes the first-order step
  to σ = 0 (D) — so those two are compared on the "sigma_min" grid, where both are finite.
* DEIS — diffusers' last σ is σ(ᾱ_0) (its grid ends at our t = 0, never at σ = 0) and it lowers the
  last two steps' orders below 15 steps: our ``lower_order_final="auto"``.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

import solvers  # noqa: E402
from bench.studies import peers as P  # noqa: E402
from pretrained.analytic import gmm_nd  # noqa: E402

# diffusers' schedulers call NumPy on tensors in ways NumPy 2 deprecates (its warnings, not ours).
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*"),
              pytest.mark.usefixtures("single_thread")]

TOL = 1e-12  # both sides compute in float64; observed ≤ 3e-14
BATCH, DIM = 4, 8
SEEDS = list(range(200, 200 + BATCH))
MIXTURE = gmm_nd(dim=DIM, n_components=3, spread=1.5, std=0.4, seed=1)
SCHEDULE = P.linear_schedule()


def _spy_orders(sched, methods: dict) -> list:
    """Make the scheduler record the order of each update it takes (``methods``: name → order or callable)."""
    orders = []
    for name, order in methods.items():
        method = getattr(sched, name)

        def spy(*args, _method=method, _order=order, **kwargs):
            orders.append(_order(kwargs) if callable(_order) else _order)
            return _method(*args, **kwargs)

        setattr(sched, name, spy)
    return orders


def _run(scheduler: str, config: dict, steps: int, final_t: float, solver: str, options: dict, spies: dict):
    sched = P.make_scheduler(scheduler, num_train_timesteps=P.NUM_TRAIN_TIMESTEPS, beta_schedule="linear",
                             beta_start=P.BETA_START, beta_end=P.BETA_END, **config)
    P.set_timesteps(sched, steps)
    their_orders = _spy_orders(sched, spies)
    grid = [float(t) for t in sched.timesteps.tolist()] + [final_t]

    ours_net = P.SigmaModel(MIXTURE, lambda t: float(SCHEDULE.sigma_ve(t)))
    model = solvers.DiffusionModel(ours_net, schedule=SCHEDULE, prediction="eps")
    x_T = solvers.initial_noise((BATCH, DIM), SEEDS, dtype=torch.float64)
    res = solvers.sample(model, x_T, solver, steps=None, timesteps=grid, seeds=SEEDS, **options)

    abar = sched.alphas_cumprod.double()
    their_net = P.SigmaModel(MIXTURE, lambda t: math.sqrt((1.0 - float(abar[int(t)])) / float(abar[int(t)])))
    theirs = P.run_peer(sched, their_net, x_T.clone())

    assert res.nfe == len(ours_net.levels) == len(their_net.levels) == steps
    assert res.nfe == solvers.get_solver(solver, **options).nfe(grid, SCHEDULE.t_zero)
    assert ours_net.levels == pytest.approx(their_net.levels, rel=1e-12)
    assert bool(torch.isfinite(theirs).all()), "diffusers produced NaN/Inf on this configuration"
    err = (res.samples - theirs).abs().max().item()
    assert err < TOL, f"{solver} {options}: max |ours − diffusers| = {err:.3g}"
    return res, their_orders


_UNIPC_SPIES = {"multistep_uni_p_bh_update": lambda kw: kw["order"]}


@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("steps", [5, 20])
def test_unipc_matches_diffusers(solver_order, steps):
    """UniPC-p (bh2, corrector on, lower-order final) vs diffusers' defaults, grid ending at σ = 0."""
    res, theirs = _run("UniPCMultistepScheduler", {"solver_order": solver_order}, steps, SCHEDULE.t_zero,
                       "unipc", {"solver_order": solver_order, "lower_order_final": True}, _UNIPC_SPIES)
    assert res.orders == theirs and res.orders[-1] == 1


@pytest.mark.parametrize("config, options, steps", [
    ({"solver_order": 3, "solver_type": "bh1"}, {"solver_order": 3, "variant": "bh1"}, 10),
    ({"solver_order": 2, "lower_order_final": False}, {"solver_order": 2, "lower_order_final": False}, 10),
    ({"solver_order": 3, "lower_order_final": False}, {"solver_order": 3, "lower_order_final": False}, 25),
    ({"solver_order": 2}, {"solver_order": 2, "lower_order_final": True}, 20),
])
def test_unipc_matches_diffusers_sigma_min(config, options, steps):
    """The B(h) = −h variant and the full-order final steps, on the grid that ends at ᾱ_0 (t = 0)."""
    res, theirs = _run("UniPCMultistepScheduler", {**config, "final_sigmas_type": "sigma_min"}, steps, 0.0,
                       "unipc", options, _UNIPC_SPIES)
    assert res.orders == theirs


def test_unipc_without_corrector_matches_diffusers():
    """``use_corrector=False`` is diffusers' ``disable_corrector`` at every step: UniP alone."""
    res, theirs = _run("UniPCMultistepScheduler", {"solver_order": 3, "disable_corrector": list(range(20))}, 20,
                       SCHEDULE.t_zero, "unipc", {"solver_order": 3, "use_corrector": False,
                                                  "lower_order_final": True}, _UNIPC_SPIES)
    assert res.orders == theirs


def test_unipc_corrector_changes_the_samples():
    """Negative control: with and without the corrector the samples differ far beyond the tolerance."""
    x_T = solvers.initial_noise((BATCH, DIM), SEEDS, dtype=torch.float64)
    model = solvers.DiffusionModel(P.SigmaModel(MIXTURE, lambda t: float(SCHEDULE.sigma_ve(t))), schedule=SCHEDULE)
    a = solvers.sample(model, x_T, "unipc", steps=10, spacing="linspace").samples
    b = solvers.sample(model, x_T, "unipc", steps=10, spacing="linspace", use_corrector=False).samples
    assert (a - b).abs().max().item() > 1e3 * TOL


_DEIS_SPIES = {"deis_first_order_update": 1, "multistep_deis_second_order_update": 2,
               "multistep_deis_third_order_update": 3}


@pytest.mark.parametrize("solver_order", [1, 2, 3])
@pytest.mark.parametrize("steps", [6, 20])
def test_deis_matches_diffusers(solver_order, steps):
    """DEIS (log ρ) vs ``DEISMultistepScheduler``: its grid ends at t = 0 (σ of ᾱ_0); lower order final
    below 15 steps = our ``"auto"``."""
    res, theirs = _run("DEISMultistepScheduler", {"solver_order": solver_order}, steps, 0.0, "deis",
                       {"solver_order": solver_order}, _DEIS_SPIES)
    assert res.orders == theirs
    if steps < 15 and solver_order > 1:
        assert res.orders[-1] == 1


def test_deis_other_variables_are_not_diffusers():
    """Negative control: the ρ and t polynomials are different methods from diffusers' log ρ."""
    x_T = solvers.initial_noise((BATCH, DIM), SEEDS, dtype=torch.float64)
    model = solvers.DiffusionModel(P.SigmaModel(MIXTURE, lambda t: float(SCHEDULE.sigma_ve(t))), schedule=SCHEDULE)
    grid = solvers.make_grid(SCHEDULE, 10, spacing="linspace", denoise_to_zero=False)
    ref = solvers.sample(model, x_T, "deis", timesteps=grid, steps=None, solver_order=3).samples
    for variable in ("rho", "t"):
        other = solvers.sample(model, x_T, "deis", timesteps=grid, steps=None, solver_order=3, variable=variable)
        assert (other.samples - ref).abs().max().item() > 1e3 * TOL

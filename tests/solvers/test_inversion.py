"""Inversion (data → noise) with the solvers' own steps on an increasing grid.

On the single Gaussian the probability-flow map is known in closed form, so the inversion's own error is
measured exactly; the round trip (invert, then sample back over the reversed grid) returns the data up to the
two discretisation errors, which shrink with the steps at the solver's order.
"""
from __future__ import annotations

import math

import pytest
import torch

import pretrained
import solvers
from solvers import schedules

pytestmark = pytest.mark.usefixtures("single_thread")

CARD = pretrained.get_card("gaussian")
GAUSS = CARD.extra["mixture"]
VP = CARD.extra["schedule"]


def _data(n: int = 64) -> torch.Tensor:
    return GAUSS.sample(n, seed=11)


def _round_trip(model, x0, solver, steps, **options):
    inv = solvers.invert(model, x0, solver, steps, **options)
    back = solvers.sample(model, inv.samples, solver, steps=None, timesteps=inv.timesteps[::-1], **options)
    return inv, (back.samples - x0).abs().max().item()


def test_ddim_inversion_is_the_ddim_update_on_the_increasing_grid():
    """One step from t to t' > t is x' = α'·D(x, t) + σ'·ε̂(x, t) (Song et al. 2021, §5.4)."""
    model = pretrained.load("gaussian")
    x0 = _data(5)
    inv = solvers.invert(model, x0, "ddim", steps=None, timesteps=[0.05, 0.4])
    d = model.denoise(x0, 0.05)
    a, s = float(VP.alpha(0.05)), float(VP.sigma(0.05))
    a1, s1 = float(VP.alpha(0.4)), float(VP.sigma(0.4))
    assert torch.allclose(inv.samples, a1 * d + s1 * (x0 - a * d) / s, rtol=1e-13, atol=1e-14)
    assert inv.nfe == 1 and inv.timesteps == [0.05, 0.4] and inv.orders == [1]


@pytest.mark.parametrize("solver, options, order", [
    ("ddim", {}, 1),
    ("heun", {}, 2),
    ("dpmpp_2m", {"lower_order_final": False}, 2),
    ("unipc", {"lower_order_final": False}, 3),
])
def test_inversion_converges_to_the_exact_flow_at_the_solver_order(solver, options, order):
    model = pretrained.load("gaussian")
    x0 = _data()
    errors = []
    for steps in (20, 40):
        inv = solvers.invert(model, x0, solver, steps, **options)
        exact = GAUSS.flow_map(VP, x0, inv.timesteps[0], inv.timesteps[-1])
        errors.append((inv.samples - exact).abs().max().item())
    slope = math.log2(errors[0] / errors[1])
    assert slope > order - 0.4, f"{solver}: inversion errors {errors} (slope {slope:.2f})"


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "deis"])
def test_invert_then_sample_returns_the_data(solver):
    """The round trip's error decreases with the number of steps (by at least the first-order factor)."""
    model = pretrained.load("gaussian")
    x0 = _data()
    errors = [_round_trip(model, x0, solver, n)[1] for n in (10, 20, 40)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.6 * errors[1], errors
    assert errors[2] < 0.3


def test_round_trip_on_the_ring_mixture_and_a_discrete_schedule():
    """A multimodal model (gmm2d) and DiscreteVP's integer grid (diffusers' 'linspace' spacing reversed)."""
    ring = pretrained.get_card("gmm2d").extra["mixture"]
    x0 = ring.sample(64, seed=2)
    _, err = _round_trip(pretrained.load("gmm2d"), x0, "dpmpp_2m", 80)
    assert err < 0.05
    discrete = schedules.DiscreteVP.linear()
    model = GAUSS.as_model(discrete)
    inv, err = _round_trip(model, _data(), "dpmpp_2m", 50, spacing="linspace")
    assert inv.timesteps[0] == 0.0 and inv.timesteps[-1] == 999.0 and err < 0.07  # measured 0.035


@pytest.mark.parametrize("solver, options", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("heun", {"s_churn": 10.0}),
                                             ("pc", {}), ("euler_maruyama", {}), ("adaptive", {})])
def test_stochastic_and_adaptive_solvers_are_refused(solver, options):
    with pytest.raises(ValueError, match="invert needs a deterministic fixed-grid solver"):
        solvers.invert(pretrained.load("gaussian"), _data(2), solver, 5, **options)


@pytest.mark.parametrize("timesteps, message", [
    ([0.5, 0.2, 0.9], "strictly increasing grid"),
    ([0.0, 0.5, 1.0], "inversion starts where the model can be evaluated"),
    ([0.1, 1.5], "outside the range"),
])
def test_bad_grids_raise(timesteps, message):
    with pytest.raises(ValueError, match=message):
        solvers.invert(pretrained.load("gaussian"), _data(2), "ddim", steps=None, timesteps=timesteps)


def test_steps_must_agree_with_timesteps():
    with pytest.raises(ValueError, match="steps=3 disagrees with the 2 steps"):
        solvers.invert(pretrained.load("gaussian"), _data(2), "ddim", steps=3, timesteps=[0.1, 0.5, 0.9])

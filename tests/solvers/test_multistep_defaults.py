"""The multistep defaults chosen by measurement (issue 12): dpmpp_3m's published second-difference weight and its
``lower_order_final="auto"`` rule (lower below 6 steps only).

Measured with ``python -m bench.studies.low_nfe_measure multistep`` on the exact mixtures (VP linear, logsnr
grid from t = 1, 256 samples): see the DPMSolverPP3M docstring for the numbers.  The tests assert the rule
and that the defaults beat the previous ones (consistent weight, lowering below 15 steps) at 10 steps.
"""
from __future__ import annotations

import pytest
import torch

import pretrained
import solvers
from solvers import schedules

pytestmark = pytest.mark.usefixtures("single_thread")

VP = schedules.VPLinear()


def test_the_published_weight_is_the_default_and_the_consistent_one_stays_available():
    default, consistent = solvers.get_solver("dpmpp_3m"), solvers.get_solver("dpmpp_3m", official_d2=False)
    assert default.official_d2 is True and default.d2_weight == 1.0 and default.order == 2
    assert consistent.d2_weight == 2.0 and consistent.order == 3


@pytest.mark.parametrize("steps, to_zero, orders", [
    (5, False, [1, 2, 3, 2, 1]),        # below 6 steps: the last orders are lowered
    (8, False, [1, 2, 3, 3, 3, 3, 3, 3]),
    (8, True, [1, 2, 3, 3, 3, 3, 3, 1]),  # the step to σ = 0 is first order by nature
])
def test_3m_auto_lowers_the_last_orders_below_6_steps_only(steps, to_zero, orders):
    model = pretrained.get_card("gaussian").extra["mixture"].as_model(VP)
    x_T = solvers.initial_noise((2, 2), seeds=range(2), dtype=torch.float64)
    res = solvers.sample(model, x_T, "dpmpp_3m", steps=steps, denoise_to_zero=to_zero)
    assert res.orders == orders
    # 2M keeps diffusers' rule: lowered below 15 steps.
    assert solvers.sample(model, x_T, "dpmpp_2m", steps=8, denoise_to_zero=False).orders[-1] == 1


@pytest.mark.parametrize("card", ["gmm2d", "gmm"])
@pytest.mark.parametrize("to_zero", [True, False])
def test_the_3m_defaults_beat_the_previous_ones_at_10_steps(card, to_zero):
    mixture = pretrained.get_card(card).extra["mixture"]
    model = mixture.as_model(VP)
    x_T = solvers.initial_noise((128, mixture.dim), seeds=range(128), dtype=torch.float64)
    grid = solvers.make_grid(VP, 10, denoise_to_zero=to_zero)
    t_last = grid[-2] if to_zero else grid[-1]
    exact = mixture.ode_solution(VP, x_T, grid[0], t_last, rtol=1e-10, atol=1e-12, per_sample=False)
    if to_zero:
        exact = mixture.denoise(exact, float(VP.alpha(t_last)), float(VP.sigma(t_last)))

    def error(**options):
        out = solvers.sample(model, x_T, "dpmpp_3m", timesteps=grid, **options).samples
        return float((out - exact).pow(2).mean().sqrt())

    # Measured (256 samples) new / previous: gmm2d 0.094 / 0.19 and 0.081 / 0.15; gmm 0.060 / 0.11 and
    # 0.045 / 0.091 (ending at σ = 0 / at t = 1e-3).  Asserted: at least 1.3× better.
    new, previous = error(), error(official_d2=False, lower_order_final=True)
    assert new < previous / 1.3, (new, previous)


@pytest.mark.parametrize("steps, lower_order_final, form", [
    (5, "auto", "midpoint"), (8, "auto", "heun"), (8, True, "midpoint"), (8, False, "heun")])
def test_3m_auto_takes_the_midpoint_form_where_it_lowers_and_the_phi2_form_elsewhere(steps, lower_order_final,
                                                                                    form):
    """solver_type="auto" (3M's default): its order-2 steps (the warm-up, lowered final steps) take the midpoint
    form where the last orders are lowered and the φ₂ ("heun") form elsewhere — to the bit."""
    model = pretrained.get_card("gaussian").extra["mixture"].as_model(VP)
    x_T = solvers.initial_noise((2, 2), seeds=range(2), dtype=torch.float64)

    def run(**options):
        return solvers.sample(model, x_T, "dpmpp_3m", steps=steps, denoise_to_zero=False,
                              lower_order_final=lower_order_final, **options).samples

    other = {"midpoint": "heun", "heun": "midpoint"}[form]
    auto = run()
    assert torch.equal(auto, run(solver_type=form))
    assert not torch.allclose(auto, run(solver_type=other), rtol=1e-9, atol=0)

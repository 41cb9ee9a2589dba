"""UniPC, DEIS and iPNDM: identities with other methods, their weights, their final-step policies, bad input.

(NFE = declared, batch invariance, recorded results and non-finite output are held by
tests/solvers/test_contract.py for every registered solver; parity with diffusers is in
tests/peers/test_peers_diffusers_multistep.py, measured orders in tests/solvers/test_multistep_orders.py.)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import solvers
from pretrained.analytic import GaussianMixture
from solvers import schedules
from solvers.base import points_at
from solvers.deis import adams_weights
from solvers.unipc import unipc_weights

pytestmark = pytest.mark.usefixtures("single_thread")

MIXTURE = GaussianMixture([[-1.0, 0.0, 0.5], [1.0, 0.5, -0.5]], 0.5, [0.6, 0.4])
REL = 1e-11


def _sample(schedule, solver, grid, **options):
    model = MIXTURE.as_model(schedule)
    x_T = solvers.initial_noise((6, 3), seeds=range(6), schedule=schedule, t=grid[0], dtype=torch.float64)
    return solvers.sample(model, x_T, solver, steps=None, timesteps=grid, **options)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    return (a - b).abs().max().item() <= rel * max(1.0, b.abs().max().item())


SCHEDULES = {"vp_linear": schedules.VPLinear, "edm": schedules.EDM, "discrete": schedules.DiscreteVP.linear}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_first_order_members_are_ddim(name):
    """DEIS-1 (x̃ + (ρ_n − ρ)·ε̂) and UniP-1 ((σ_n/σ)·x − α_n·(e^{−h} − 1)·D) are both DDIM (η = 0)."""
    schedule = SCHEDULES[name]()
    grid = solvers.make_grid(schedule, 8, spacing="logsnr")
    ddim = _sample(schedule, "ddim", grid).samples
    assert _close(_sample(schedule, "deis", grid, solver_order=1).samples, ddim)
    assert _close(_sample(schedule, "unipc", grid, solver_order=1, use_corrector=False).samples, ddim)
    assert _close(_sample(schedule, "ipndm", grid, solver_order=1).samples, ddim)


@pytest.mark.parametrize("order", [2, 3])
def test_deis_in_rho_is_variable_step_ipndm(order):
    """Both integrate the Lagrange polynomial in ρ through the last outputs: the same method (off σ = 0,
    where DEIS returns D and iPNDM takes its Adams step)."""
    schedule = schedules.VPLinear()
    grid = solvers.make_grid(schedule, 9, spacing="karras", denoise_to_zero=False)
    deis = _sample(schedule, "deis", grid, solver_order=order, variable="rho", lower_order_final=False)
    ipndm = _sample(schedule, "ipndm", grid, solver_order=order, variable_step=True)
    assert _close(deis.samples, ipndm.samples) and deis.orders == ipndm.orders


@pytest.mark.parametrize("name", ["vp_linear", "edm"])
def test_ipndm_fixed_weights_are_exact_on_steps_uniform_in_rho(name):
    """With constant steps in ρ the variable-step weights reduce to the classic Adams–Bashforth ones."""
    schedule = SCHEDULES[name]()
    rho = torch.linspace(float(schedule.sigma_ve(schedule.t_max)) * 0.5, 0.05, 12, dtype=torch.float64)
    grid = schedule.t_from_sigma_ve(rho).tolist()
    fixed = _sample(schedule, "ipndm", grid, solver_order=4)
    variable = _sample(schedule, "ipndm", grid, solver_order=4, variable_step=True)
    assert _close(fixed.samples, variable.samples, 1e-9) and fixed.orders == [1, 2, 3] + [4] * 8


def test_adams_weights_integrate_the_interpolating_polynomial():
    """Weights in ρ against NumPy's polynomial integral; in log ρ against diffusers' closed form (its
    ``ind_fn``); every variable's weights sum to ρ_to − ρ_from (a constant ε̂ is integrated exactly)."""
    nodes, rho_to = [0.8, 2.5, 6.0], 0.3
    exact = []
    for j in range(3):
        coeffs = np.polyint(np.polyfit(nodes, np.eye(3)[j], 2))
        exact.append(np.polyval(coeffs, rho_to) - np.polyval(coeffs, nodes[0]))
    assert np.allclose(adams_weights(nodes, nodes[0], rho_to, "rho"), exact, rtol=1e-12, atol=0)

    def ind(t, b, c, d):  # diffusers' ∫ (log t − log c)(log t − log d) / ((log b − log c)(log b − log d)) dt
        lt, lc, ld, lb = map(math.log, (t, c, d, b))
        return t * (lc * (ld - lt + 1) - ld * lt + ld + lt ** 2 - 2 * lt + 2) / ((lb - lc) * (lb - ld))

    b0, b1, b2 = nodes
    closed = [ind(rho_to, b0, b1, b2) - ind(b0, b0, b1, b2), ind(rho_to, b1, b2, b0) - ind(b0, b1, b2, b0),
              ind(rho_to, b2, b0, b1) - ind(b0, b2, b0, b1)]
    assert np.allclose(adams_weights(nodes, nodes[0], rho_to, "logrho"), closed, rtol=1e-12, atol=0)
    schedule = schedules.VPLinear()
    for variable in ("rho", "logrho", "t"):
        w = adams_weights(nodes, nodes[0], rho_to, variable, schedule)
        assert sum(w) == pytest.approx(rho_to - nodes[0], rel=1e-12)


def test_unipc_weights_reduce_to_ddim_for_a_constant_prediction():
    """If every D is the same, UniP and UniC must give the DDIM step: c_x = σ_t/σ_s and the D weights sum
    to −α_t·(e^{−h} − 1), for every order and both B(h)."""
    schedule = schedules.VPLinear()
    pts = points_at(schedule, None, [0.9, 0.7, 0.5, 0.35, 0.2])
    s, t, past = pts[3], pts[4], [pts[2], pts[1], pts[0]]
    ddim = -t.alpha * math.expm1(-(t.lam - s.lam))
    for variant in ("bh1", "bh2"):
        for order in (1, 2, 3):
            for corrector in (False, True):
                c_x, w = unipc_weights(s, t, past, order, variant, corrector)
                assert c_x == pytest.approx(t.sigma / s.sigma, rel=1e-14)
                assert sum(w) == pytest.approx(ddim, rel=1e-12)
                assert len(w) == order + (1 if corrector else 0)


def test_final_step_policies():
    """A step to σ = 0: UniPC and DEIS return D (first order); iPNDM takes its Adams step (as k-diffusion)."""
    schedule = schedules.VPLinear()
    grid = solvers.make_grid(schedule, 6, spacing="logsnr")
    assert _sample(schedule, "unipc", grid, solver_order=3).orders == [1, 2, 3, 3, 2, 1]
    assert _sample(schedule, "unipc", grid, solver_order=3, lower_order_final=False).orders == [1, 2, 3, 3, 3, 1]
    assert _sample(schedule, "deis", grid, solver_order=3).orders == [1, 2, 3, 3, 2, 1]
    assert _sample(schedule, "ipndm", grid).orders == [1, 2, 3, 4, 4, 4]


def test_declared_orders_follow_the_options():
    """The instance's order is its configuration's; the class attribute is the default configuration's."""
    assert [solvers.get_solver("unipc", solver_order=p).order for p in (1, 2, 3)] == [2, 3, 4]
    assert solvers.get_solver("unipc", solver_order=3, use_corrector=False).order == 3
    assert [solvers.get_solver("deis", solver_order=p).order for p in (1, 2, 3)] == [1, 2, 3]
    assert [solvers.get_solver("ipndm", solver_order=p).order for p in (1, 2, 3, 4)] == [1, 2, 2, 2]
    assert solvers.get_solver("ipndm", solver_order=4, variable_step=True).order == 4
    for name in ("unipc", "deis", "ipndm"):
        assert solvers.solver_class(name).order == solvers.get_solver(name).order


@pytest.mark.parametrize("name, options, message", [
    ("unipc", {"solver_order": 4}, "solver_order must be an integer from 1 to 3"),
    ("unipc", {"solver_order": True}, "solver_order must be an integer from 1 to 3"),
    ("unipc", {"variant": "bh3"}, "variant must be 'bh1' or 'bh2'"),
    ("unipc", {"use_corrector": 1}, "use_corrector must be True or False"),
    ("unipc", {"lower_order_final": "yes"}, "lower_order_final must be True, False or 'auto'"),
    ("deis", {"solver_order": 0}, "solver_order must be an integer from 1 to 3"),
    ("deis", {"solver_order": 2.0}, "solver_order must be an integer from 1 to 3"),
    ("deis", {"variable": "lambda"}, "variable must be 'logrho', 'rho' or 't'"),
    ("ipndm", {"solver_order": 5}, "solver_order must be an integer from 1 to 4"),
    ("ipndm", {"variable_step": "no"}, "variable_step must be True or False"),
    ("dpmpp_2m", {"solver_type": "auto"}, "dpmpp_2m: solver_type must be 'midpoint' or 'heun'"),
    ("dpmpp_3m", {"solver_type": "bh2"}, "dpmpp_3m: solver_type must be 'auto', 'midpoint' or 'heun'"),
])
def test_bad_options_raise(name, options, message):
    with pytest.raises(ValueError, match=message) as err:
        solvers.get_solver(name, **options)
    # Every refusal names the solver it came from, and the value given.
    value = repr(next(iter(options.values())))
    assert str(err.value).startswith(f"{name}: ") and str(err.value).endswith(f"got {value}"), str(err.value)


@pytest.mark.parametrize("name, message", [("unipc", "log-SNR λ, which is infinite at t=1.0"),
                                           ("deis", "ρ = σ/α, which is infinite at t=1.0"),
                                           ("ipndm", "ρ = σ/α, which is infinite at t=1.0")])
def test_grid_where_alpha_vanishes_is_refused(name, message):
    """On rectified flow α(1) = 0: λ and ρ are infinite there, so these solvers cannot start at t = 1."""
    schedule = schedules.RectifiedFlow()
    model = MIXTURE.as_model(schedule, "velocity")
    with pytest.raises(ValueError, match=message):
        solvers.sample(model, torch.zeros(2, 3, dtype=torch.float64), name, timesteps=[1.0, 0.5, 0.0])
    res = solvers.sample(model, torch.zeros(2, 3, dtype=torch.float64), name, timesteps=[0.999, 0.5, 0.0])
    assert bool(torch.isfinite(res.samples).all())


def test_unipc_correct_last_corrects_the_last_point_with_one_more_call():
    """correct_last: UniC at the grid's last point (not at σ = 0), from one more model call there; the declared
    NFE counts it; without the corrector it changes nothing.  (Its values against diffusers' UniPC, whose σ list
    repeats σ_min: tests/peers/test_solver_scheduler_parity.py.)"""
    import pretrained
    model = pretrained.get_card("gaussian").extra["mixture"].as_model(schedules.VPLinear())
    x_T = solvers.initial_noise((3, 2), seeds=range(3), dtype=torch.float64)
    grid = solvers.make_grid(model.schedule, 6, spacing="logsnr", denoise_to_zero=False)
    plain = solvers.sample(model, x_T, "unipc", timesteps=grid, steps=None)
    last = solvers.sample(model, x_T, "unipc", timesteps=grid, steps=None, correct_last=True)
    assert last.nfe == plain.nfe + 1 == solvers.get_solver("unipc", correct_last=True).nfe(grid, model.schedule.t_zero)
    assert (last.samples - plain.samples).abs().max() > 1e-6
    off = dict(timesteps=grid, steps=None, use_corrector=False)
    assert torch.equal(solvers.sample(model, x_T, "unipc", correct_last=True, **off).samples,
                       solvers.sample(model, x_T, "unipc", **off).samples)
    with pytest.raises(ValueError, match="correct_last must be True or False"):
        solvers.get_solver("unipc", correct_last=1)

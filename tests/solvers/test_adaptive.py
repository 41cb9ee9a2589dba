"""The adaptive solver: accuracy to its tolerance on exact problems, per-sample steps, grid semantics, bad input.

Accuracy: the controller bounds each step's local error by rtol·|y| + atol; the global error is a sum of
those over the steps, propagated by the flow.  Over the 10–100 steps taken here it stays within
10 × tolerance (measured on the Gaussian, 32 samples, rtol = atol = 1e-2 … 1e-8: 6.5–7.9 × for
Bogacki–Shampine, 0.15–0.4 × for Dormand–Prince), and it scales with the tolerance — the two properties
asserted.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import pretrained
import solvers
from pretrained.analytic import GaussianMixture
from solvers import schedules

pytestmark = pytest.mark.usefixtures("single_thread")

GAUSS = pretrained.get_card("gaussian").extra["mixture"]
VP = schedules.VPLinear()
T0, T1 = 1.0, 1e-3


def _x_T(n: int, scale: float = 1.0) -> torch.Tensor:
    return solvers.initial_noise((n, 2), seeds=range(n), dtype=torch.float64) * scale


@pytest.mark.parametrize("method", ["bs3", "dopri5"])
def test_matches_the_closed_form_gaussian_to_its_tolerance(method):
    model = GAUSS.as_model(VP)
    x_T = _x_T(32)
    exact = GAUSS.flow_map(VP, x_T, T0, T1)
    errors = {}
    for tol in (1e-4, 1e-6):
        res = solvers.sample(model, x_T, "adaptive", steps=None, timesteps=[T0, T1], rtol=tol, atol=tol,
                             method=method)
        errors[tol] = (res.samples - exact).abs().max().item()
        assert errors[tol] < 10 * tol, f"{method} at tol {tol}: error {errors[tol]:.3g}"
    # Tolerance proportionality: 100 × tighter tolerance, 30–300 × smaller error.
    assert 30 < errors[1e-4] / errors[1e-6] < 300, errors


@pytest.mark.parametrize("schedule, prediction, t0, t1, scale", [
    (schedules.EDM(), "eps", 80.0, 0.002, 80.0),
    (schedules.RectifiedFlow(), "velocity", 1.0, 1e-3, 1.0),
    (schedules.DiscreteVP.linear(), "eps", 999.0, 0.0, 1.0),
])
def test_other_schedules_and_ode_forms(schedule, prediction, t0, t1, scale):
    """EDM and DiscreteVP integrate in λ (VE form); rectified flow in t (its native form, α(1) = 0)."""
    model = GAUSS.as_model(schedule, prediction)
    x_T = _x_T(16, scale)
    res = solvers.sample(model, x_T, "adaptive", steps=None, timesteps=[t0, t1], rtol=1e-6, atol=1e-6)
    assert (res.samples - GAUSS.flow_map(schedule, x_T, t0, t1)).abs().max().item() < 1e-5


def test_matches_the_mixture_ode_solution_with_per_sample_steps():
    """On a 3-component mixture each sample takes its own number of steps; all meet the tolerance."""
    mixture = GaussianMixture([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]], 0.3, [0.5, 0.3, 0.2])
    model = mixture.as_model(VP)
    x_T = _x_T(24)
    ref = mixture.ode_solution(VP, x_T, T0, T1, rtol=1e-11, atol=1e-11, per_sample=False)
    res = solvers.sample(model, x_T, "adaptive", steps=None, timesteps=[T0, T1], rtol=1e-5, atol=1e-5)
    # bs3's global error is 7–10 × its tolerance on these problems (measured 9.7e-5 here, 7.4–7.6 × tol on the
    # Gaussian above): a bound of 10 × tol had 2.5 % headroom and could fail on another CPU's rounding.  20 × tol
    # still fails by orders of magnitude if per-sample step control breaks (errors then are O(1e-2) or more).
    assert (res.samples - ref).abs().max().item() < 2e-4
    per_sample = res.nfe_per_sample
    assert len(per_sample) == 24 and len(set(per_sample)) > 1, "samples should need different step counts"
    # One segment: every unfinished sample is in every call, so the batch made as many calls as the longest.
    assert res.nfe == max(per_sample)


@pytest.mark.parametrize("method, extra_calls", [("bs3", 0), ("dpm23", 1)])
def test_interior_grid_points_are_outputs_not_steps(method, extra_calls):
    """The steps depend on the ends of the grid only: a 9-point grid gives the same samples as [T0, T1], and
    the same per-sample NFE up to dpm23's one model call at the end (its last stage is not at the new point:
    the model output there is made only to interpolate an interior output time before it); the states handed
    to the callback at the interior points are the interpolated trajectory, within the tolerance of the exact
    flow."""
    model = GAUSS.as_model(VP)
    x_T = _x_T(8)
    tol = 1e-6
    one = solvers.sample(model, x_T, "adaptive", steps=None, timesteps=[T0, T1], rtol=tol, atol=tol, method=method)
    seen = []
    many = solvers.sample(model, x_T, "adaptive", steps=8, spacing="logsnr", t_start=T0, t_end=T1,
                          denoise_to_zero=False, rtol=tol, atol=tol, method=method,
                          callback=lambda info: seen.append((info.t_next, info.x.clone())))
    assert torch.equal(one.samples, many.samples)
    assert all(0 <= m - o <= extra_calls for m, o in zip(many.nfe_per_sample, one.nfe_per_sample))
    assert len(seen) == 8 and many.orders == [3] * 8
    for t, x in seen:
        assert (x - GAUSS.flow_map(VP, x_T, T0, t)).abs().max().item() < 10 * tol


def test_dpm23_makes_no_model_call_at_the_end_of_a_grid_that_stops_there():
    """dpm23's last stage is not at the new point, so f there is a model call of its own, made only where it is
    used (a next step, or an output time before the end): a sample that reaches the end of [T0, T1] needs none."""
    net, times = GAUSS.network(VP, "eps"), []
    model = solvers.DiffusionModel(lambda x, t: times.append(t.flatten().clone()) or net(x, t), schedule=VP)
    solvers.sample(model, _x_T(4), "adaptive", steps=None, timesteps=[T0, T1], rtol=1e-4, atol=1e-4,
                   method="dpm23")
    model_t_end = float(VP.model_time(T1))
    nearest = min((t - model_t_end).abs().min().item() for t in times)
    assert nearest > 1e-6 * abs(model_t_end)


def test_final_step_to_zero_denoises_once():
    model = GAUSS.as_model(VP)
    x_T = _x_T(4)
    to_end = solvers.sample(model, x_T, "adaptive", steps=None, timesteps=[T0, T1])
    to_zero = solvers.sample(model, x_T, "adaptive", steps=None, timesteps=[T0, T1, 0.0])
    assert to_zero.orders == [3, 1] and to_zero.nfe == to_end.nfe + 1
    assert to_zero.nfe_per_sample == [n + 1 for n in to_end.nfe_per_sample]
    assert torch.allclose(to_zero.samples, model.denoise(to_end.samples, T1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["dpm23", "bs3"])
def test_a_sample_does_not_depend_on_its_batch(method):
    """Same samples and per-sample NFE alone, in a smaller batch, or shuffled (to the bit)."""
    model = GAUSS.as_model(VP)
    x_T = _x_T(12)
    opts = dict(steps=None, timesteps=[T0, T1], rtol=1e-5, atol=1e-5, method=method)
    full = solvers.sample(model, x_T, "adaptive", **opts)
    assert len(set(full.nfe_per_sample)) > 1, "the samples should need different step counts"
    for rows in ([7], [3, 9, 1], list(range(12))[::-1]):
        part = solvers.sample(model, x_T[rows], "adaptive", **opts)
        assert torch.equal(part.samples, full.samples[rows])
        assert part.nfe_per_sample == [full.nfe_per_sample[r] for r in rows]


def _nan_in_row_1_at_call(k: int):
    """The Gaussian's ε network, whose output for row 1 is NaN at its k-th call."""
    net, calls = GAUSS.network(VP, "eps"), []

    def poisoned(x, t):
        calls.append(1)
        out = net(x, t)
        if len(calls) == k:
            out = out.clone()
            out[1] = float("nan")
        return out
    return poisoned


def test_bs3_ends_a_sample_at_the_attempt_where_its_model_output_is_nan():
    """A NaN model output (row 1, third call: the first attempt's first stage) ends that sample as NaN after
    that attempt: 2 calls for the starting step + 3 for the attempt, no retries; the others are untouched."""
    poisoned = _nan_in_row_1_at_call(3)
    opts = dict(steps=None, timesteps=[T0, T1], rtol=1e-5, atol=1e-5, method="bs3")
    res = solvers.sample(solvers.DiffusionModel(poisoned, schedule=VP), _x_T(3), "adaptive", on_nonfinite="flag",
                         **opts)
    clean = solvers.sample(GAUSS.as_model(VP), _x_T(3), "adaptive", **opts)
    assert res.nonfinite.tolist() == [False, True, False] and bool(torch.isnan(res.samples[1]).all())
    assert res.nfe_per_sample[1] == 2 + 3
    assert torch.equal(res.samples[[0, 2]], clean.samples[[0, 2]])
    assert [res.nfe_per_sample[i] for i in (0, 2)] == [clean.nfe_per_sample[i] for i in (0, 2)]


def test_nfe_is_not_declared():
    slv = solvers.get_solver("adaptive")
    assert slv.adaptive and slv.nfe([1.0, 0.5, 0.0], 0.0) is None
    assert (slv.order, solvers.get_solver("adaptive", method="dopri5").order) == (3, 5)
    assert not solvers.get_solver("euler").adaptive


def test_fixed_grid_solvers_report_uniform_per_sample_nfe():
    res = solvers.sample(GAUSS.as_model(VP), _x_T(3), "heun", steps=4)
    assert res.nfe_per_sample == [res.nfe] * 3 == [7] * 3


def test_too_few_steps_is_an_error_naming_the_samples():
    with pytest.raises(RuntimeError, match=r"samples \[0, 1\] needed more than max_steps=5"):
        solvers.sample(GAUSS.as_model(VP), _x_T(2), "adaptive", steps=None, timesteps=[T0, T1], max_steps=5,
                       rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("options, message", [
    ({"rtol": -1e-3}, "rtol must be a finite number >= 0"),
    ({"atol": float("nan")}, "atol must be a finite number >= 0"),
    ({"rtol": 0, "atol": 0}, "rtol and atol cannot both be 0"),
    ({"method": "rk4"}, "method must be one of auto, bs3, dopri5, dpm23"),
    ({"h_init": 0.0}, "h_init must be a positive number or None"),
    ({"max_steps": 0}, "max_steps must be a positive integer"),
])
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        solvers.get_solver("adaptive", **options)


# Euler with Heun as the embedded pair, written FSAL (the second stage is f at the solution, with weight 0).
EULER_HEUN = dict(c=(0.0, 1.0), a=((), (1.0,)), b=(1.0, 0.0), b_err=(0.5, -0.5), order=1, error_order=2)


def test_the_shipped_and_a_minimal_fsal_pair_pass_their_own_checks():
    import dataclasses

    from solvers.adaptive import TABLEAUS, ButcherTableau

    for tab in TABLEAUS.values():
        assert ButcherTableau(**{f.name: getattr(tab, f.name) for f in dataclasses.fields(tab)}) == tab
    assert ButcherTableau("euler_heun", **EULER_HEUN).stages == 2


@pytest.mark.parametrize("change, message", [
    ({"b": (1.1, 0.0)}, "euler_heun: b must sum to 1 and b_err to 0 (consistency)"),
    ({"b_err": (0.5, -0.4)}, "euler_heun: b must sum to 1 and b_err to 0 (consistency)"),
    # Heun's method: consistent, c[-1] = 1, but its last stage (a[-1] = (1,)) is not the solution (b = (½, ½)).
    ({"b": (0.5, 0.5), "b_err": (0.5, -0.5)}, "euler_heun: only FSAL pairs are supported"),
])
def test_a_pair_failing_one_check_is_refused_by_that_check(change, message):
    from solvers.adaptive import ButcherTableau

    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        ButcherTableau("euler_heun", **{**EULER_HEUN, **change})


def test_tableaus_check_themselves():
    from solvers.adaptive import ButcherTableau

    with pytest.raises(ValueError, match="row 1 of a must sum to c"):
        ButcherTableau("bad", c=(0.0, 0.5, 1.0), a=((), (0.4,), (0.0, 1.0)), b=(0.0, 1.0, 0.0),
                       b_err=(0.0, 0.0, 0.0), order=2, error_order=1)
    with pytest.raises(ValueError, match="only FSAL pairs"):
        ButcherTableau("midpoint", c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), b_err=(-1.0, 1.0), order=2,
                       error_order=1)


@pytest.mark.parametrize("method, error_order", [("bs3", 2), ("dopri5", 4)])
def test_the_starting_step_is_hairers_as_scipy_selects_it(method, error_order):
    """Hairer's starting step (Solving ODEs I, II.4), per sample, equals scipy's ``select_initial_step`` on the
    same probability-flow ODE written independently from the schedule (dx/du = −[(σ'/σ)·x + (α' − σ'α/σ)·D] with
    u = −t, on the rectified flow, whose ODE form is native: y = x).  A fourth sample starts at x = 0, where
    ‖y‖ vanishes and the rule takes its fixed first guess (h0 = 1e-6)."""
    from scipy.integrate._ivp.common import select_initial_step
    from solvers.base import StepContext, points_at

    flow = schedules.RectifiedFlow()
    model, x = GAUSS.as_model(flow), torch.cat([_x_T(3), torch.zeros(1, 2, dtype=torch.float64)])
    slv = solvers.get_solver("adaptive", method=method, rtol=1e-4, atol=1e-4)
    pts = points_at(flow, model, [0.99, 1e-3])
    ctx = StepContext(model, pts, None, batch=4)
    h = slv._start(ctx, x, pts[0], slv.init_state(ctx))["h"]

    def fun(u, y):
        t = torch.tensor([-u], dtype=torch.float64)
        a, s, da, ds = flow.alpha(t), flow.sigma(t), flow.d_alpha(t), flow.d_sigma(t)
        xx = torch.as_tensor(y, dtype=torch.float64).reshape(1, -1)
        return (-((ds / s) * xx + (da - ds * a / s) * model.denoise(xx, float(-u)))).reshape(-1).numpy()

    for i in range(4):
        y0 = x[i].numpy()
        expected = select_initial_step(fun, -0.99, y0, -1e-3, math.inf, fun(-0.99, y0), 1, error_order, 1e-4, 1e-4)
        assert float(h[i]) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("options, message", [
    ({"rtol": True}, "rtol must be a finite number >= 0"), ({"rtol": "0.1"}, "rtol must be a finite number >= 0"),
    ({"h_init": True}, "h_init must be a positive number or None"),
    ({"h_init": "0.5"}, "h_init must be a positive number or None"),
    ({"max_steps": True}, "max_steps must be a positive integer"),
    ({"max_steps": "5"}, "max_steps must be a positive integer"),
])
def test_options_of_the_wrong_type_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        solvers.get_solver("adaptive", **options)


def test_option_edges_that_are_valid_are_accepted():
    """rtol = 0 alone (atol alone sets the tolerance), a starting step below 1, a single step allowed."""
    with pytest.raises(ValueError, match=r"^adaptive: rtol and atol cannot both be 0$"):
        solvers.get_solver("adaptive", rtol=0, atol=0)
    slv = solvers.get_solver("adaptive", rtol=0, atol=1e-3, h_init=0.5, max_steps=1)
    assert (slv.rtol, slv.atol, slv.h_init, slv.max_steps) == (0, 1e-3, 0.5, 1)


def test_dpm23_ends_a_sample_whose_model_output_is_nan_and_leaves_the_others():
    poisoned = _nan_in_row_1_at_call(3)
    opts = dict(steps=None, timesteps=[T0 * 0.999, T1], rtol=1e-5, atol=1e-5, method="dpm23")
    res = solvers.sample(solvers.DiffusionModel(poisoned, schedule=VP), _x_T(3), "adaptive", on_nonfinite="flag",
                         **opts)
    clean = solvers.sample(GAUSS.as_model(VP), _x_T(3), "adaptive", **opts)
    assert res.nonfinite.tolist() == [False, True, False]
    assert torch.equal(res.samples[[0, 2]], clean.samples[[0, 2]])

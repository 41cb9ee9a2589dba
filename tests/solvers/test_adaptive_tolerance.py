"""The adaptive solver's global error follows its tolerance on an exact multimodal problem, and its default
pair (DPM-Solver-2(3) in λ, ``method="auto"``) needs fewer model calls than Bogacki–Shampine for a smaller error.

The problem of issue 12: the exact 2-D ring mixture (``gmm2d``), VP linear schedule, probability-flow ODE from
t = 1 to 1e-3, atol = rtol/10, RMS error over 64 samples against SciPy's DOP853 at rtol 1e-10.  Measured
(RMS error, mean model calls per sample) at rtol 1e-2 / 1e-3 / 1e-4:
dpm23 5.1e-3 / 6.2e-4 / 7.5e-5 at 49 / 91 / 166 calls;  bs3 1.2e-2 / 1.5e-3 / 1.7e-4 at 60 / 107 / 204.
"""
from __future__ import annotations

import pytest
import torch

import pretrained
import solvers
from solvers import schedules
from solvers.base import points_at

pytestmark = pytest.mark.usefixtures("single_thread")

RING = pretrained.get_card("gmm2d").extra["mixture"]
GAUSS = pretrained.get_card("gaussian").extra["mixture"]
VP = schedules.VPLinear()
T0, T1 = 1.0, 1e-3
RTOLS = (1e-2, 1e-3, 1e-4)


@pytest.fixture(scope="module")
def ring_problem():
    x_T = solvers.initial_noise((64, 2), seeds=range(64), dtype=torch.float64)
    return RING.as_model(VP), x_T, RING.ode_solution(VP, x_T, T0, T1, rtol=1e-10, atol=1e-12, per_sample=False)


def _run(problem, method, rtol):
    """(RMS error, mean model calls per sample) of the adaptive solver at rtol, atol = rtol/10."""
    model, x_T, ref = problem
    res = solvers.sample(model, x_T, "adaptive", timesteps=[T0, T1], rtol=rtol, atol=rtol / 10, method=method)
    return float((res.samples - ref).pow(2).mean().sqrt()), sum(res.nfe_per_sample) / len(res.nfe_per_sample)


@pytest.mark.parametrize("method", ["auto", "dpm23", "bs3"])
def test_the_global_error_follows_the_tolerance(ring_problem, method):
    errors = [_run(ring_problem, method, rtol)[0] for rtol in RTOLS]
    # Each 10× tighter tolerance: a smaller error; 100× tighter: ≥ 10× smaller (measured 69–72×).
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] / errors[2] >= 10, errors
    # And the error is of the order of the tolerance (measured 0.5–1.7 × rtol), not a floor above it.
    assert all(e < 3 * rtol for e, rtol in zip(errors, RTOLS)), errors


def test_the_default_pair_needs_fewer_calls_for_a_smaller_error(ring_problem):
    for rtol in (1e-2, 1e-3):
        err_auto, nfe_auto = _run(ring_problem, "auto", rtol)
        err_bs3, nfe_bs3 = _run(ring_problem, "bs3", rtol)
        assert err_auto < err_bs3 and nfe_auto < nfe_bs3, (rtol, err_auto, nfe_auto, err_bs3, nfe_bs3)


def test_auto_picks_dpm23_where_log_snr_is_finite_at_the_start_else_bs3():
    slv = solvers.get_solver("adaptive")
    assert slv.method == "auto" and slv.order == 3
    assert slv.resolved_method(points_at(VP, None, [T0, T1])) == "dpm23"
    flow = schedules.RectifiedFlow()
    assert slv.resolved_method(points_at(flow, None, [1.0, 1e-3])) == "bs3"     # α = 0 at t = 1: λ = −∞
    assert slv.resolved_method(points_at(flow, None, [0.99, 1e-3])) == "dpm23"


@pytest.mark.parametrize("schedule, prediction, t0, t1, scale", [
    (schedules.EDM(), "eps", 80.0, 0.002, 80.0),
    (schedules.RectifiedFlow(), "velocity", 0.99, 1e-3, 1.0),
    (schedules.DiscreteVP.linear(), "eps", 999.0, 0.0, 1.0),
])
def test_dpm23_matches_the_closed_form_gaussian_on_other_schedules(schedule, prediction, t0, t1, scale):
    """DPM-Solver-2(3) integrates in (λ, x/α) on every schedule, rectified flow included (from below t = 1)."""
    model = GAUSS.as_model(schedule, prediction)
    x_T = solvers.initial_noise((16, 2), seeds=range(16), dtype=torch.float64) * scale
    exact = GAUSS.flow_map(schedule, x_T, t0, t1)
    errors = {}
    for tol in (1e-4, 1e-6):
        res = solvers.sample(model, x_T, "adaptive", timesteps=[t0, t1], rtol=tol, atol=tol, method="dpm23")
        errors[tol] = (res.samples - exact).abs().max().item()
        assert errors[tol] < 10 * tol * scale, (tol, errors)
    # Third order: 100× tighter tolerance, 30–300× smaller error.
    assert 30 < errors[1e-4] / errors[1e-6] < 300, errors


def test_dpm23_where_log_snr_is_infinite_is_refused_before_any_model_call():
    calls = []
    net = GAUSS.network(schedules.RectifiedFlow(), "velocity")
    model = solvers.DiffusionModel(lambda x, t: calls.append(1) or net(x, t), schedule=schedules.RectifiedFlow(),
                                   prediction="velocity")
    with pytest.raises(ValueError, match="infinite at t=1.0"):
        solvers.sample(model, torch.zeros(2, 2, dtype=torch.float64), "adaptive", timesteps=[1.0, 1e-3],
                       method="dpm23")
    assert calls == []


def _controlled(norm, err_prev, rejected, error_order=2):
    """The next step sizes the PI controller picks from steps of size 1 with these error norms."""
    n = len(norm)
    norm = torch.tensor(norm, dtype=torch.float64)
    state = {"h": torch.zeros(n, dtype=torch.float64), "err_prev": torch.tensor(err_prev, dtype=torch.float64),
             "rejected": torch.tensor(rejected)}
    solvers.get_solver("adaptive")._control(state, torch.arange(n), torch.ones(n, dtype=torch.float64), norm,
                                            torch.isfinite(norm) & (norm <= 1.0), error_order)
    return state["h"].tolist(), state["rejected"].tolist()


def test_the_step_size_follows_the_declared_pi_rule():
    """h·clip(0.9·e_n^(−0.7/k)·e_(n−1)^(0.4/k), 0.2, 5) after an accepted step, k = error order + 1; at most h
    right after a rejection; h·clip(0.9·e_n^(−1/k), 0.2, 1) after a rejected one (a NaN norm: the floor 0.2)."""
    k = 3
    norms, prevs = [0.1, 1e-8, 0.9, 0.1, 2.0, 1e6, float("nan")], [0.5, 1.0, 1e-4, 0.5, 0.5, 0.5, 0.5]
    rejected_before = [False, False, False, True, False, False, False]
    h, rejected = _controlled(norms, prevs, rejected_before)
    pi = [min(max(0.9 * e ** (-0.7 / k) * p ** (0.4 / k), 0.2), 5.0) for e, p in zip(norms[:4], prevs[:4])]
    expected = [pi[0], 5.0, pi[2], min(pi[3], 1.0), 0.9 * 2.0 ** (-1 / k), 0.2, 0.2]
    assert pi[0] > 1.0 and pi[2] < 1.0 and pi[3] > 1.0  # growth, shrinking, growth cut after a rejection
    assert h == pytest.approx(expected, rel=1e-12, abs=0)
    assert rejected == [False, False, False, False, True, True, True]
    # k follows the error order (dopri5: 4 → k = 5).
    assert _controlled([0.5], [0.3], [False], error_order=4)[0] == pytest.approx(
        [0.9 * 0.5 ** (-0.7 / 5) * 0.3 ** (0.4 / 5)], rel=1e-12)

"""solvers.optimize_timesteps: valid grids, lower calibration error, better on held-out seeds, deterministic,
its model calls counted, bad input refused before any model call.

The problem is the exact 2-D ring mixture (``gmm2d``: 8 Gaussians, std 0.3, radius 4) on the VP linear
schedule, whose denoiser is known in closed form: the held-out error is measured against SciPy's DOP853
solution of the probability-flow ODE, independent of the reference the optimiser used.
"""
from __future__ import annotations

import math

import pytest
import torch

import pretrained
import solvers
from solvers import schedules

pytestmark = pytest.mark.usefixtures("single_thread")

RING = pretrained.get_card("gmm2d").extra["mixture"]
VP = schedules.VPLinear()


def _counting_model(schedule=VP, prediction="eps"):
    """The exact ring model and a list whose length is its network calls so far."""
    calls = []
    net = RING.network(schedule, prediction)

    def fn(x, t):
        calls.append(x.shape[0])
        return net(x, t)

    return solvers.DiffusionModel(fn, schedule=schedule, prediction=prediction), calls


def _noise(seeds, scale=1.0):
    return solvers.initial_noise((len(seeds), 2), seeds=seeds, dtype=torch.float64) * scale


def _exact_final(x_T, grid):
    """The exact answer of a grid ending at σ = 0: the ODE solution to the last noise level, then D there."""
    t_last = grid[-2]
    x = RING.ode_solution(VP, x_T, grid[0], t_last, rtol=1e-10, atol=1e-12, per_sample=False)
    return RING.denoise(x, float(VP.alpha(t_last)), float(VP.sigma(t_last)))


def _rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def optimized():
    """dpmpp_2m at 5 steps, calibrated on seeds 0–31 with a small search budget."""
    model, calls = _counting_model()
    res = solvers.optimize_timesteps(model, _noise(range(32)), solver="dpmpp_2m", steps=5, evaluations=40)
    return model, res, len(calls)


def test_the_grid_is_valid_and_keeps_the_default_ends(optimized):
    model, res, _ = optimized
    ts, default = res.timesteps, res.default_timesteps
    assert len(ts) == 6 == len(default)
    assert all(a > b for a, b in zip(ts, ts[1:])), ts
    # The ends and, on a grid ending at σ = 0, the last noise level are the default grid's.
    assert (ts[0], ts[-2], ts[-1]) == (default[0], default[-2], default[-1]) == (1.0, VP.default_t_end, 0.0)
    assert ts != default
    res_sample = solvers.sample(model, _noise(range(4)), "dpmpp_2m", timesteps=res.timesteps)
    assert res_sample.timesteps == list(ts) and res_sample.nfe == 5


def test_calibration_error_is_reduced_and_measured_against_an_accurate_reference(optimized):
    model, res, _ = optimized
    x_cal = _noise(range(32))
    # Measured 0.80 → 0.08: asserted a 3× reduction.
    assert res.error_after < res.error_before / 3
    # The errors it reports are the solver's errors against the exact solution (its reference is accurate).
    assert res.reference_error < 1e-3 * res.error_after
    for grid, reported in ((res.default_timesteps, res.error_before), (res.timesteps, res.error_after)):
        out = solvers.sample(model, x_cal, "dpmpp_2m", timesteps=grid).samples
        assert math.isclose(_rms(out, _exact_final(x_cal, grid)), reported, rel_tol=1e-3)


def test_it_beats_the_default_grid_on_held_out_seeds(optimized):
    model, res, _ = optimized
    held = _noise(range(1000, 1256))
    err = {}
    for name, grid in (("default", res.default_timesteps), ("optimized", res.timesteps)):
        err[name] = _rms(solvers.sample(model, held, "dpmpp_2m", timesteps=grid).samples, _exact_final(held, grid))
    # Measured 0.81 → 0.08 (and the same ratio on the calibration seeds): asserted 3×.
    assert err["optimized"] < err["default"] / 3, err


def test_nfe_counts_every_model_call(optimized):
    _, res, calls = optimized
    assert res.nfe == calls
    assert 0 < res.nfe_reference < res.nfe
    assert res.evaluations <= 40 + 2 and res.calibration_size == 32


def test_the_same_input_gives_the_same_grid(optimized):
    model, res, _ = optimized
    again = solvers.optimize_timesteps(model, _noise(range(32)), solver="dpmpp_2m", steps=5, evaluations=40)
    assert again.timesteps == res.timesteps and again.error_after == res.error_after


def _exact_from(schedule, x_T, t_start, grid):
    """The exact answer of a grid ending at σ = 0 for starting states at ``t_start`` (which may be earlier
    than the grid's first time): the ODE solution from t_start to the last noise level, then D there."""
    t_last = grid[-2]
    x = RING.ode_solution(schedule, x_T, t_start, t_last, rtol=1e-10, atol=1e-12, per_sample=False)
    return RING.denoise(x, float(schedule.alpha(t_last)), float(schedule.sigma(t_last)))


def test_a_free_start_skips_the_first_stretch_and_is_scored_from_the_true_start(optimized):
    """free_start: the first time may move below t_start, x_T then stands for the state there; the error is
    still that against the solution from t_start, never above the fixed-start search's, and it generalises."""
    _, fixed, _ = optimized
    model, calls = _counting_model()
    free = solvers.optimize_timesteps(model, _noise(range(32)), solver="dpmpp_2m", steps=5, evaluations=40,
                                      free_start=True)
    assert free.nfe == len(calls)  # the second DP and search counted too
    ts = free.timesteps
    assert len(ts) == 6 and all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[0] < 1.0 and (ts[-2], ts[-1]) == (VP.default_t_end, 0.0)
    assert "first time free" in free.method
    # One of its searches starts from the fixed-start result (same budget, same inputs): never worse on
    # calibration.
    assert free.error_after <= fixed.error_after
    x_cal = _noise(range(32))
    out = solvers.sample(model, x_cal, "dpmpp_2m", timesteps=ts).samples
    assert math.isclose(_rms(out, _exact_from(VP, x_cal, 1.0, ts)), free.error_after, rel_tol=1e-3)
    # Held out, against the exact solution from t = 1: measured 0.124 (fixed start) → 0.077 (free, first time
    # 0.56); asserted a 10 % gain.
    held = _noise(range(1000, 1256))
    err = {name: _rms(solvers.sample(model, held, "dpmpp_2m", timesteps=g.timesteps).samples,
                      _exact_from(VP, held, 1.0, g.timesteps)) for name, g in (("fixed", fixed), ("free", free))}
    assert err["free"] < 0.9 * err["fixed"], err


def test_a_free_start_on_a_ve_schedule_starts_from_the_prior_at_its_first_time():
    """On VE/EDM the states drawn at σ_max are scaled to the prior at the later first time (σ'/σ_max), what
    solvers.initial_noise(t=first time) gives from the same seeds; the reported error is reproduced so."""
    edm = schedules.EDM()
    model, _ = _counting_model(edm, "eps")
    seeds = range(16)
    x_cal = solvers.initial_noise((16, 2), seeds=seeds, schedule=edm, dtype=torch.float64)
    res = solvers.optimize_timesteps(model, x_cal, solver="dpmpp_2m", steps=4, evaluations=16, free_start=True)
    ts = res.timesteps
    assert ts[0] <= res.default_timesteps[0] and res.error_after <= res.error_before
    start = solvers.initial_noise((16, 2), seeds=seeds, schedule=edm, t=ts[0], dtype=torch.float64)
    assert torch.allclose(solvers.optimize.start_state(edm, x_cal, res.default_timesteps[0], ts[0]), start)
    out = solvers.sample(model, start, "dpmpp_2m", timesteps=ts).samples
    exact = _exact_from(edm, x_cal, res.default_timesteps[0], ts)
    assert math.isclose(_rms(out, exact), res.error_after, rel_tol=1e-3)


@pytest.mark.parametrize("schedule, prediction, solver, kwargs, scale", [
    (schedules.EDM(), "eps", "heun", {}, 80.0),
    (schedules.RectifiedFlow(), "velocity", "heun", {"spacing": "uniform"}, 1.0),
    (schedules.DiscreteVP.linear(), "eps", "unipc", {"denoise_to_zero": False, "t_end": 5.0}, 1.0),
])
def test_other_schedules_and_grids_not_ending_at_zero(schedule, prediction, solver, kwargs, scale):
    """VE/EDM and DiscreteVP are searched in λ, rectified flow (α = 0 at t = 1) in t; a grid that does not
    end at σ = 0 keeps both its ends."""
    model, _ = _counting_model(schedule, prediction)
    res = solvers.optimize_timesteps(model, _noise(range(16), scale), solver=solver, steps=4, evaluations=16,
                                     **kwargs)
    ts, default = res.timesteps, res.default_timesteps
    assert len(ts) == 5 and all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[0] == default[0] and ts[-1] == default[-1]
    assert res.error_after < res.error_before


def test_one_step_has_nothing_to_move():
    model, _ = _counting_model()
    res = solvers.optimize_timesteps(model, _noise(range(8)), solver="ddim", steps=1)
    assert res.timesteps == res.default_timesteps and res.error_after == res.error_before
    assert "no free level" in res.method


@pytest.mark.parametrize("steps", [40, 50])
def test_more_than_32_steps_get_a_dp_grid_of_twice_as_many_levels(steps):
    """The DP's candidate levels default to max(64, 2·steps), so any step count up to the limit is optimised
    (before, the fixed default of 64 refused every count above 32 — `bench.run --spacing optimized`)."""
    model, calls = _counting_model()
    res = solvers.optimize_timesteps(model, _noise(range(4)), solver="dpmpp_2m", steps=steps, evaluations=4)
    ts, default = res.timesteps, res.default_timesteps
    assert len(ts) == steps + 1 and all(a > b for a, b in zip(ts, ts[1:]))
    assert (ts[0], ts[-2], ts[-1]) == (default[0], default[-2], default[-1])
    assert f"DP over {2 * steps} levels" in res.method
    assert res.error_after <= res.error_before and res.nfe == len(calls)


def test_a_step_count_above_the_optimiser_limit_is_refused_before_any_model_call():
    """Above solvers.optimize.MAX_STEPS the DP over every pair of 2·steps levels is refused up front, saying so;
    the limit itself passes the checks."""
    limit = solvers.optimize.MAX_STEPS
    model, calls = _counting_model()
    with pytest.raises(ValueError, match=rf"optimize_timesteps handles at most {limit:,} steps.*got steps={limit + 1}"):
        solvers.optimize_timesteps(model, _noise(range(4)), solver="dpmpp_2m", steps=limit + 1)
    with pytest.raises(ValueError, match=rf"candidates must be an integer in \[{2 * limit}, {2 * limit}\]"):
        solvers.optimize_timesteps(model, _noise(range(4)), solver="dpmpp_2m", steps=limit, candidates=2 * limit + 1)
    assert calls == []


@pytest.mark.parametrize("kwargs, error, match", [
    ({"solver": "adaptive", "steps": 5}, ValueError, "chooses its own steps"),
    ({"solver": "ddpm", "steps": 5}, ValueError, "draws noise"),
    ({"solver": "ddim", "steps": 5, "eta": 0.5}, ValueError, "draws noise"),
    ({"solver": "nope", "steps": 5}, ValueError, "unknown solver"),
    ({"solver": "dpmpp_2m", "steps": 0}, ValueError, "steps must be a positive integer"),
    ({"solver": "dpmpp_2m", "steps": 5, "evaluations": -1}, ValueError, "evaluations must be"),
    ({"solver": "dpmpp_2m", "steps": 5, "candidates": 6}, ValueError, "candidates must be"),
    ({"solver": "dpmpp_2m", "steps": 5, "reference_rtol": 0.1}, ValueError, "reference_rtol must be"),
    ({"solver": "dpmpp_2m", "steps": 5, "bogus": 1}, TypeError, "has no option"),
    ({"solver": "dpmpp_2m", "steps": 5, "t_end": 2.0}, ValueError, "t_end=2.0 must be below"),
    ({"solver": "dpmpp_2m", "steps": 5, "free_start": 1}, TypeError, "free_start must be True or False"),
])
def test_bad_input_is_refused_before_any_model_call(kwargs, error, match):
    model, calls = _counting_model()
    with pytest.raises(error, match=match):
        solvers.optimize_timesteps(model, _noise(range(4)), **kwargs)
    assert calls == []


def test_a_bad_model_or_state_is_refused():
    model, calls = _counting_model()
    with pytest.raises(TypeError, match="DiffusionModel"):
        solvers.optimize_timesteps(lambda x, t: x, _noise(range(4)), solver="ddim", steps=3)
    with pytest.raises(TypeError):
        solvers.optimize_timesteps(model, torch.zeros(4, 2, dtype=torch.long), solver="ddim", steps=3)
    assert calls == []

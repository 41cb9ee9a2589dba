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
    # The breakdown of the module docstring: the reference, 64 − 1 calls of the DP, 5 per solver run.
    assert res.nfe == res.nfe_reference + (64 - 1) + 5 * res.evaluations


def test_the_method_says_what_was_done(optimized):
    """5 steps to σ = 0 keep t = 1, the last noise level and 0: three free levels, searched in λ (VP)."""
    _, res, _ = optimized
    assert res.method == (
        "reference: adaptive dopri5 at rtol=atol=1e-06; initial grid: the better of the default (logsnr) and "
        "GITS-style DP over 64 levels uniform in log-SNR λ; compass search on the softmax logits of the log-SNR λ "
        f"increments of the 3 free levels; {res.evaluations} solver runs")


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
    assert free.method.endswith("free levels; then again with the first time free, from that grid and from a "
                                f"free-start DP grid; {free.evaluations} solver runs"), free.method
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
    coordinate = "t" if isinstance(schedule, schedules.RectifiedFlow) else "log-SNR λ"
    assert f"levels uniform in {coordinate}; compass search on the softmax logits of the {coordinate} " in res.method


def test_one_step_has_nothing_to_move():
    model, calls = _counting_model()
    res = solvers.optimize_timesteps(model, _noise(range(8)), solver="ddim", steps=1, t_start=0.5)
    assert res.timesteps == res.default_timesteps == (0.5, 0.0) and res.error_after == res.error_before
    assert "no free level" in res.method
    # No search: the model calls are the reference's and the one run of the default grid, all counted.
    assert res.nfe == len(calls) == res.nfe_reference + 1
    assert (res.solver, res.options, res.calibration_size) == ("ddim", {"eta": 0.0}, 8)


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


def test_the_budget_checks_accept_the_ends_of_their_documented_ranges_and_refuse_a_bool():
    """evaluations >= 0 (0: no search), candidates in [2·steps, MAX_CANDIDATES] (None: max(64, 2·steps)) and
    reference_rtol in [1e-12, 1e-3], as the messages state; a bool is not a count."""
    check = solvers.optimize._check_budget
    assert check(0, None, 1e-6, 5) == 64 and check(0, None, 1e-6, 40) == 80
    assert check(120, solvers.optimize.MAX_CANDIDATES, 1e-12, 5) == 2_000
    assert check(120, 10, 1e-3, 5) == 10
    with pytest.raises(ValueError, match=r"evaluations must be an integer >= 0 .*got True"):
        check(True, None, 1e-6, 5)


def test_a_bad_model_or_state_is_refused():
    model, calls = _counting_model()
    with pytest.raises(TypeError, match="DiffusionModel"):
        solvers.optimize_timesteps(lambda x, t: x, _noise(range(4)), solver="ddim", steps=3)
    with pytest.raises(TypeError, match=r"^x_T must be a real floating tensor"):
        solvers.optimize_timesteps(model, torch.zeros(4, 2, dtype=torch.long), solver="ddim", steps=3)
    assert calls == []


# -- the search internals, each on a problem whose answer is known independently --------------------------

def _cost_matrix(m, seed):
    """A cost matrix as :func:`solvers.optimize._dp_costs` gives: positive above the diagonal, inf elsewhere."""
    g = torch.Generator().manual_seed(seed)
    cost = torch.full((m, m), math.inf, dtype=torch.float64)
    upper = torch.triu(torch.ones(m, m, dtype=torch.bool), 1)
    cost[upper] = torch.rand(int(upper.sum()), generator=g, dtype=torch.float64)
    return cost


def _path_cost(cost, path, skip=None):
    start = 0.0 if skip is None or path[0] == 0 else float(skip[path[0]])
    return start + sum(float(cost[a, b]) for a, b in zip(path, path[1:]))


@pytest.mark.parametrize("m, transitions, seed", [(8, 3, 0), (9, 4, 1), (7, 1, 2), (7, 6, 3)])
def test_the_dp_path_is_the_least_cost_path_found_by_enumerating_every_path(m, transitions, seed):
    """_dp_path against brute force: every increasing path 0 → m − 1 of ``transitions`` steps (fixed start),
    and with a skip cost every path from any first level (free start)."""
    import itertools
    cost = _cost_matrix(m, seed)
    fixed = [[0, *inner, m - 1] for inner in itertools.combinations(range(1, m - 1), transitions - 1)]
    best = min(fixed, key=lambda p: _path_cost(cost, p))
    assert solvers.optimize._dp_path(cost, transitions) == best
    skip = torch.rand(m, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64) * 0.5
    skip[0] = 0.0
    free = [[*head, m - 1] for head in itertools.combinations(range(m - 1), transitions)]
    best_free = min(free, key=lambda p: _path_cost(cost, p, skip))
    assert solvers.optimize._dp_path(cost, transitions, skip) == best_free


def test_the_dp_path_of_a_convex_step_cost_is_evenly_spaced_and_a_cheap_skip_moves_its_start():
    """cost (j − i)² is least for equal steps: 0, 2, 4, 6, 8.  With skip cost i₀ and two steps, the start
    i₀ = 6 (6 + 1 + 1 = 8) beats i₀ = 0 (0 + 16 + 16), 4 (4 + 4 + 4) and 5 (5 + 1 + 4)."""
    idx = torch.arange(9, dtype=torch.float64)
    cost = torch.where(idx[None, :] > idx[:, None], (idx[None, :] - idx[:, None]) ** 2, math.inf)
    assert solvers.optimize._dp_path(cost, 4) == [0, 2, 4, 6, 8]
    assert solvers.optimize._dp_path(cost, 2) == [0, 4, 8]
    assert solvers.optimize._dp_path(cost, 2, idx.clone()) == [6, 7, 8]


def test_dp_costs_are_the_rms_error_of_one_ddim_step_between_every_pair_of_levels():
    """cost[i, j] is the RMS difference between the solver's own DDIM step from state i (at level i) to level j
    and state j, for every i < j; inf on and below the diagonal."""
    model, calls = _counting_model()
    levels = [1.0, 0.7, 0.4, 0.2, 0.05]
    states = [_noise(range(10 * k, 10 * k + 6)) for k in range(len(levels))]
    cost = solvers.optimize._dp_costs(model, levels, states)
    assert len(calls) == len(levels) - 1  # one denoiser call per level but the last
    for i in range(len(levels)):
        for j in range(len(levels)):
            if j <= i:
                assert cost[i, j] == math.inf, (i, j)
                continue
            step = solvers.sample(model, states[i], "ddim", timesteps=[levels[i], levels[j]]).samples
            assert math.isclose(float(cost[i, j]), _rms(step, states[j]), rel_tol=1e-9), (i, j)


def test_dp_costs_vanish_where_ddim_is_exact():
    """On a point mass the denoiser is the point whatever the state, and a DDIM step from the exact state
    α_i·μ + σ_i·ε lands on α_j·μ + σ_j·ε: every cost is zero to rounding."""
    point = pretrained.analytic.GaussianMixture([[1.5, -0.5]], [1e-9])
    model = point.as_model(VP, "eps")
    levels = [1.0, 0.8, 0.5, 0.3, 0.1, VP.default_t_end]
    eps = _noise(range(6))
    mu = point.means[0]
    states = [float(VP.alpha(t)) * mu + float(VP.sigma(t)) * eps for t in levels]
    cost = solvers.optimize._dp_costs(model, levels, states)
    upper = torch.triu(torch.ones_like(cost, dtype=torch.bool), 1)
    assert float(cost[upper].max()) < 1e-12
    assert bool(torch.isinf(cost[~upper]).all())


def _target_problem(steps=5, free_start=False):
    """A compass search whose objective is the RMS distance, in λ, of a grid's levels from a target grid's."""
    t_end = VP.default_t_end
    coord = solvers.optimize._Coordinate(VP, 1.0, t_end, free_start)
    n = steps if not free_start else steps + 1
    target = coord.levels(torch.log(torch.linspace(1.0, 2.0, n, dtype=torch.float64)))
    runs = []

    def objective(grid):
        runs.append(list(grid))
        assert grid[-1] == 0.0  # the tail is appended
        s, s_target = coord.s(grid[:-1]), coord.s(target)
        return float((s - s_target).pow(2).mean().sqrt())

    start = coord.levels(torch.zeros(n, dtype=torch.float64)) + [0.0]
    return coord, objective, start, runs


def test_the_compass_search_never_rises_keeps_its_budget_and_reaches_a_known_minimum():
    coord, objective, start, runs = _target_problem()
    err0 = objective(start)
    runs.clear()
    # No budget: the start comes back, untried.
    assert solvers.optimize._compass_search(objective, coord, start, err0, [0.0], 0) == (start, err0)
    assert runs == []
    # A small budget is spent exactly (δ = 0.5 stays far above its floor); the error never rises.  The first
    # grids tried are the first logit moved by +δ, δ = 0.5 (away from the target, which wants it smaller than
    # the others), then by −δ.
    grid, err = solvers.optimize._compass_search(objective, coord, start, err0, [0.0], 7)
    assert len(runs) == 7 and err <= err0 and err == objective(grid)
    for trial, sign in zip(runs, (1.0, -1.0)):
        theta = torch.zeros(5, dtype=torch.float64)
        theta[0] = 0.5 * sign
        assert trial == pytest.approx(coord.levels(theta) + [0.0], rel=1e-12)
    # A large budget ends when δ falls below 1e-3 (not by the budget), at the target (error 0) to within what a
    # logit step of the last δ moves a level: at most δ times the λ range.
    runs.clear()
    grid, err = solvers.optimize._compass_search(objective, coord, start, err0, [0.0], 2_000)
    assert len(runs) < 2_000
    assert err < 1e-3 * abs(coord.s1 - coord.s0) < 0.1 * err0 and err == objective(grid)
    assert grid[0] == 1.0 and grid[-2:] == [VP.default_t_end, 0.0]
    assert all(a > b for a, b in zip(grid, grid[1:]))


def test_the_compass_search_on_a_flat_objective_halves_its_step_nine_times_and_keeps_the_start():
    """No move improves a constant error (an equal one is no improvement): every sweep tries each of the 5
    logits ± δ and halves δ; from 0.5, δ falls below 1e-3 after 9 halvings (0.5 / 2⁸ ≈ 2.0e-3, 0.5 / 2⁹ ≈
    9.8e-4): 9 sweeps of 10 runs."""
    coord, _, start, _ = _target_problem()
    runs = []

    def flat(grid):
        runs.append(grid)
        return 1.0

    assert solvers.optimize._compass_search(flat, coord, start, 1.0, [0.0], 10_000) == (start, 1.0)
    assert len(runs) == 9 * 2 * 5
    # The first move improves, none after it: that sweep (1 + 4 × 2 runs) keeps δ = 0.5, then 9 flat sweeps.
    runs.clear()

    def first_move_improves(grid):
        return 0.5 if not runs and not runs.append(grid) else flat(grid)

    grid, err = solvers.optimize._compass_search(first_move_improves, coord, start, 1.0, [0.0], 10_000)
    assert err == 0.5 and grid == runs[0] and len(runs) == 1 + 4 * 2 + 9 * 2 * 5


def test_start_state_scales_to_the_prior_at_the_later_time_as_initial_noise_does():
    """VE/EDM: the draw at σ = 80 becomes that at σ = 5 by the factor 5/80, what initial_noise(t=5) gives from the
    same seeds; VP: unchanged (the prior is N(0, I) at every time)."""
    edm = schedules.EDM()
    seeds = range(6)
    x80 = solvers.initial_noise((6, 2), seeds=seeds, schedule=edm, dtype=torch.float64)
    x5 = solvers.initial_noise((6, 2), seeds=seeds, schedule=edm, t=5.0, dtype=torch.float64)
    moved = solvers.optimize.start_state(edm, x80, 80.0, 5.0)
    assert torch.allclose(moved, x80 * (5.0 / 80.0), rtol=1e-12) and torch.allclose(moved, x5, rtol=1e-12)
    x = _noise(seeds)
    assert torch.equal(solvers.optimize.start_state(VP, x, 1.0, 0.5), x)


def test_coordinate_levels_and_logits_are_inverse_and_keep_the_ends():
    """levels(logits(grid)) is the grid (fixed start: its first level is hi; free start: a level below hi)."""
    coord = solvers.optimize._Coordinate(VP, 1.0, VP.default_t_end)
    grid = [1.0, 0.6, 0.3, 0.1, VP.default_t_end]
    back = coord.levels(coord.logits(grid))
    assert back[0] == 1.0 and back[-1] == VP.default_t_end
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(back, grid)), back
    free = solvers.optimize._Coordinate(VP, 1.0, VP.default_t_end, free_start=True)
    grid = [0.8, 0.6, 0.3, 0.1, VP.default_t_end]
    back = free.levels(free.logits(grid))
    assert len(back) == len(grid) and back[-1] == VP.default_t_end
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(back, grid)), back
    # A free-start grid that starts at hi: its skipped stretch is raised to SKIP_FLOOR of a mean step (the λ range
    # over the grid's 4 steps); the other increments are the grid's own.
    grid = [1.0, 0.6, 0.3, 0.1, VP.default_t_end]
    inc = torch.exp(free.logits(grid))
    span = abs(free.s1 - free.s0)
    assert math.isclose(float(inc[0]), free.SKIP_FLOOR * span / 4, rel_tol=1e-12)
    assert torch.allclose(inc[1:], torch.diff(free.s(grid)), rtol=1e-12)


def test_the_reference_follows_the_exact_solution_and_its_error_estimate_bounds_its_error():
    """_reference: the final states and every state on the way match SciPy's DOP853 solution; the reported
    error (the difference from a run at 10× the tolerance, which is that run's error) is above the reference's
    true error and of the order of that run's tolerance 10·rtol (asserted below 5× it); the model calls are
    those counted."""
    model, calls = _counting_model()
    x_T = _noise(range(8))
    grid = [1.0, 0.6, 0.3, VP.default_t_end, 0.0]
    ref, states, nfe, err = solvers.optimize._reference(model, x_T, grid, 1e-6)
    assert nfe == len(calls)
    assert len(states) == len(grid) and states[0] is x_T
    for t, x in zip(grid[1:-1], states[1:-1]):
        exact = RING.ode_solution(VP, x_T, 1.0, t, rtol=1e-10, atol=1e-12, per_sample=False)
        assert _rms(x, exact) < 1e-4, t
    exact = _exact_final(x_T, grid)
    assert torch.equal(states[-1], ref)
    true_err = _rms(ref, exact)
    assert true_err < err < 5 * (10 * 1e-6), (true_err, err)


@pytest.mark.parametrize("schedule, fine", [
    (VP, torch.linspace(1.0, 0.1, 9, dtype=torch.float64).tolist()),
    (schedules.EDM(), torch.logspace(math.log10(80.0), math.log10(0.5), 9, dtype=torch.float64).tolist()),
])
def test_the_free_start_dp_grid_starts_where_skipping_to_it_and_stepping_on_costs_least(schedule, fine):
    """_improve with the first time free: its DP grid (the first grid it scores) may start at any level i, a
    skip there costing the RMS difference between the starting states moved to level i (unchanged on VP, scaled
    by σ_i/σ_0 on EDM) and the reference state at i.  Here the reference states at levels 2–4 are the starting states (free skips), level 1's is 5
    away, and from level 5 on they move 10 a level; steps cost (j − i)²/10: the least total is the free skip
    to level 4, then two equal steps (0.4 + 0.4), against 3.2 from level 0, 5 + 2.5 from level 1 and ≥ 10 from 5.
    Of the two searches' results (none here: no budget), the one of lower error is kept: the start's."""
    from types import SimpleNamespace
    m = 9
    x = _noise(range(4), float(schedule.prior_std(fine[0])))  # the prior's draw at the first level
    offset = [0.0, 5.0, 0.0, 0.0, 0.0, 10.0, 20.0, 30.0, 40.0]
    trajectory = [x * float(schedule.prior_std(t) / schedule.prior_std(fine[0])) + d for t, d in zip(fine, offset)]
    idx = torch.arange(m, dtype=torch.float64)
    cost = torch.where(idx[None, :] > idx[:, None], (idx[None, :] - idx[:, None]) ** 2 / 10, math.inf)
    scored = []

    def objective(grid):
        scored.append(list(grid))
        return 1.0

    coord = solvers.optimize._Coordinate(schedule, fine[0], fine[-1], free_start=True)
    start = [fine[0], fine[3], fine[-1], 0.0]
    kept = solvers.optimize._improve(SimpleNamespace(schedule=schedule), objective, coord, fine, trajectory, [0.0],
                                     2, cost, start, 0.5, 0)
    assert scored == [[fine[4], fine[6], fine[8], 0.0]]
    assert kept == (start, 0.5)


@pytest.mark.parametrize("dp_err, expected", [(0.5, "dp"), (1.0, "start"), (2.0, "start")])
def test_the_fixed_start_search_begins_from_the_dp_grid_only_when_it_is_better(dp_err, expected):
    """_improve with the first time kept: the search starts from the DP grid if it scores below the default
    grid, else from the default (a tie keeps the default); with no budget that start is the answer."""
    from types import SimpleNamespace
    fine = torch.linspace(1.0, 0.1, 7, dtype=torch.float64).tolist()
    trajectory = [torch.zeros(2, 2, dtype=torch.float64)] * 7
    idx = torch.arange(7, dtype=torch.float64)
    cost = torch.where(idx[None, :] > idx[:, None], (idx[None, :] - idx[:, None]) ** 2, math.inf)
    dp = [fine[0], fine[2], fine[4], fine[6], 0.0]
    start = [fine[0], fine[1], fine[2], fine[6], 0.0]
    coord = solvers.optimize._Coordinate(VP, fine[0], fine[-1])
    grid, err = solvers.optimize._improve(SimpleNamespace(schedule=VP), lambda g: dp_err, coord, fine,
                                          trajectory, [0.0], 3, cost, start, 1.0, 0)
    assert (grid, err) == ((dp, dp_err) if expected == "dp" else (start, 1.0))

"""Option ranges at their edges, the orders each solver reports, and the paths only an edge case reaches.

Written against the survivors of a mutation run (reports/mutation_testing.md): each test here failed for at
least one mutant that the rest of the suite let through — an open bound made closed, a reported order off by
one, a final step that re-noised, a branch taken for η = 0.
"""
from __future__ import annotations

import math

import pytest
import torch

import solvers
from pretrained.analytic import gaussian, gmm2d
from solvers import schedules

pytestmark = pytest.mark.usefixtures("single_thread")

MIX = gmm2d("ring")
VP = schedules.VPLinear()
GRID = [0.95, 0.6, 0.3, 0.12, 0.03]          # 4 steps, not to σ = 0
GRID_TO_ZERO = GRID + [VP.t_zero]


def _x(n=4):
    return solvers.initial_noise((n, 2), seeds=range(n), schedule=VP, dtype=torch.float64)


def _run(solver, grid, **options):
    return solvers.sample(MIX.as_model(VP), _x(), solver, timesteps=grid, seeds=range(4), dtype=torch.float64,
                          **options)


# --- ranges: the bound itself and just past it ----------------------------------------------------------------

@pytest.mark.parametrize("solver, option, bad, good", [
    ("dpmpp_2s", "r", 0.0, 1e-3),            # r ∈ (0, 1): both ends open
    ("dpmpp_2s", "r", -0.5, 0.999),
    ("dpmpp_2s", "r", 1.0, 0.5),
    ("dpmpp_2m_sde", "eta", -1e-9, 0.0),      # η ≥ 0
    ("consistency", "sigma_boundary", -1e-9, 0.0),
    ("ddim", "eta", 1.0 + 1e-9, 1.0),         # η ∈ [0, 1]
    ("ddim", "eta", -1e-9, 0.0),
    ("heun", "s_churn", -1e-9, 0.0),
])
def test_each_range_refuses_just_outside_and_accepts_its_edge(solver, option, bad, good):
    with pytest.raises(ValueError, match=rf"^{solver}: {option} must be in "):
        solvers.get_solver(solver, **{option: bad})
    assert getattr(solvers.get_solver(solver, **{option: good}), option) == good


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "deis", "unipc"])
def test_a_bad_lower_order_final_names_the_solver(solver):
    with pytest.raises(ValueError, match=rf"^{solver}: lower_order_final must be True, False or 'auto', got 'yes'"):
        solvers.get_solver(solver, lower_order_final="yes")


# --- the orders each step reports -----------------------------------------------------------------------------

def test_dpmpp_2s_reports_second_order_steps_and_a_first_order_final_step():
    assert _run("dpmpp_2s", GRID).orders == [2, 2, 2, 2]
    assert _run("dpmpp_2s", GRID_TO_ZERO).orders == [2, 2, 2, 2, 1]


@pytest.mark.parametrize("lower, grid, expected", [
    (False, GRID, [1, 2, 2, 2]),
    (True, GRID, [1, 2, 2, 1]),
    (False, GRID_TO_ZERO, [1, 2, 2, 2, 1]),
    ("auto", GRID, [1, 2, 2, 1]),           # auto: below 15 steps
])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_2m_sde_orders_follow_warm_up_lowering_and_the_final_step(eta, lower, grid, expected):
    assert _run("dpmpp_2m_sde", grid, eta=eta, lower_order_final=lower).orders == expected


def test_dpmpp_2m_sde_with_eta_zero_draws_no_noise_and_is_the_midpoint_2m():
    """η = 0 is deterministic (no noise stream is drawn: other seeds give the same samples) and equals the
    midpoint form of DPM-Solver++(2M): x_n = (σ_n/σ)·x − α_n·(e^{−h} − 1)·(D + (D − D_prev)/(2r))."""
    model = MIX.as_model(VP)
    x = _x()
    opts = dict(timesteps=GRID, eta=0.0, lower_order_final=False, dtype=torch.float64)
    a = solvers.sample(model, x, "dpmpp_2m_sde", seeds=range(4), **opts)
    b = solvers.sample(model, x, "dpmpp_2m_sde", seeds=range(10, 14), **opts)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    ref, prev = x.clone(), None
    for t0, t1 in zip(GRID[:-1], GRID[1:]):
        a0, s0, a1, s1 = (float(v) for v in (VP.alpha(t0), VP.sigma(t0), VP.alpha(t1), VP.sigma(t1)))
        lam0, lam1 = math.log(a0 / s0), math.log(a1 / s1)
        h = lam1 - lam0
        d = MIX.denoise(ref, a0, s0)
        dh = d if prev is None else d + (d - prev[0]) / (2 * (lam0 - prev[1]) / h)
        ref = s1 / s0 * ref - a1 * math.expm1(-h) * dh
        prev = (d, lam0)
    torch.testing.assert_close(a.samples, ref, rtol=1e-10, atol=1e-10)
    assert a.orders == [1, 2, 2, 2] and not solvers.get_solver("dpmpp_2m_sde", eta=0.0).is_stochastic


def test_consistency_returns_the_prediction_on_the_last_step_of_a_grid_that_stops_short_of_zero():
    """Algorithm 1 re-noises between steps only: the last step returns f(x, t) even when the grid ends at
    t_end > t_zero (the exact consistency function of a Gaussian makes the expected value closed-form)."""
    g = gaussian(dim=2, mean=0.5, std=0.7)
    model = solvers.DiffusionModel(g.consistency_network(VP), schedule=VP, prediction="x0")
    x = _x()
    res = solvers.sample(model, x, "consistency", timesteps=[0.9, 0.4], seeds=range(4), dtype=torch.float64)
    torch.testing.assert_close(res.samples, g.flow_map(VP, x, 0.9, VP.t_zero), rtol=1e-12, atol=1e-12)
    res = solvers.sample(model, x, "consistency", timesteps=[0.9, 0.4, 0.1], seeds=range(4), dtype=torch.float64)
    assert res.orders == [1, 1] and res.nfe == 2


@pytest.mark.parametrize("options, message", [
    (dict(predictor="langevin"), "^pc: predictor must be a registered fixed-grid solver other than adaptive, langevin, "
                                 "pc, got 'langevin'$"),
    (dict(predictor_options=[1]), "^pc: predictor_options must be a dict of the predictor's options, got list$"),
    (dict(corrector_steps=0), "^pc: corrector_steps must be a positive integer, got 0$"),
])
def test_pc_options_are_named_in_full(options, message):
    with pytest.raises(ValueError, match=message):
        solvers.get_solver("pc", **options)


@pytest.mark.parametrize("variable", ["logrho", "t"])
@pytest.mark.parametrize("ends", [(1.0, 0.0), (0.0, 1.0)])
def test_log_and_time_adams_weights_need_positive_rho_at_both_ends(variable, ends):
    """ρ = 0 (σ = 0) has log ρ = −∞: the log-ρ and t polynomials cannot be integrated to or from it."""
    from solvers.deis import adams_weights
    with pytest.raises(ValueError, match=rf"variable '{variable}' needs ρ > 0 at both ends"):
        adams_weights([ends[0] or 0.5, 2.0], ends[0], ends[1], variable, VP)
    assert len(adams_weights([1.0, 2.0], 1.0, 0.0, "rho")) == 2  # a polynomial in ρ reaches ρ = 0


# --- Heun's churn window (Karras et al. 2022, Algorithm 2: S_tmin ≤ t_i ≤ S_tmax, both inclusive) -------------

EDM = schedules.EDM()
EDM_GRID = [80.0, 20.0, 5.0, 1.0, 0.2, 0.0]   # on EDM, ρ = σ = t exactly: the bounds can sit on a grid point


def _heun(**options):
    options = {"s_churn": 2.0, **options}
    g = gaussian(dim=2, mean=0.5, std=0.7)
    x = solvers.initial_noise((4, 2), seeds=range(4), schedule=EDM, dtype=torch.float64)
    return solvers.sample(g.as_model(EDM), x, "heun", timesteps=EDM_GRID, seeds=range(4), dtype=torch.float64,
                          **options)


def test_heun_churn_window_includes_its_bounds():
    at = _heun(s_tmin=5.0, s_tmax=20.0).samples
    torch.testing.assert_close(at, _heun(s_tmin=math.nextafter(5.0, 0.0), s_tmax=math.nextafter(20.0, 99.0)).samples,
                               rtol=0, atol=0)
    assert not torch.equal(at, _heun(s_tmin=math.nextafter(5.0, 99.0), s_tmax=20.0).samples)
    assert not torch.equal(at, _heun(s_tmin=5.0, s_tmax=math.nextafter(20.0, 0.0)).samples)


def test_heun_does_not_churn_where_the_raised_level_is_capped_at_t_max():
    """At t_max the churned level σ̂ = σ(1 + γ) is capped back to σ: no noise is drawn there, so the samples
    equal those of a window that leaves t_max out."""
    torch.testing.assert_close(_heun().samples, _heun(s_tmax=79.0).samples, rtol=0, atol=0)


def test_heun_reports_second_order_steps_and_a_first_order_final_step():
    assert _heun().orders == [2, 2, 2, 2, 1]
    assert _heun().nfe == 9


# --- more reported orders: first-order methods, Langevin, the multistep warm-up and the final step -------------

@pytest.mark.parametrize("solver, options, grid, expected", [
    ("euler_maruyama", {}, GRID_TO_ZERO, [1, 1, 1, 1, 1]),
    ("langevin", dict(steps_per_level=2), GRID_TO_ZERO, [1, 1, 1, 1, 1]),
    ("dpmpp_2m", dict(lower_order_final=False), GRID_TO_ZERO, [1, 2, 2, 2, 1]),
    ("dpmpp_2m", dict(lower_order_final=True), GRID, [1, 2, 2, 1]),
    ("dpmpp_3m", dict(lower_order_final=False), GRID_TO_ZERO, [1, 2, 3, 3, 1]),
    ("dpmpp_3m", dict(lower_order_final=True), GRID, [1, 2, 2, 1]),
    ("deis", dict(lower_order_final=False), GRID_TO_ZERO, [1, 2, 2, 2, 1]),
    ("deis", dict(lower_order_final=True, solver_order=3), GRID, [1, 2, 2, 1]),
])
def test_orders_reported_per_step(solver, options, grid, expected):
    assert _run(solver, grid, **options).orders == expected


# --- grids a solver cannot integrate: refused before sampling, with the whole reason -------------------------

RF = schedules.RectifiedFlow()   # α(1) = 0: λ, ρ and the SDE drift are infinite at t = 1


def _run_rf(solver, grid, **options):
    g = gaussian(dim=2, mean=0.5, std=0.7)
    x = solvers.initial_noise((4, 2), seeds=range(4), schedule=RF, dtype=torch.float64)
    return solvers.sample(g.as_model(RF, prediction="velocity"), x, solver, timesteps=grid, seeds=range(4),
                          dtype=torch.float64, **options)


@pytest.mark.parametrize("grid", [[1.0, 0.5], [1.0, 0.5, 0.2]])
@pytest.mark.parametrize("solver, message", [
    ("dpmpp_2m", r"^dpmpp_2m steps in log-SNR λ, which is infinite at t=1\.0 \(α = 0 there\); start the grid just "
                 r"below it \(e\.g\. t_start=0\.999\) or use euler/heun, which integrate in t$"),
    ("deis", r"^deis steps in ρ = σ/α, which is infinite at t=1\.0 \(α = 0 there\); start the grid just below it or "
             r"use euler/heun$"),
    ("euler_maruyama", r"^euler_maruyama: the SDE coefficients are not finite at t=1\.0 \(Point: f=inf, g²=inf\); "
                       r"start the grid lower$"),
])
def test_a_grid_from_alpha_zero_is_refused_in_full_even_with_one_step(solver, message, grid):
    with pytest.raises(ValueError, match=message):
        _run_rf(solver, grid)
    assert _run_rf(solver, [0.5, 0.2]).orders == [1]


@pytest.mark.parametrize("schedule", [RF, EDM])
def test_ddpm_large_variance_is_refused_off_variance_preserving_schedules(schedule):
    g = gaussian(dim=2, mean=0.5, std=0.7)
    grid = [0.5, 0.2] if schedule is RF else [5.0, 1.0]
    x = solvers.initial_noise((2, 2), seeds=range(2), schedule=schedule, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^ddpm: variance='large' \(β_t\) is defined on variance-preserving "
                                         r"schedules only$"):
        solvers.sample(g.as_model(schedule), x, "ddpm", variance="large", timesteps=grid, seeds=range(2))
    assert _run("ddpm", GRID, variance="large").orders == [1, 1, 1, 1]


def test_heun_accepts_a_churn_window_of_one_level_and_refuses_an_inverted_one():
    assert solvers.get_solver("heun", s_tmin=5.0, s_tmax=5.0).s_tmax == 5.0
    with pytest.raises(ValueError, match=r"^heun: s_tmin=5\.0 must not exceed s_tmax=4\.9$"):
        solvers.get_solver("heun", s_tmin=5.0, s_tmax=4.9)


def test_heun_with_a_churn_window_only_at_t_max_is_the_churn_free_sampler():
    """The only level in the window is t_max = 80, where σ̂ is capped back to σ: nothing is churned."""
    torch.testing.assert_close(_heun(s_tmin=80.0).samples, _heun(s_churn=0.0).samples, rtol=0, atol=0)


# --- Langevin -------------------------------------------------------------------------------------------------

def test_langevin_snr_rule_takes_no_step_where_the_score_is_zero():
    """x0-prediction D(x) = x on EDM (α = 1): the score (α·D − x)/σ² is exactly 0 everywhere, so the SNR rule's
    δ = 2(r‖z‖/‖s‖)² would be infinite; such a sample takes no step and stays where it is."""
    model = solvers.DiffusionModel(lambda x, t: x.clone(), schedule=EDM, prediction="x0")
    x = solvers.initial_noise((3, 2), seeds=range(3), schedule=EDM, dtype=torch.float64)
    res = solvers.sample(model, x, "langevin", step_rule="snr", steps_per_level=2, timesteps=[20.0, 5.0, 1.0],
                         seeds=range(3), dtype=torch.float64)
    torch.testing.assert_close(res.samples, x, rtol=0, atol=0)
    assert res.nfe == 4


def test_langevin_steps_per_level_is_named_in_full():
    with pytest.raises(ValueError, match=r"^langevin: steps_per_level must be a positive integer, got 0$"):
        solvers.get_solver("langevin", steps_per_level=0)


def test_pc_refuses_a_last_level_where_the_corrector_cannot_evaluate_the_model():
    """The corrector runs at t_{i+1}: on a one-step grid the predictor's check never sees that point."""

    class NoNetworkBelowHalf(solvers.DiffusionModel):
        def conversion_at(self, t):
            if bool((torch.as_tensor(t) < 0.5).any()):
                raise ValueError("no network below t=0.5")
            return super().conversion_at(t)

    model = NoNetworkBelowHalf(MIX.network(VP, "eps"), schedule=VP, prediction="eps")
    with pytest.raises(ValueError, match=r"^pc: the corrector cannot evaluate the model at t=0\.3: no network below "
                                         r"t=0\.5$"):
        solvers.sample(model, _x(), "pc", timesteps=[0.9, 0.3], seeds=range(4), dtype=torch.float64)
    assert solvers.sample(model, _x(), "pc", timesteps=[0.9, 0.6], seeds=range(4), dtype=torch.float64).nfe == 2


def test_time_adams_weights_on_a_discrete_schedule_match_an_adaptive_quadrature():
    """On DiscreteVP, t(ρ) is only piecewise smooth (log α is linear between integer t): the weights
    ∫ L_j(t(ρ)) dρ of a step over ten intervals match scipy's adaptive quadrature, split at every knot, to
    1e-6 (one Gauss panel over the whole step is off by ~3e-5 here)."""
    from scipy.integrate import quad

    from solvers.deis import adams_weights
    s = schedules.DiscreteVP.linear()
    rho_at = lambda t: float(s.sigma_ve(torch.tensor(float(t), dtype=torch.float64)))  # noqa: E731
    t_at = lambda r: float(s.t_from_sigma_ve(torch.tensor(r, dtype=torch.float64)))     # noqa: E731
    t_to, t_nodes = 20.5, (10.5, 3.5)                                   # step 10.5 → 20.5 in t (ρ increases)
    nodes = [rho_at(t) for t in t_nodes]
    edges = [nodes[0]] + [rho_at(k) for k in range(11, 21)] + [rho_at(t_to)]
    expected = []
    for j in range(2):
        basis = lambda r, j=j: (t_at(r) - t_nodes[1 - j]) / (t_nodes[j] - t_nodes[1 - j])  # noqa: E731
        expected.append(sum(quad(basis, a, b, epsabs=0.0, epsrel=1e-13)[0] for a, b in zip(edges, edges[1:])))
    weights = adams_weights(nodes, nodes[0], rho_at(t_to), "t", s)
    torch.testing.assert_close(torch.tensor(weights), torch.tensor(expected, dtype=torch.float64), rtol=1e-6,
                               atol=0.0)


class _KinkedVE(schedules.Schedule):
    """x = x0 + σ(t)·ε with σ(t) = t except an infinite dσ/dt at t = 0.5 (a finite drift f = 0, an infinite g²)."""

    name = "kinked_ve"

    def __init__(self):
        self.t_min, self.t_max, self.default_t_end, self.time_scale = 1e-3, 2.0, 1e-3, 1.0

    def alpha(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def sigma(self, t):
        return torch.as_tensor(t, dtype=torch.float64).clone()

    def d_alpha(self, t):
        return torch.zeros_like(torch.as_tensor(t, dtype=torch.float64))

    def d_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.where(t == 0.5, torch.full_like(t, math.inf), torch.ones_like(t))


def test_euler_maruyama_refuses_a_point_where_only_the_diffusion_coefficient_is_infinite():
    s = _KinkedVE()
    model = solvers.DiffusionModel(lambda x, t: torch.zeros_like(x), schedule=s, prediction="eps")
    x = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^euler_maruyama: the SDE coefficients are not finite at t=0\.5 \(Point: "
                                         r"f=0\.0, g²=inf\); start the grid lower$"):
        solvers.sample(model, x, "euler_maruyama", timesteps=[1.0, 0.5, 0.2], seeds=range(2))


class _VanishingAlphaVE(_KinkedVE):
    """α = 1 except α = 0 at t = 0.5 (σ = t): λ and ρ are infinite at an interior grid point."""

    name = "vanishing_alpha"

    def alpha(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.where(t == 0.5, torch.zeros_like(t), torch.ones_like(t))

    def d_sigma(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))


@pytest.mark.parametrize("solver, message", [
    ("dpmpp_2m", r"^dpmpp_2m steps in log-SNR λ, which is infinite at t=0\.5 \(α = 0 there\); start the grid just "
                 r"below it \(e\.g\. t_start=0\.4995\) or use euler/heun, which integrate in t$"),
    ("deis", r"^deis steps in ρ = σ/α, which is infinite at t=0\.5 \(α = 0 there\); start the grid just below it or "
             r"use euler/heun$"),
])
def test_log_snr_and_rho_solvers_check_every_point_they_evaluate_not_only_the_first(solver, message):
    s = _VanishingAlphaVE()
    model = solvers.DiffusionModel(lambda x, t: torch.zeros_like(x), schedule=s, prediction="x0")
    with pytest.raises(ValueError, match=message):
        solvers.sample(model, torch.zeros(2, 2, dtype=torch.float64), solver, timesteps=[1.0, 0.5, 0.2],
                       seeds=range(2))


# --- second mutation run's survivors --------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["euler", "ddim"])
def test_first_order_solvers_report_first_order_steps(solver):
    assert _run(solver, GRID).orders == [1, 1, 1, 1]
    assert _run(solver, GRID_TO_ZERO).orders == [1, 1, 1, 1, 1]


def test_ddim_from_where_alpha_vanishes_injects_the_full_eta_noise():
    """From t = 1 on rectified flow (α = 0, ρ = σ/α = ∞) DDIM's σ_t(η) = η·σ_n·sqrt(1 − (ρ_n/ρ)²) has ρ_n/ρ = 0:
    the whole η·σ_n is noise.  Two seeds therefore differ by η·σ_n·(z₁ − z₂) on the first step."""
    rf = schedules.RectifiedFlow()
    g = gaussian(dim=2, mean=0.5, std=0.7)
    x = solvers.initial_noise((2, 2), seeds=[0, 0], schedule=rf, dtype=torch.float64)
    res = solvers.sample(g.as_model(rf, "velocity"), x, "ddim", timesteps=[1.0, 0.5], eta=1.0, seeds=[3, 4],
                         dtype=torch.float64)
    spread = float((res.samples[0] - res.samples[1]).norm())
    assert spread > 0.05, "the two seeds must get different noise of scale η·σ_n = 0.5"


def test_q_sample_keeps_the_data_dtype():
    """x_t = α·x0 + σ·ε in the data's dtype (the float64 schedule values are cast, not the data promoted)."""
    for dtype in (torch.float32, torch.float64):
        x0 = torch.ones(3, 2, dtype=dtype)
        for s in (VP, schedules.EDM(), schedules.RectifiedFlow()):
            t = 0.5 if s.name != "edm" else 2.0
            out = s.q_sample(x0, t, torch.zeros_like(x0))
            assert out.dtype == dtype
            torch.testing.assert_close(out, torch.full_like(x0, float(s.alpha(t))))
            per_sample = s.q_sample(x0, torch.full((3,), t, dtype=torch.float64), torch.ones_like(x0))
            assert per_sample.dtype == dtype  # a (batch,) float64 α would promote float32 data
            torch.testing.assert_close(per_sample, torch.full_like(x0, float(s.alpha(t) + s.sigma(t))))


@pytest.mark.parametrize("factory, kwargs, message", [
    (schedules.VPCosine, dict(t_max=1.0), r"^VPCosine needs 0 < t_min <= default_t_end < t_max < 1, got t_min=1e-05, "
                                          r"default_t_end=0.001, t_max=1.0$"),
    (schedules.RectifiedFlow, dict(t_min=0.0), r"^RectifiedFlow needs 0 < t_min <= default_t_end < 1$"),
])
def test_schedule_range_errors_in_full(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)

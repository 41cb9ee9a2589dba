"""Schedules: α, σ, λ and their inverses, derivatives, SDE coefficients and time conventions.

Every identity is checked against an independent computation: finite differences for the derivatives,
a numerical solution of the forward SDE's moment equations for the drift and diffusion, NumPy's cumulative
product for the DDPM ᾱ table.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import solvers
from solvers import schedules


def interior_times(schedule: schedules.Schedule) -> torch.Tensor:
    """Times strictly inside the schedule's range (off the DiscreteVP knots, where λ is smooth)."""
    if isinstance(schedule, schedules.DiscreteVP):
        n = schedule.num_train_timesteps
        return torch.tensor([-0.63, 0.37, 3.5, 10.25, 0.1 * n + 0.6, 0.5 * n + 0.5, n - 1.6], dtype=torch.float64)
    lo, hi = max(schedule.t_min, schedule.default_t_end), schedule.t_max
    if isinstance(schedule, schedules.EDM):
        # σ spans four decades: space the points geometrically.
        return torch.logspace(math.log10(lo), math.log10(hi), 9, dtype=torch.float64)[1:-1]
    return torch.linspace(lo, hi, 9, dtype=torch.float64)[1:-1]


def central_difference(f, t: torch.Tensor, discrete: bool = False) -> torch.Tensor:
    """df/dt by a central difference (truncation error ~h²·|f‴|/6, rounding ~1e-16/h).

    On a DiscreteVP the step stays far inside one knot interval, and is absolute: near the end of the
    cosine table log α falls by up to ½·log(1 − 0.999) ≈ −3.5 per index, so α‴ is large there.
    """
    h = torch.full_like(t, 1e-7) if discrete else 1e-6 * torch.clamp(t.abs(), min=1.0)
    return (f(t + h) - f(t - h)) / (2 * h)


def test_log_snr_is_log_alpha_over_sigma(any_schedule):
    """λ(t) equals log α(t) − log σ(t), and σ/α is the VE noise level; VP schedules keep α² + σ² = 1."""
    s = any_schedule
    t = interior_times(s)
    alpha, sigma = s.alpha(t), s.sigma(t)
    torch.testing.assert_close(s.log_snr(t), torch.log(alpha) - torch.log(sigma), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.sigma_ve(t), sigma / alpha, rtol=1e-12, atol=0.0)
    assert bool((alpha > 0).all()) and bool((sigma > 0).all())
    if s.variance_preserving:
        torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(t), rtol=0.0, atol=1e-14)


def test_log_snr_decreases_with_time(any_schedule):
    """λ is strictly decreasing in t (noise grows with time), which the grids and λ-solvers rely on."""
    s = any_schedule
    t = interior_times(s)
    assert bool((s.log_snr(t)[1:] < s.log_snr(t)[:-1]).all())


def test_t_from_log_snr_inverts_log_snr(any_schedule):
    """t_from_log_snr(log_snr(t)) = t inside the range, and log_snr(t_from_log_snr(λ)) = λ."""
    s = any_schedule
    t = interior_times(s)
    scale = max(1.0, abs(s.t_max))
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-9, atol=1e-10 * scale)
    lam = torch.linspace(float(s.log_snr(t[-1])), float(s.log_snr(t[0])), 11, dtype=torch.float64)
    torch.testing.assert_close(s.log_snr(s.t_from_log_snr(lam)), lam, rtol=1e-9, atol=1e-9)


def test_t_zero_is_the_data(any_schedule):
    """At t_zero σ = 0, α = 1 (x_t is the data) and λ = +inf, which t_from_log_snr maps back to t_zero."""
    s = any_schedule
    assert float(s.sigma(s.t_zero)) == 0.0
    assert float(s.alpha(s.t_zero)) == pytest.approx(1.0, abs=1e-15)
    assert float(s.log_snr(s.t_zero)) == math.inf
    assert float(s.t_from_log_snr(math.inf)) == pytest.approx(s.t_zero, abs=1e-12)


def test_derivatives_match_finite_differences(any_schedule):
    """d_alpha and d_sigma equal central finite differences of α and σ."""
    s = any_schedule
    t, d = interior_times(s), isinstance(s, schedules.DiscreteVP)
    torch.testing.assert_close(s.d_alpha(t), central_difference(s.alpha, t, d), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s.d_sigma(t), central_difference(s.sigma, t, d), rtol=1e-6, atol=1e-9)


def test_drift_and_diffusion_match_the_marginals_pointwise(any_schedule):
    """f = d log α/dt and g² = dσ²/dt − 2fσ² (the forward SDE's moment equations), by finite differences."""
    s = any_schedule
    t, d = interior_times(s), isinstance(s, schedules.DiscreteVP)
    f = central_difference(lambda u: torch.log(s.alpha(u)), t, d)
    torch.testing.assert_close(s.drift(t), f, rtol=1e-6, atol=1e-9)
    g2 = central_difference(lambda u: s.sigma(u) ** 2, t, d) - 2 * f * s.sigma(t) ** 2
    torch.testing.assert_close(s.diffusion2(t), g2, rtol=1e-6, atol=1e-9)
    assert bool((s.diffusion2(t) > 0).all()), "g² must be positive: the forward process adds noise"


def test_vp_diffusion_is_minus_twice_d_log_alpha():
    """On VP schedules g²(t) = −2·d log α/dt: β(t) of Song et al. 2021, β_min + t·(β_max − β_min) on VPLinear."""
    for s in (schedules.VPLinear(), schedules.VPCosine(), schedules.DiscreteVP.linear()):
        t = interior_times(s)
        g2 = -2 * central_difference(lambda u: torch.log(s.alpha(u)), t, isinstance(s, schedules.DiscreteVP))
        torch.testing.assert_close(s.diffusion2(t), g2, rtol=1e-6, atol=1e-9)
    vp = schedules.VPLinear(beta_min=0.1, beta_max=20.0)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp.diffusion2(t), 0.1 + t * 19.9, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("name, t_a, t_b", [
    ("vp_linear", 1e-3, 1.0),
    ("vp_cosine", 1e-3, 0.99),
    ("discrete_vp", 10.5, 30.5),   # crosses 20 knots, where f and g² jump
    ("edm", 0.002, 80.0),
    ("rectified_flow", 0.05, 0.95),
])
def test_forward_sde_moments_reproduce_the_marginals(name, t_a, t_b):
    """Integrating m' = f·m and v' = 2f·v + g² from t_a to t_b gives m = α(t_b)/α(t_a) and v = σ(t_b)²."""
    s = schedules.get_schedule(name)

    def rhs(t, y):
        f, g2 = float(s.drift(t)), float(s.diffusion2(t))
        return [f * y[0], 2 * f * y[1] + g2]

    sol = solve_ivp(rhs, (t_a, t_b), [1.0, float(s.sigma(t_a)) ** 2], method="DOP853", rtol=1e-11, atol=1e-13)
    assert sol.success, sol.message
    m, v = sol.y[:, -1]
    assert m == pytest.approx(float(s.alpha(t_b) / s.alpha(t_a)), rel=1e-8)
    assert v == pytest.approx(float(s.sigma(t_b)) ** 2, rel=1e-8)


def test_discrete_vp_reproduces_alphas_cumprod_at_the_indices():
    """At integer t = i, α(i)² is ᾱ_i of the table (NumPy's cumulative product of 1 − β, linear betas)."""
    s = schedules.DiscreteVP.linear(1000)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    idx = torch.arange(1000, dtype=torch.float64)
    np.testing.assert_allclose((s.alpha(idx) ** 2).numpy(), abar, rtol=1e-14, atol=0)
    np.testing.assert_allclose((s.sigma(idx) ** 2).numpy(), 1.0 - abar, rtol=1e-12, atol=0)
    from_table = schedules.DiscreteVP(alphas_cumprod=torch.from_numpy(abar))
    torch.testing.assert_close(from_table.alpha(idx), s.alpha(idx), rtol=4e-15, atol=0.0)  # cumprod rounding
    assert (s.t_min, s.t_max, s.t_zero, s.num_train_timesteps) == (0.0, 999.0, -1.0, 1000)


def test_discrete_vp_t_zero_is_alpha_one():
    """t = −1 is the virtual ᾱ = 1 point (DDIM's set_alpha_to_one); the integers invert exactly through λ."""
    s = schedules.DiscreteVP.linear()
    assert float(s.alpha(-1.0)) == 1.0 and float(s.sigma(-1.0)) == 0.0
    idx = torch.arange(0, 1000, 37, dtype=torch.float64)
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(idx)), idx, rtol=0.0, atol=1e-8)


def test_discrete_vp_interpolates_log_alpha_linearly_and_derives_from_below():
    """Between indices log α is linear; at an index the derivative is the slope of the interval below it."""
    s = schedules.DiscreteVP.linear()
    la = lambda t: float(torch.log(s.alpha(t)))  # noqa: E731
    assert la(10.25) == pytest.approx(0.75 * la(10.0) + 0.25 * la(11.0), rel=1e-14)
    # Solver time decreases, so a step leaving index k uses the interval [k − 1, k].
    assert float(s.drift(10.0)) == pytest.approx(la(10.0) - la(9.0), rel=1e-12)
    assert float(s.drift(10.5)) == pytest.approx(la(11.0) - la(10.0), rel=1e-12)


def test_discrete_vp_rejects_times_outside_its_table():
    """α at a time outside [−1, N − 1] raises a ValueError naming the valid range."""
    s = schedules.DiscreteVP.linear(1000)
    for bad in (-1.5, 999.5):
        with pytest.raises(ValueError, match=r"outside \[-1.0, 999.0\]"):
            s.alpha(bad)


def test_model_time_conventions():
    """The network time is t·time_scale; DiscreteVP's integer_time rounds to the trained index."""
    assert float(schedules.VPLinear(time_scale=999.0).model_time(0.5)) == pytest.approx(499.5, rel=1e-15)
    assert float(schedules.RectifiedFlow(time_scale=1000.0).model_time(0.25)) == pytest.approx(250.0, rel=1e-15)
    assert float(schedules.EDM().model_time(3.0)) == 3.0
    assert float(schedules.DiscreteVP.linear().model_time(250.0)) == 250.0
    assert float(schedules.DiscreteVP.linear(time_scale=1 / 1000).model_time(250.0)) == pytest.approx(0.25)
    rounded = schedules.DiscreteVP.linear(integer_time=True)
    assert rounded.model_time(torch.tensor([10.4, 10.6, 0.2])).tolist() == [10.0, 11.0, 0.0]


def test_network_receives_the_model_time(make_recorder):
    """The sampling loop calls the network with schedule.model_time of each grid time, one per batch row."""
    s = schedules.DiscreteVP.linear(integer_time=True, time_scale=2.0)
    rec = make_recorder(lambda x, t: torch.zeros_like(x))
    model = solvers.DiffusionModel(rec, schedule=s, prediction="eps")
    grid = [900.3, 500.0, 100.7, -1.0]
    solvers.sample(model, torch.zeros(3, 2, dtype=torch.float64), "euler", timesteps=grid)
    assert [c[0] for c in rec.calls] == [3, 3, 3]
    assert [c[1] for c in rec.calls] == [[1800.0], [1000.0], [202.0]]


def test_prior_std_and_q_sample(any_schedule):
    """x_T is drawn with std σ(t_max) scaled to the prior (1 on VP); q_sample is α·x0 + σ·noise per sample."""
    s = any_schedule
    expected = 1.0 if s.variance_preserving else float(s.sigma(s.t_max))
    assert s.prior_std(s.t_max) == pytest.approx(expected, rel=1e-12)
    x0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = interior_times(s)[:3]
    want = s.alpha(t)[:, None] * x0 + s.sigma(t)[:, None] * noise
    torch.testing.assert_close(s.q_sample(x0, t, noise), want, rtol=1e-15, atol=0.0)


def test_get_schedule_builds_by_name_and_rejects_unknown_names():
    """get_schedule returns the named schedule with its options, and an unknown name lists the valid ones."""
    assert isinstance(schedules.get_schedule("edm", sigma_max=10.0), schedules.EDM)
    assert schedules.get_schedule("vp_linear", beta_max=10.0).beta_max == 10.0
    assert isinstance(schedules.get_schedule("discrete_vp"), schedules.DiscreteVP)
    with pytest.raises(ValueError, match="unknown schedule 'vp_quadratic'") as err:
        schedules.get_schedule("vp_quadratic")
    for name in schedules.available_schedules():
        assert name in str(err.value)


@pytest.mark.parametrize("build, message", [
    (lambda: schedules.VPLinear(beta_min=2.0, beta_max=1.0), "beta_min < beta_max"),
    (lambda: schedules.VPLinear(t_min=0.1, default_t_end=0.01), "t_min <= default_t_end"),
    (lambda: schedules.EDM(sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"),
    (lambda: schedules.DiscreteVP([0.5]), "at least 2 values"),
    (lambda: schedules.DiscreteVP([0.1, 1.5]), r"each in \(0, 1\)"),
    (lambda: schedules.DiscreteVP(alphas_cumprod=[0.5, 0.9]), "strictly decreasing"),
    (lambda: schedules.DiscreteVP([0.1, 0.2], alphas_cumprod=[0.9, 0.8]), "exactly one of"),
])
def test_bad_schedule_parameters_raise(build, message):
    """Invalid schedule parameters raise a ValueError that says what is required."""
    with pytest.raises(ValueError, match=message):
        build()


# --- α ∈ [0, 1] and σ ≥ 0 by construction, whatever the CPU's rounding ------------------------------------

def test_cosine_log_alpha_is_exactly_zero_at_t_zero_and_accurate_near_it():
    """log α(0) = 0 exactly (sin 0 = 0 in IEEE arithmetic on every CPU), log α < 0 for t > 0, and the value
    near 0 agrees with the first-order expansion −tan θ(0)·δ, δ = π/2·t/(1+s), where the former
    log cos θ(t) − log cos θ(0) rounded to ±1e-20 at t = 0 (NaN σ on an AMD EPYC) and lost 4 digits at 1e-12."""
    s = schedules.VPCosine()
    assert float(s.log_alpha(0.0)) == 0.0
    t = torch.tensor([1e-300, 1e-15, 1e-12], dtype=torch.float64)
    delta = math.pi / 2 * t / (1 + s.s)
    first_order = -math.tan(math.pi / 2 * s.s / (1 + s.s)) * delta
    torch.testing.assert_close(s.log_alpha(t), first_order, rtol=1e-8, atol=0.0)
    assert bool((s.log_alpha(t) < 0).all())


@pytest.mark.parametrize("shift", [1e-20, 1e-16, 0.0])
@pytest.mark.parametrize("factory", [schedules.VPLinear, schedules.VPCosine, schedules.DiscreteVP.linear,
                                     schedules.DiscreteVP.cosine], ids=["vp_linear", "vp_cosine",
                                                                        "discrete_linear", "discrete_cosine"])
def test_vp_log_alpha_that_rounds_above_zero_is_clamped(factory, shift, monkeypatch):
    """A raw log α a hair above 0 (a CPU's rounding, simulated) still gives α = 1, σ = 0 and λ = +∞ at
    t_zero, and α ∈ [0, 1], σ ∈ [0, 1] with finite λ on the whole range above it."""
    s = factory()
    raw = type(s)._raw_log_alpha
    monkeypatch.setattr(s, "_raw_log_alpha", lambda t: raw(s, t) + shift)
    assert float(s.log_alpha(s.t_zero)) == 0.0
    assert float(s.alpha(s.t_zero)) == 1.0 and float(s.sigma(s.t_zero)) == 0.0
    assert float(s.log_snr(s.t_zero)) == math.inf
    t = torch.linspace(s.t_zero, s.t_max, 2001, dtype=torch.float64)
    a, sig = s.alpha(t), s.sigma(t)
    assert bool(((a >= 0) & (a <= 1) & (sig >= 0) & (sig <= 1)).all())
    assert bool(torch.isfinite(s.log_snr(t[sig > 0])).all())

"""Each schedule's definition checked against an independent transcription of its paper, built in the test.

The property tests in test_schedules.py (inverse maps, finite differences, moments) hold for any consistent
schedule, so a wrong constant in one definition — π/2 in the cosine schedule, a default, a range bound —
passes them.  Here the numbers themselves are pinned: Ho et al. 2020's linear β, Nichol & Dhariwal 2021's
cosine ᾱ (both in float64 here, and against diffusers' schedulers, which compute them in float32), the
constructors' ranges at their edges, and the base class's SDE coefficient on a schedule where dσ/dt ≠ 1.
"""
from __future__ import annotations

import math

import pytest
import torch

from solvers import schedules


def _nichol_dhariwal_alphas_cumprod(n: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ from β_t = min(1 − f(t)/f(t−1), 0.999), f(t) = cos²(π/2·(t/T + s)/(1 + s)) (improved DDPM, eq. 17)."""
    f = [math.cos(math.pi / 2 * (i / n + s) / (1 + s)) ** 2 for i in range(n + 1)]
    abar, prod = [], 1.0
    for i in range(1, n + 1):
        prod *= 1.0 - min(1.0 - f[i] / f[i - 1], max_beta)
        abar.append(prod)
    return torch.tensor(abar, dtype=torch.float64)


def _ho_alphas_cumprod(n: int = 1000, b0: float = 1e-4, b1: float = 0.02) -> torch.Tensor:
    prod, abar = 1.0, []
    for i in range(n):
        prod *= 1.0 - (b0 + (b1 - b0) * i / (n - 1))
        abar.append(prod)
    return torch.tensor(abar, dtype=torch.float64)


@pytest.mark.parametrize("factory, reference, beta_schedule", [
    (schedules.DiscreteVP.linear, _ho_alphas_cumprod, "linear"),
    (schedules.DiscreteVP.cosine, _nichol_dhariwal_alphas_cumprod, "squaredcos_cap_v2"),
])
def test_discrete_schedules_are_the_published_ones(factory, reference, beta_schedule):
    s = factory()
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(s.alpha(t) ** 2, reference(), rtol=1e-12, atol=0.0)
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule).alphas_cumprod
    torch.testing.assert_close(s.alpha(t) ** 2, theirs.double(), rtol=1e-4, atol=1e-7)  # theirs is float32


def test_vp_cosine_is_the_continuous_nichol_dhariwal_schedule():
    """α(t) = cos(π/2·(t+s)/(1+s)) / cos(π/2·s/(1+s)), and t_from_log_snr inverts it (built in the test body)."""
    s = schedules.VPCosine()
    t = torch.tensor([1e-4, 0.1, 0.37, 0.8, 0.99], dtype=torch.float64)
    expected = torch.cos(math.pi / 2 * (t + 0.008) / 1.008) / math.cos(math.pi / 2 * 0.008 / 1.008)
    torch.testing.assert_close(s.alpha(t), expected, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-10, atol=1e-13)
    assert s.t_max == 0.9946 and s.t_min == 1e-5 and s.default_t_end == 1e-3
    torch.testing.assert_close(s.model_time(t), t, rtol=0.0, atol=0.0)


def test_vp_linear_is_the_score_sde_schedule():
    s = schedules.VPLinear()
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    expected = torch.exp(-0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1)
    torch.testing.assert_close(s.alpha(t), expected, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(s.model_time(t), t, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("factory, bad, good", [
    (schedules.VPCosine, dict(t_min=0.0), dict(t_min=1e-9)),
    (schedules.VPCosine, dict(t_min=2e-3, default_t_end=1e-3), dict(t_min=1e-3, default_t_end=1e-3)),
    (schedules.VPCosine, dict(default_t_end=0.9946), dict(default_t_end=0.99)),
    (schedules.VPCosine, dict(t_max=1.0), dict(t_max=0.9999)),
    (schedules.VPLinear, dict(t_min=0.0), dict(t_min=1e-9)),
    (schedules.VPLinear, dict(default_t_end=1.0), dict(default_t_end=0.999)),
    (schedules.VPLinear, dict(beta_min=0.5, beta_max=0.5), dict(beta_min=0.0, beta_max=0.5)),
    (schedules.RectifiedFlow, dict(t_min=0.0), dict(t_min=1e-9)),
    (schedules.RectifiedFlow, dict(t_min=2e-3, default_t_end=1e-3), dict(t_min=1e-3, default_t_end=1e-3)),
    (schedules.RectifiedFlow, dict(default_t_end=1.0), dict(default_t_end=0.999)),
    (schedules.EDM, dict(sigma_min=0.0), dict(sigma_min=1e-9)),
    (schedules.EDM, dict(sigma_min=80.0), dict(sigma_min=79.0)),
])
def test_constructor_ranges_refuse_the_bad_edge_and_accept_the_good_one(factory, bad, good):
    with pytest.raises(ValueError, match=factory.__name__):
        factory(**bad)
    made = factory(**good)
    for key, value in good.items():
        attr = {"t_max": "t_max"}.get(key, key)
        assert getattr(made, attr) == value


class _QuadraticVE(schedules.Schedule):
    """x = x0 + σ(t)·ε with σ(t) = t² (α = 1): a non-VP schedule whose dσ/dt = 2t is not 1."""

    name = "quadratic_ve"

    def __init__(self):
        self.t_min, self.t_max, self.default_t_end, self.time_scale = 1e-3, 2.0, 1e-3, 1.0

    def alpha(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def sigma(self, t):
        return torch.as_tensor(t, dtype=torch.float64) ** 2

    def d_alpha(self, t):
        return torch.zeros_like(torch.as_tensor(t, dtype=torch.float64))

    def d_sigma(self, t):
        return 2 * torch.as_tensor(t, dtype=torch.float64)


def test_base_class_sde_coefficients_on_a_schedule_with_a_nonunit_sigma_derivative():
    """g² = dσ²/dt − 2fσ² = 2σσ' (f = 0 when α = 1): 4t³ for σ = t².  EDM and rectified flow have σ' = 1, so
    they cannot tell 2σσ' from 2σ/σ'."""
    s = _QuadraticVE()
    t = torch.tensor([0.1, 0.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(s.diffusion2(t), 4 * t ** 3, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(s.drift(t), torch.zeros_like(t), rtol=0.0, atol=0.0)


# --- DiscreteVP's constructor: what it accepts, what it refuses, and what it keeps ---------------------------

@pytest.mark.parametrize("kwargs", [dict(), dict(betas=[0.1, 0.2], alphas_cumprod=[0.9, 0.72])])
def test_discrete_vp_needs_exactly_one_of_betas_or_alphas_cumprod(kwargs):
    with pytest.raises(ValueError, match=r"^DiscreteVP needs exactly one of `betas` or `alphas_cumprod`$"):
        schedules.DiscreteVP(**kwargs)


@pytest.mark.parametrize("betas", [[0.1], [0.0, 0.1], [0.1, 1.0], [0.1, -0.1]])
def test_discrete_vp_refuses_betas_outside_the_open_unit_interval_or_fewer_than_two(betas):
    with pytest.raises(ValueError, match=r"^DiscreteVP: betas must be at least 2 values, each in \(0, 1\)$"):
        schedules.DiscreteVP(betas)


@pytest.mark.parametrize("abar", [[0.5], [1.0, 0.5], [0.5, 0.0], [1.5, 0.5], [0.9, -0.1]])
def test_discrete_vp_refuses_alphas_cumprod_outside_the_open_unit_interval_or_fewer_than_two(abar):
    with pytest.raises(ValueError, match=r"^DiscreteVP: alphas_cumprod must be at least 2 values, each in \(0, 1\)$"):
        schedules.DiscreteVP(alphas_cumprod=abar)


@pytest.mark.parametrize("abar", [[0.9, 0.9, 0.5], [0.9, 0.5, 0.7]])
def test_discrete_vp_refuses_alphas_cumprod_that_is_not_strictly_decreasing(abar):
    with pytest.raises(ValueError, match=r"^DiscreteVP: alphas_cumprod must be strictly decreasing$"):
        schedules.DiscreteVP(alphas_cumprod=abar)


def test_discrete_vp_keeps_python_lists_in_float64_and_accepts_two_values():
    """Lists of Python floats are float64 values: ᾱ from β = [0.1, 0.2] is [0.9, 0.72] to float64 rounding,
    not to float32's (the error of float32 here would be ~1e-8)."""
    from_betas = schedules.DiscreteVP([0.1, 0.2])
    from_abar = schedules.DiscreteVP(alphas_cumprod=[0.9, 0.72])
    for s in (from_betas, from_abar):
        assert s.alphas_cumprod.dtype == torch.float64 and s.num_train_timesteps == 2
        torch.testing.assert_close(s.alphas_cumprod, torch.tensor([0.9, 0.72], dtype=torch.float64),
                                   rtol=1e-15, atol=0.0)
        assert (s.t_zero, s.t_min, s.default_t_end, s.t_max) == (-1.0, 0.0, 0.0, 1.0)
        torch.testing.assert_close(s.alpha(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)) ** 2,
                                   torch.tensor([1.0, 0.9, 0.72], dtype=torch.float64), rtol=1e-14, atol=0.0)


def test_discrete_vp_classmethods_pass_their_keyword_options_on():
    s = schedules.DiscreteVP.cosine(time_scale=1.0 / 1000, integer_time=True)
    assert s.time_scale == 1.0 / 1000 and s.integer_time
    torch.testing.assert_close(s.model_time(torch.tensor([999.0, 10.4], dtype=torch.float64)),
                               torch.tensor([0.999, 0.010], dtype=torch.float64), rtol=1e-15, atol=0.0)


def test_discrete_vp_log_alpha_slope_at_a_knot_is_that_of_the_interval_below():
    """log α is piecewise linear in t with knots at t = −1 (ᾱ = 1), 0, 1, …; solver time decreases, so at a
    knot d log α/dt is the slope of the interval below it, and at t = −1 that of the first interval."""
    s = schedules.DiscreteVP(alphas_cumprod=[0.9, 0.72, 0.5])
    log_alpha = 0.5 * torch.log(torch.tensor([1.0, 0.9, 0.72, 0.5], dtype=torch.float64))
    slopes = log_alpha[1:] - log_alpha[:-1]      # intervals [−1, 0], [0, 1], [1, 2]
    t = torch.tensor([-1.0, 0.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    expected = torch.stack([slopes[0], slopes[0], slopes[1], slopes[2], slopes[1]])
    torch.testing.assert_close(s.d_log_alpha(t), expected, rtol=1e-14, atol=0.0)


def test_discrete_vp_log_snr_inverse_at_the_ends_of_its_range():
    """λ = +inf is the data (t_zero = −1); λ at t_max maps back to t_max, and a hair below it to just past
    t_max (the last interval continued), not to an index error."""
    s = schedules.DiscreteVP(alphas_cumprod=[0.9, 0.72, 0.5])
    lam_max = float(s.log_snr(torch.tensor(2.0, dtype=torch.float64)))
    lam = torch.tensor([math.inf, lam_max, lam_max - 1e-9], dtype=torch.float64)
    t = s.t_from_log_snr(lam)
    assert t[0].item() == -1.0
    torch.testing.assert_close(t[1:], torch.tensor([2.0, 2.0], dtype=torch.float64), rtol=0.0, atol=1e-8)
    assert t[2].item() > 2.0


def test_vp_linear_accepts_t_min_equal_to_the_default_end():
    s = schedules.VPLinear(t_min=1e-3, default_t_end=1e-3)
    assert s.t_min == s.default_t_end == 1e-3


def test_rectified_flow_feeds_the_network_its_own_time_by_default():
    s = schedules.RectifiedFlow()
    t = torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.model_time(t), t, rtol=0.0, atol=0.0)
    torch.testing.assert_close(schedules.RectifiedFlow(time_scale=1000.0).model_time(t), 1000.0 * t,
                               rtol=1e-15, atol=0.0)


def test_an_unknown_schedule_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"^unknown schedule 'vp'; valid names: discrete_vp, discrete_vp_cosine, "
                                         r"edm, rectified_flow, ve, vp_cosine, vp_linear$"):
        schedules.get_schedule("vp")


def test_vp_cosine_with_another_offset_s_is_still_the_nichol_dhariwal_schedule():
    """s = 0.02: with the default s = 0.008, π/(2s(1+s)) and π/2·s/(1+s) differ by exactly 62π, so a slip of
    ·s into /s in the normalisation constants cannot show; with s = 0.02 they differ by 24.5π."""
    s = schedules.VPCosine(s=0.02)
    t = torch.tensor([1e-4, 0.1, 0.37, 0.8, 0.99], dtype=torch.float64)
    expected = torch.cos(math.pi / 2 * (t + 0.02) / 1.02) / math.cos(math.pi / 2 * 0.02 / 1.02)
    torch.testing.assert_close(s.alpha(t), expected, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(s.t_from_log_snr(s.log_snr(t)), t, rtol=1e-10, atol=1e-13)

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

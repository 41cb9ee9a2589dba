"""The model contract: every parameterisation becomes the exact denoiser, guidance and thresholding as documented.

The reference is the closed-form E[x0 | x_t] of a Gaussian mixture (pretrained.analytic): a network that
predicts ε, the score, x0, v or the velocity exactly must be turned into exactly that denoiser.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import solvers
from pretrained.analytic import gaussian, gmm2d
from solvers import schedules


def eval_times(schedule: schedules.Schedule) -> list[float]:
    """Times across the range where the network is evaluated: near the data, the middle, near the noise."""
    if isinstance(schedule, schedules.DiscreteVP):
        return [0.0, 10.5, 500.0, float(schedule.t_max)]
    if isinstance(schedule, schedules.RectifiedFlow):
        return [schedule.default_t_end, 0.5, 0.99]  # t = 1 (α = 0) is tested on its own below
    return [schedule.default_t_end, 0.5 * (schedule.default_t_end + schedule.t_max), schedule.t_max]


def supports(schedule: schedules.Schedule, prediction: str) -> bool:
    """v = α·ε − σ·x0 is a parameterisation of variance-preserving schedules only."""
    return prediction != "v" or schedule.variance_preserving


@pytest.mark.parametrize("prediction", solvers.PREDICTIONS)
def test_denoise_is_the_exact_posterior_mean(any_schedule, prediction, ring_mixture):
    """For each prediction type a schedule supports, DiffusionModel.denoise is the mixture's exact E[x0 | x_t]."""
    schedule = any_schedule
    if not supports(schedule, prediction):
        pytest.skip("covered by test_v_prediction_needs_a_variance_preserving_schedule")
    model = solvers.DiffusionModel(ring_mixture.network(schedule, prediction), schedule=schedule,
                                   prediction=prediction)
    g = torch.Generator().manual_seed(3)
    for t in eval_times(schedule):
        alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
        x = alpha * ring_mixture.sample(16, seed=1) + sigma * torch.randn(16, 2, generator=g, dtype=torch.float64)
        want = ring_mixture.denoise(x, alpha, sigma)
        # The affine conversions divide by α (ε, score) or σ'α − σα' (velocity): allow their rounding.
        torch.testing.assert_close(model.denoise(x, t), want, rtol=1e-9, atol=1e-9, msg=f"t={t}")


def test_v_prediction_needs_a_variance_preserving_schedule():
    """prediction='v' on EDM or rectified flow raises a ValueError that names the alternatives."""
    for schedule in (schedules.EDM(), schedules.RectifiedFlow()):
        with pytest.raises(ValueError, match="variance-preserving.*Use 'eps', 'x0', 'score' or 'velocity'"):
            solvers.DiffusionModel(lambda x, t: x, schedule=schedule, prediction="v")


def test_eps_on_rectified_flow_at_t_one_raises_clearly(ring_mixture):
    """At t = 1 of rectified flow α = 0, so ε cannot give x0: conversion and sample() say so and what to do."""
    schedule = schedules.RectifiedFlow()
    model = ring_mixture.as_model(schedule, "eps")
    with pytest.raises(ValueError, match=r"α\(t\) = 0 .*Start the grid below t=1.0 or use a velocity/x0 model"):
        model.conversion(1.0)
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cannot evaluate the model at t=1.0"):
        solvers.sample(model, x, "euler", timesteps=[1.0, 0.5, 0.0])
    # A velocity model is defined there, and a grid that starts just below t = 1 works for ε.
    velocity = ring_mixture.as_model(schedule, "velocity")
    torch.testing.assert_close(velocity.denoise(x, 1.0), ring_mixture.denoise(x, 0.0, 1.0), rtol=1e-12, atol=1e-12)
    res = solvers.sample(model, x, "euler", timesteps=[0.999, 0.5, 0.0])
    assert bool(torch.isfinite(res.samples).all())


def test_unknown_prediction_and_bad_arguments_raise():
    """Unknown prediction names list the valid ones; a non-callable fn or a non-schedule is a TypeError."""
    with pytest.raises(ValueError, match="unknown prediction 'noise'; valid: eps, score, x0, v, velocity"):
        solvers.DiffusionModel(lambda x, t: x, schedule=schedules.VPLinear(), prediction="noise")
    with pytest.raises(TypeError, match="fn must be callable"):
        solvers.DiffusionModel(None, schedule=schedules.VPLinear())
    with pytest.raises(TypeError, match="schedule must be a solvers.schedules.Schedule"):
        solvers.DiffusionModel(lambda x, t: x, schedule="vp_linear")
    with pytest.raises(ValueError, match="low < high"):
        solvers.DiffusionModel(lambda x, t: x, schedule=schedules.VPLinear(), clip_x0=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"percentile in \(0, 1\)"):
        solvers.DiffusionModel(lambda x, t: x, schedule=schedules.VPLinear(), dynamic_threshold=95)


def test_model_output_of_the_wrong_shape_raises():
    """A network that returns another shape than its input is reported with both shapes."""
    model = solvers.DiffusionModel(lambda x, t: x[:, :1], schedule=schedules.VPLinear(), prediction="eps")
    with pytest.raises(ValueError, match=r"returned shape \(3, 1\) for input \(3, 2\)"):
        model.denoise(torch.zeros(3, 2), 0.5)


def _two_class_network(schedule):
    """fn(x, t, c): the ring mixture's ε where c = 1 and a single Gaussian's ε where c = 0; counts its calls."""
    eps_cond = gmm2d("ring").network(schedule, "eps")
    eps_uncond = gaussian(dim=2).network(schedule, "eps")
    calls = []

    def fn(x, t, c):
        calls.append(x.shape[0])
        pick = (c == 1).reshape(-1, 1)
        return torch.where(pick, eps_cond(x, t), eps_uncond(x, t))

    return fn, eps_cond, eps_uncond, calls


def test_classifier_free_guidance_combines_both_branches_in_one_call():
    """CFG evaluates [x; x] with [c; ∅] in one call; w = 0 is the unconditional, w = 1 the conditional model."""
    schedule = schedules.VPLinear()
    fn, eps_cond, eps_uncond, calls = _two_class_network(schedule)
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.full((5,), 0.4, dtype=torch.float64)
    cond, uncond = torch.ones(5), torch.zeros(5)
    out_c, out_u = eps_cond(x, t), eps_uncond(x, t)
    for w in (0.0, 1.0, 3.5):
        guided = solvers.classifier_free_guidance(fn, cond, uncond, w)
        calls.clear()
        out = guided(x, t)
        assert calls == [10], "one batched call of 2·batch rows"
        torch.testing.assert_close(out, out_u + w * (out_c - out_u), rtol=0.0, atol=0.0)
    torch.testing.assert_close(solvers.classifier_free_guidance(fn, cond, uncond, 0.0)(x, t), out_u, rtol=0, atol=0)
    torch.testing.assert_close(solvers.classifier_free_guidance(fn, cond, uncond, 1.0)(x, t), out_c,
                               rtol=1e-12, atol=1e-12)


def test_classifier_free_guidance_counts_network_rows_in_sampling():
    """Sampling a guided model makes one network call per NFE and reports twice the network rows."""
    schedule = schedules.VPLinear()
    fn, _, _, calls = _two_class_network(schedule)
    batch = 6
    guided = solvers.DiffusionModel(solvers.classifier_free_guidance(fn, torch.ones(batch), torch.zeros(batch), 2.0),
                                    schedule=schedule, prediction="eps")
    plain = gmm2d("ring").as_model(schedule, "eps")
    x = solvers.initial_noise((batch, 2), seeds=range(batch), dtype=torch.float64)
    res_g = solvers.sample(guided, x, "heun", 4)
    res_p = solvers.sample(plain, x, "heun", 4)
    assert res_g.nfe == res_p.nfe == len(calls) == 7  # Heun: 2 calls per step, 1 on the step to σ = 0
    assert calls == [2 * batch] * res_g.nfe
    assert res_p.model_rows == batch * res_p.nfe
    assert res_g.model_rows == 2 * res_p.model_rows


def test_classifier_free_guidance_rejects_mismatched_conditions():
    """cond and uncond of different shapes, or a cond with the wrong number of rows, raise ValueError."""
    fn = lambda x, t, c: x  # noqa: E731
    with pytest.raises(ValueError, match="same shape"):
        solvers.classifier_free_guidance(fn, torch.ones(3, 2), torch.zeros(3), 1.0)
    guided = solvers.classifier_free_guidance(fn, torch.ones(3), torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="cond has 3 rows for a batch of 4"):
        guided(torch.zeros(4, 2), torch.zeros(4))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), np.float32("nan"), 1 + 2j, "2",
                                   None, True])
def test_classifier_free_guidance_refuses_a_scale_that_is_not_a_finite_real_number(scale):
    """A NaN/Inf, complex or non-numeric scale is refused when the wrapper is built, naming the value and what is
    valid (before, NaN/Inf went through every step and surfaced at the end as a NonFiniteError)."""
    calls = []

    def fn(x, t, c):
        calls.append(x.shape[0])
        return x

    with pytest.raises(ValueError, match=r"classifier_free_guidance: scale must be a finite real number \(the "
                                         r"guidance weight w: 1 = the conditional model alone, 0 = the "
                                         r"unconditional one\), got " + re.escape(repr(scale))):
        solvers.classifier_free_guidance(fn, torch.ones(3), torch.zeros(3), scale)
    assert calls == []


@pytest.mark.parametrize("scale", [2, np.float32(2.0), np.int64(2), -0.5])
def test_classifier_free_guidance_takes_any_finite_real_scale(scale):
    """Integers, NumPy scalars and negative weights are finite real numbers: out_u + w·(out_c − out_u)."""
    schedule = schedules.VPLinear()
    fn, eps_cond, eps_uncond, _ = _two_class_network(schedule)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 0.4, dtype=torch.float64)
    out = solvers.classifier_free_guidance(fn, torch.ones(3), torch.zeros(3), scale)(x, t)
    out_c, out_u = eps_cond(x, t), eps_uncond(x, t)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, out_u + float(scale) * (out_c - out_u), rtol=0.0, atol=0.0)


class _TimeScaledLinear(torch.nn.Module):
    """fn(x, t) = W·x·t + b, recording the dtypes it was called with (a torch.nn.Module network)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        with torch.no_grad():
            self.lin.weight.copy_(0.1 * torch.arange(16.0).reshape(4, 4).sin())
            self.lin.bias.fill_(0.05)
        self.seen = []

    def forward(self, x, t):
        self.seen.append((x.dtype, t.dtype))
        return self.lin(x) * t[:, None]


@pytest.mark.parametrize("net_dtype, state_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_a_network_module_is_called_in_its_own_dtype_and_the_state_keeps_its_own(net_dtype, state_dtype):
    """A float32 module with a float64 x_T, or the reverse, samples (before: torch's dtype error inside the first
    step): the network is called in its parameters' dtype (x and t), its output cast back; the state keeps its
    dtype (EDM's convention: a float64 state for a float32 network).  The same as giving input_dtype."""
    schedule = schedules.VPLinear()
    net = _TimeScaledLinear().to(net_dtype)
    model = solvers.DiffusionModel(net, schedule=schedule)
    assert model.input_dtype == net_dtype
    x_T = solvers.initial_noise((3, 4), seeds=range(3), dtype=state_dtype)
    res = solvers.sample(model, x_T, "dpmpp_2m", 4)
    assert res.samples.dtype == state_dtype
    assert net.seen == [(net_dtype, net_dtype)] * res.nfe
    explicit = solvers.DiffusionModel(net, schedule=schedule, input_dtype=net_dtype)
    torch.testing.assert_close(res.samples, solvers.sample(explicit, x_T, "dpmpp_2m", 4).samples, rtol=0, atol=0)
    # Against the whole computation in float64: float32 rounding only.
    exact = solvers.sample(solvers.DiffusionModel(_TimeScaledLinear().double(), schedule=schedule),
                           x_T.double(), "dpmpp_2m", 4).samples
    torch.testing.assert_close(res.samples.double(), exact, rtol=1e-5, atol=1e-5)


def test_the_network_dtype_is_inferred_only_where_it_is_unambiguous():
    """An explicit input_dtype wins; a plain function, or a module whose floating parameters have several
    dtypes (or none), leaves the network to be called in the state's dtype, as before."""
    schedule = schedules.VPLinear()
    net = _TimeScaledLinear()
    assert solvers.DiffusionModel(net, schedule=schedule, input_dtype=torch.float64).input_dtype == torch.float64
    assert solvers.DiffusionModel(lambda x, t: net(x, t), schedule=schedule).input_dtype is None
    mixed = _TimeScaledLinear()
    mixed.lin.bias.data = mixed.lin.bias.data.double()
    assert solvers.DiffusionModel(mixed, schedule=schedule).input_dtype is None
    assert solvers.DiffusionModel(torch.nn.Identity(), schedule=schedule).input_dtype is None


def _constant_x0_model(values: torch.Tensor, **kwargs) -> solvers.DiffusionModel:
    """An x0-prediction model that always predicts ``values`` (one row per sample)."""
    return solvers.DiffusionModel(lambda x, t: values.to(x.dtype).clone(), schedule=schedules.VPLinear(),
                                  prediction="x0", **kwargs)


def test_clip_x0_clamps_the_prediction_and_acts_in_the_sampler():
    """clip_x0=(lo, hi) clamps every predicted x0, so a sampler's final denoised step lands in [lo, hi]."""
    values = torch.tensor([[-3.0, -0.5, 0.2, 2.5], [0.9, -1.0, 1.0, 7.0]], dtype=torch.float64)
    model = _constant_x0_model(values, clip_x0=(-1.0, 0.5))
    torch.testing.assert_close(model.denoise(torch.zeros(2, 4, dtype=torch.float64), 0.3),
                               values.clamp(-1.0, 0.5), rtol=0, atol=0)
    res = solvers.sample(model, torch.zeros(2, 4, dtype=torch.float64), "euler", 3)
    torch.testing.assert_close(res.samples, values.clamp(-1.0, 0.5), rtol=0, atol=0)


def test_dynamic_threshold_follows_imagen():
    """Per sample s = max(1, quantile(|x0|, p)); x0 ← clamp(x0, −s, s)/s·bound (NumPy's quantile as reference)."""
    values = torch.tensor([[0.1, -0.7, 0.9, 0.3, -0.2],      # all |x0| ≤ 1: s = 1, unchanged
                           [4.0, -2.0, 0.5, -6.0, 1.0],      # s > 1: clamped and rescaled into [−1, 1]
                           [1.5, 1.2, -1.1, 0.2, 8.0]], dtype=torch.float64)
    x = torch.zeros_like(values)
    for p, clip in ((0.8, None), (0.5, (-2.0, 2.0))):
        model = _constant_x0_model(values, dynamic_threshold=p, clip_x0=clip)
        bound = 1.0 if clip is None else 2.0
        s = np.maximum(1.0, np.quantile(np.abs(values.numpy()), p, axis=1))[:, None]
        want = np.clip(values.numpy(), -s, s) / s * bound
        np.testing.assert_allclose(model.denoise(x, 0.3).numpy(), want, rtol=1e-14, atol=0)
    out = _constant_x0_model(values, dynamic_threshold=0.8).denoise(x, 0.3)
    torch.testing.assert_close(out[0], values[0], rtol=0, atol=0)
    assert float(out.abs().max()) <= 1.0

"""Stochastic solvers sample the right distribution: moments converge to the exact ones as steps grow.

On the 2-D ring of 8 Gaussians the exact mean and covariance are known (pretrained.analytic).  With N
samples, each sample moment has a Monte-Carlo standard error (SE) computed from the exact distribution:
SE(mean_j) = sqrt(Σ_jj / N) and SE(cov_jk) = sd[(x_j − μ_j)(x_k − μ_k)] / sqrt(N), the latter from the exact
fourth moments (estimated on 400 000 exact samples, ~0.2 % relative accuracy).  A solver whose bias is
negligible gives moment errors of a few SE at most: the test allows 4.5 SE on each of the 5 moments
(2 means, 3 covariance entries), which an unbiased sampler exceeds with probability < 5·7e-6.  At 5 steps
every solver here is biased by many SE (its samples are too spread out), so the same tolerance also shows
that the test can tell a biased sampler from a converged one.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import solvers
from pretrained.analytic import gmm2d
from solvers import schedules

pytestmark = pytest.mark.usefixtures("single_thread")

N = 4000
TOLERANCE_SE = 4.5
FEW_STEPS, MANY_STEPS = 5, 100

STOCHASTIC = [("euler_maruyama", {}), ("ddpm", {}), ("ddim", {"eta": 1.0}), ("dpmpp_2m_sde", {"eta": 1.0})]


@functools.lru_cache(maxsize=None)
def setting():
    """The mixture, its model on VPLinear, x_T for N seeds, the exact moments and their Monte-Carlo SEs."""
    mixture = gmm2d("ring")
    schedule = schedules.VPLinear()
    model = mixture.as_model(schedule, "eps")
    x_T = solvers.initial_noise((N, 2), seeds=range(N), schedule=schedule, dtype=torch.float64)
    mean, cov = mixture.mean(), mixture.covariance()
    centred = mixture.sample(400_000, seed=123) - mean
    products = torch.stack([centred[:, 0] ** 2, centred[:, 0] * centred[:, 1], centred[:, 1] ** 2], 1)
    se_mean = torch.sqrt(torch.diag(cov) / N)
    se_cov = products.std(0) / math.sqrt(N)
    return model, x_T, mean, cov, se_mean, se_cov


def moment_errors_in_se(samples: torch.Tensor) -> torch.Tensor:
    """|sample moment − exact moment| / SE for mean_x, mean_y, cov_xx, cov_xy, cov_yy."""
    _, _, mean, cov, se_mean, se_cov = setting()
    m = samples.mean(0)
    c = samples - m
    sample_cov = c.T @ c / (samples.shape[0] - 1)
    cov_err = torch.stack([sample_cov[0, 0] - cov[0, 0], sample_cov[0, 1] - cov[0, 1], sample_cov[1, 1] - cov[1, 1]])
    return torch.cat([(m - mean).abs() / se_mean, cov_err.abs() / se_cov])


def test_exact_samples_pass_the_moment_test():
    """Exact data samples are within the tolerance: the SEs and the exact moments are consistent."""
    errs = moment_errors_in_se(gmm2d("ring").sample(N, seed=7))
    assert float(errs.max()) < TOLERANCE_SE, errs


@pytest.mark.parametrize("name, options", STOCHASTIC, ids=[s for s, _ in STOCHASTIC])
def test_moments_converge_to_the_exact_ones(name, options):
    """At 100 steps every moment is within 4.5 SE of the exact one; at 5 steps the error is larger and biased."""
    model, x_T, *_ = setting()
    assert solvers.get_solver(name, **options).is_stochastic
    errs = {}
    for steps in (FEW_STEPS, MANY_STEPS):
        res = solvers.sample(model, x_T, name, steps, seeds=range(N), dtype=torch.float64, **options)
        errs[steps] = moment_errors_in_se(res.samples)
    assert float(errs[MANY_STEPS].max()) < TOLERANCE_SE, (
        f"{name}: moment errors at {MANY_STEPS} steps, in SE: {errs[MANY_STEPS].tolist()}")
    assert float(errs[FEW_STEPS].max()) > TOLERANCE_SE, (
        f"{name}: at {FEW_STEPS} steps the bias should be visible; errors in SE: {errs[FEW_STEPS].tolist()}")
    assert float(errs[FEW_STEPS].max()) > float(errs[MANY_STEPS].max())


def test_ddpm_small_variance_is_ddim_with_eta_one():
    """DDPM with the posterior variance β̃ is DDIM with η = 1 (documented): same samples from the same seeds."""
    model, x_T, *_ = setting()
    ddpm = solvers.sample(model, x_T[:64], "ddpm", 20, seeds=range(64), dtype=torch.float64, variance="small")
    ddim = solvers.sample(model, x_T[:64], "ddim", 20, seeds=range(64), dtype=torch.float64, eta=1.0)
    torch.testing.assert_close(ddpm.samples, ddim.samples, rtol=1e-12, atol=1e-12)


def test_stochastic_samples_depend_on_the_seeds_only():
    """Re-running with the same seeds reproduces the samples; other seeds give other samples."""
    model, x_T, *_ = setting()
    a = solvers.sample(model, x_T[:8], "euler_maruyama", 10, seeds=range(8)).samples
    b = solvers.sample(model, x_T[:8], "euler_maruyama", 10, seeds=range(8)).samples
    c = solvers.sample(model, x_T[:8], "euler_maruyama", 10, seeds=range(100, 108)).samples
    assert torch.equal(a, b)
    assert bool((a - c).abs().amax(dim=1).gt(1e-3).all()), "the solver noise must come from the seeds"

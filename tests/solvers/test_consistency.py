"""Consistency sampling with the exact consistency function of a Gaussian.

For data N(μ, s²·I) the probability-flow map is affine, so the consistency function f(x, t) — the flow map
from t to the data — is known exactly (pretrained.analytic.GaussianMixture.consistency_network).  One-step
generation must then be the exact flow-map end point, and multistep generation (denoise, re-noise with the
forward process, repeat) must give samples of exactly the data distribution.
"""
from __future__ import annotations

import math

import pytest
import torch

import solvers
from solvers import schedules
from solvers.noise import STREAM_SOLVER, SeedStreams

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEDULES = {"vp_linear": schedules.VPLinear, "edm": schedules.EDM, "discrete_vp": schedules.DiscreteVP.linear}


def consistency_model(mixture, schedule) -> solvers.DiffusionModel:
    """The exact consistency function as an x0-prediction model."""
    return solvers.DiffusionModel(mixture.consistency_network(schedule), schedule=schedule, prediction="x0")


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_one_step_is_the_exact_flow_map_end_point(schedule_name, gaussian_2d):
    """steps=1 evaluates f(x_T, T) once, with no noise: the exact PF-ODE end point, to ~1e-12."""
    schedule = SCHEDULES[schedule_name]()
    x_T = solvers.initial_noise((64, 2), seeds=range(64), schedule=schedule, dtype=torch.float64)
    res = solvers.sample(consistency_model(gaussian_2d, schedule), x_T, "consistency", 1, seeds=range(64))
    assert res.timesteps == [schedule.t_max, schedule.t_zero]
    assert res.nfe == 1
    exact = gaussian_2d.flow_map(schedule, x_T, schedule.t_max, schedule.t_zero)
    torch.testing.assert_close(res.samples, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [2, 4])
def test_multistep_samples_have_the_data_moments(steps, gaussian_2d):
    """Multistep consistency makes one model call per step, and its samples have the data's mean and covariance.

    With the exact f every x0 is an exact data sample and every re-noised state an exact marginal, so only
    Monte-Carlo error remains: 4.5 standard errors on each of the 5 moments (SE(mean) = s/√N; for a
    Gaussian SE(var) = √2·s²/√N and SE(cov_xy) = s²/√N).
    """
    n = 4000
    schedule = schedules.VPLinear()
    x_T = solvers.initial_noise((n, 2), seeds=range(n), schedule=schedule, dtype=torch.float64)
    res = solvers.sample(consistency_model(gaussian_2d, schedule), x_T, "consistency", steps, seeds=range(n))
    assert res.nfe == steps == solvers.get_solver("consistency").nfe(res.timesteps, schedule.t_zero)
    s2 = float(gaussian_2d.stds[0]) ** 2
    mean_err = (res.samples.mean(0) - gaussian_2d.mean()).abs() / math.sqrt(s2 / n)
    cov = torch.cov(res.samples.T)
    var_err = (torch.diag(cov) - s2).abs() / (math.sqrt(2) * s2 / math.sqrt(n))
    cov_err = abs(float(cov[0, 1])) / (s2 / math.sqrt(n))
    assert float(mean_err.max()) < 4.5 and float(var_err.max()) < 4.5 and cov_err < 4.5, (mean_err, var_err, cov_err)


def test_renoising_uses_the_forward_process_and_the_seed_stream(gaussian_2d):
    """Between steps x = α_n·f(x, t) + sqrt(σ_n² − α_n²·σ_b²)·z, z from each sample's solver stream."""
    schedule = schedules.EDM()
    sigma_b = 0.002
    model = consistency_model(gaussian_2d, schedule)
    seeds = [4, 9, 2]
    x_T = solvers.initial_noise((3, 2), seeds=seeds, schedule=schedule, dtype=torch.float64)
    grid = [80.0, 5.0, 0.5, 0.0]
    states = []
    solvers.sample(model, x_T, "consistency", timesteps=grid, seeds=seeds, sigma_boundary=sigma_b,
                   callback=lambda info: states.append(info.x.clone()))
    z = SeedStreams(seeds, STREAM_SOLVER)
    previous = x_T
    for i, t_next in enumerate(grid[1:-1]):
        x0 = gaussian_2d.flow_map(schedule, previous, grid[i], schedule.t_zero)
        std = math.sqrt(t_next ** 2 - sigma_b ** 2)  # EDM: α = 1, σ = t
        torch.testing.assert_close(states[i], x0 + std * z.randn((2,), dtype=torch.float64), rtol=1e-12, atol=1e-12)
        previous = states[i]

"""Langevin dynamics: the step rules, annealed Langevin sampling, and predictor–corrector sampling.

The PC check compares samples with the exact data distribution of the 2-D ring mixture (``gmm2d``) through
the cross-entropy excess E_q[−log p] − H(p): zero for exact samples, positive for samples spread too wide —
the typical error of Euler–Maruyama with few steps — with H(p) from 200 000 exact samples.
"""
from __future__ import annotations

import math

import pytest
import torch

import pretrained
import solvers
from solvers.base import StepContext, points_at
from solvers.langevin import langevin_step
from solvers.noise import STREAM_SOLVER, SeedStreams

pytestmark = pytest.mark.usefixtures("single_thread")

RING = pretrained.get_card("gmm2d").extra["mixture"]
GAUSS = pretrained.get_card("gaussian").extra["mixture"]


def _log_density(mixture, x: torch.Tensor) -> torch.Tensor:
    return mixture.log_prob(x)


@pytest.fixture(scope="module")
def ring_entropy() -> float:
    return -_log_density(RING, RING.sample(200_000, seed=5)).mean().item()


def test_snr_rule_hits_the_target_ratio_per_sample():
    """With the "snr" rule, ‖δ·s‖/‖sqrt(2δ)·z‖ equals snr for every sample, whatever its own norms are."""
    model = pretrained.load("gaussian")
    seeds = [3, 1, 4, 1, 5]
    x = solvers.initial_noise((5, 2), seeds=range(5), dtype=torch.float64) * torch.tensor([[0.1], [1], [3], [1], [10]])
    p = points_at(model.schedule, model, [0.3])[0]
    ctx = StepContext(model, [p, p], SeedStreams(seeds, STREAM_SOLVER), batch=5)
    x_new = langevin_step(ctx, x, p, 0.16, "snr")
    z = SeedStreams(seeds, STREAM_SOLVER).randn((2,), dtype=torch.float64)
    score = (p.alpha * model.denoise(x, p.t) - x) / p.sigma ** 2
    # x_new − x = δ·s + sqrt(2δ)·z with one δ per sample: solve for δ from the component along s.
    delta = 2 * (0.16 * z.norm(dim=1) / score.norm(dim=1)) ** 2
    assert torch.allclose(x_new - x, delta[:, None] * score + (2 * delta[:, None]).sqrt() * z, rtol=1e-12, atol=1e-14)
    ratio = (delta[:, None] * score).norm(dim=1) / ((2 * delta[:, None]).sqrt() * z).norm(dim=1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.16), rtol=1e-12)
    assert ctx.nfe == 1


def test_sigma2_rule_is_deterministic_in_sigma():
    """With "sigma2", δ = 2·snr²·σ² for every sample."""
    model = pretrained.load("gaussian")
    x = solvers.initial_noise((4, 2), seeds=range(4), dtype=torch.float64)
    p = points_at(model.schedule, model, [0.5])[0]
    ctx = StepContext(model, [p, p], SeedStreams([0, 1, 2, 3], STREAM_SOLVER), batch=4)
    x_new = langevin_step(ctx, x, p, 0.3, "sigma2")
    z = SeedStreams([0, 1, 2, 3], STREAM_SOLVER).randn((2,), dtype=torch.float64)
    delta = 2 * 0.3 ** 2 * p.sigma ** 2
    score = (p.alpha * model.denoise(x, p.t) - x) / p.sigma ** 2
    assert torch.allclose(x_new, x + delta * score + math.sqrt(2 * delta) * z, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("steps", [10, 20])
def test_pc_improves_on_its_predictor_at_equal_predictor_steps(steps, ring_entropy):
    """Euler–Maruyama + one Langevin corrector step per level (σ² rule, snr 0.3) against Euler–Maruyama
    alone on the same grid, noise seeds and predictor steps: the corrector pulls the over-spread samples
    back towards p_t.  Measured (these 2000 samples, uniform grid): excess 0.42 → 0.10 at 10 steps,
    0.21 → 0.05 at 20; the assertion allows for the Monte Carlo error (≈ 0.03)."""
    model = pretrained.load("gmm2d")
    n = 2000
    x_T = solvers.initial_noise((n, 2), seeds=range(n), dtype=torch.float64)
    em = solvers.sample(model, x_T, "euler_maruyama", steps=steps, spacing="uniform")
    pc = solvers.sample(model, x_T, "pc", steps=steps, spacing="uniform", step_rule="sigma2", snr=0.3)
    excess_em = -_log_density(RING, em.samples).mean().item() - ring_entropy
    excess_pc = -_log_density(RING, pc.samples).mean().item() - ring_entropy
    assert excess_em > 0.1, f"Euler–Maruyama should be visibly off at {steps} steps (excess {excess_em:.3f})"
    assert abs(excess_pc) < 0.6 * excess_em, f"PC {excess_pc:.3f} vs predictor alone {excess_em:.3f}"
    assert pc.nfe == em.nfe + (steps - 1) and pc.orders == em.orders


def test_annealed_langevin_approaches_the_target_with_more_steps_per_level():
    """Annealed Langevin (σ² rule) on the closed-form Gaussian N(0.5, 0.7²): the mean and std of the samples
    approach the target as the chain gets more steps per level."""
    model = pretrained.load("gaussian")
    n = 1000
    x_T = solvers.initial_noise((n, 2), seeds=range(n), dtype=torch.float64)
    errors = []
    for k in (2, 20):
        res = solvers.sample(model, x_T, "langevin", steps=10, spacing="uniform", steps_per_level=k,
                             step_rule="sigma2", snr=0.3)
        assert res.nfe == 10 * k + 1
        errors.append(max((res.samples.mean(0) - 0.5).abs().max().item(),
                          (res.samples.std(0) - 0.7).abs().max().item()))
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.08, errors


def test_pc_corrects_at_a_final_level_above_zero():
    """On a grid without the step to σ = 0 the last level is corrected too; NFE = predictor's + k per level."""
    model = pretrained.load("gaussian")
    x_T = solvers.initial_noise((3, 2), seeds=range(3), dtype=torch.float64)
    calls = []
    for grid in ([1.0, 0.6, 0.3, 0.1], [1.0, 0.6, 0.3, 0.0]):
        res = solvers.sample(model, x_T, "pc", steps=None, timesteps=grid, predictor="heun", corrector_steps=3,
                             callback=lambda info: calls.append(info.nfe))
        slv = solvers.get_solver("pc", predictor="heun", corrector_steps=3)
        heun = solvers.get_solver("heun").nfe(grid, 0.0)
        corrected = 3 if grid[-1] > 0 else 2
        assert res.nfe == slv.nfe(grid, 0.0) == heun + 3 * corrected
    assert calls == [5, 10, 15, 5, 10, 11]  # Heun: 2 calls a step, 1 on the step to σ = 0


def test_pc_passes_the_predictor_options():
    model = pretrained.load("gaussian")
    x_T = solvers.initial_noise((3, 2), seeds=range(3), dtype=torch.float64)
    a = solvers.sample(model, x_T, "pc", steps=5, predictor="ddim", predictor_options={"eta": 0.0})
    b = solvers.sample(model, x_T, "pc", steps=5, predictor="ddim", predictor_options={"eta": 1.0})
    assert not torch.equal(a.samples, b.samples)
    assert a.options["predictor_options"] == {"eta": 0.0}


@pytest.mark.parametrize("name, options, error, message", [
    ("pc", {"predictor": "pc"}, ValueError, "predictor must be a registered fixed-grid solver"),
    ("pc", {"predictor": "adaptive"}, ValueError, "predictor must be a registered fixed-grid solver"),
    ("pc", {"predictor": "nope"}, ValueError, "unknown solver 'nope'"),
    ("pc", {"predictor_options": [("eta", 1)]}, ValueError, "predictor_options must be a dict"),
    ("pc", {"predictor": "ddim", "predictor_options": {"etta": 1}}, TypeError, "has no option"),
    ("pc", {"corrector": "ald"}, ValueError, "corrector must be 'langevin'"),
    ("pc", {"corrector_steps": 0}, ValueError, "corrector_steps must be a positive integer"),
    ("pc", {"snr": -0.1}, ValueError, "snr must be a positive number"),
    ("pc", {"snr": math.nan}, ValueError, "snr must be a positive number"),
    ("pc", {"step_rule": "sigma"}, ValueError, "step_rule must be one of snr, sigma2"),
    ("langevin", {"steps_per_level": 0}, ValueError, "steps_per_level must be a positive integer"),
    ("langevin", {"snr": 0}, ValueError, "snr must be a positive number"),
])
def test_bad_options_raise(name, options, error, message):
    with pytest.raises(error, match=message):
        solvers.get_solver(name, **options)

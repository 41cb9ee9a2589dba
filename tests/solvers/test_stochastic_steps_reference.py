"""Every stochastic solver, step for step, against a literal transcription of its published algorithm.

Each reference below is written from the paper, in the paper's own variables (ᾱ for DDPM/DDIM, σ for EDM and
k-diffusion, α/σ/λ for DPM-Solver++, f/g for the score SDE), in plain float64 torch, and shares nothing with
``solvers/`` except two inputs:

* the model: the exact denoiser of the 2-D ring of 8 Gaussians (``pretrained.analytic``), called directly as
  E[x0 | x_t] with the paper's α and σ — and, where an algorithm needs the score, the gradient of the exact
  noised mixture log-density by autograd (not the library's (α·D − x)/σ² conversion);
* the noise: the documented per-sample solver stream (``solvers.noise.SeedStreams(seeds, STREAM_SOLVER)``),
  drawn in the order the algorithm uses it, one (batch, 2) draw per noise injection.

Each run is 3–4 steps on an explicit grid, 6 samples from a fixed x_T, compared with the library to 1e-10.
On this problem a wrong noise std, sign or factor, a model call at the wrong noise level, or the other
variance option of DDPM changes the samples by 1e-2 or more.
"""
from __future__ import annotations

import math

import pytest
import torch

import solvers
from pretrained.analytic import gmm2d
from solvers import schedules
from solvers.noise import STREAM_SOLVER, SeedStreams

pytestmark = pytest.mark.usefixtures("single_thread")

RING = gmm2d("ring")
SEEDS = [3, 17, 0, 42, 7, 1001]
TOL = dict(rtol=1e-10, atol=1e-10)
BETA_MIN, BETA_MAX = 0.1, 20.0          # VPLinear's defaults (Song et al. 2021)


# ---- the exact model and the noise, in the paper's variables -------------------------------------------------
def denoised(x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """E[x0 | x_t = x] of the ring for x_t = α·x0 + σ·ε (the closed form of pretrained.analytic)."""
    return RING.denoise(x, alpha, sigma)


def score(x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """∇ log p_t(x) of the noised ring Σ_k w_k·N(α·μ_k, (α²s_k² + σ²)·I), by autograd of its log-density."""
    x = x.detach().clone().requires_grad_(True)
    var = alpha ** 2 * RING.stds ** 2 + sigma ** 2                                  # (K,)
    sq = ((x[:, None, :] - alpha * RING.means[None]) ** 2).sum(-1)                 # (B, K)
    logp = torch.logsumexp(torch.log(RING.weights) - 0.5 * sq / var - torch.log(2 * math.pi * var), dim=1)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    return grad


def vp_alpha_bar(t: float) -> float:
    """ᾱ(t) = exp(−∫₀ᵗ β) of the VP SDE with linear β(s) = β_min + s(β_max − β_min) (Song et al. 2021)."""
    return math.exp(-0.5 * t * t * (BETA_MAX - BETA_MIN) - t * BETA_MIN)


def vp_beta(t: float) -> float:
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def x_start(scale: float = 1.0) -> torch.Tensor:
    """A fixed (6, 2) float64 starting state (its own generator: not a solver stream)."""
    g = torch.Generator().manual_seed(2024)
    return scale * torch.randn(len(SEEDS), 2, generator=g, dtype=torch.float64)


def solver_noise():
    """z() → the next (6, 2) draw of each sample's solver stream."""
    streams = SeedStreams(SEEDS, STREAM_SOLVER)
    return lambda: streams.randn((2,), dtype=torch.float64)


def library(schedule, grid, x, solver, prediction="eps", **options) -> torch.Tensor:
    model = RING.as_model(schedule, prediction)
    res = solvers.sample(model, x.clone(), solver, timesteps=grid, seeds=SEEDS, dtype=torch.float64, **options)
    assert res.timesteps == [float(t) for t in grid]
    return res.samples


# ---- DDIM (Song et al. 2021, eq. 12) and DDPM (Ho et al. 2020, Algorithm 2), in ᾱ -----------------------------
def eps_prediction(x, abar):
    """The ε-network of the exact model: ε̂ = (x_t − √ᾱ·x̂0)/√(1 − ᾱ)."""
    return (x - math.sqrt(abar) * denoised(x, math.sqrt(abar), math.sqrt(1 - abar))) / math.sqrt(1 - abar)


def ddim_reference(x, abars, eta, z):
    """DDIM eq. 12: x_{t−1} = √ᾱ_{t−1}·x̂0 + √(1 − ᾱ_{t−1} − σ_t²)·ε̂ + σ_t·z, with σ_t(η) of eq. 16."""
    for a_t, a_prev in zip(abars[:-1], abars[1:]):
        eps = eps_prediction(x, a_t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if a_prev == 1.0:
            x = x0                                  # the last step "to ᾱ = 1": no noise
            continue
        sigma_t = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma_t ** 2) * eps + sigma_t * z()
    return x


def ddpm_reference(x, abars, variance, z):
    """Ho et al. Algorithm 2 on a strided grid (α_t = ᾱ_t/ᾱ_prev, β_t = 1 − α_t):
    x_{t−1} = (x_t − β_t/√(1 − ᾱ_t)·ε̂)/√α_t + σ_t·z, σ_t² = β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t or β_t; z = 0 last."""
    for a_t, a_prev in zip(abars[:-1], abars[1:]):
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        x = (x - beta_t / math.sqrt(1 - a_t) * eps_prediction(x, a_t)) / math.sqrt(alpha_t)
        if a_prev < 1.0:
            var = (1 - a_prev) / (1 - a_t) * beta_t if variance == "small" else beta_t
            x = x + math.sqrt(var) * z()
    return x


DISCRETE_GRID = [999.0, 700.0, 400.0, 120.0, -1.0]
VP_GRID = [1.0, 0.6, 0.3, 0.08, 0.0]


def vp_problem(kind):
    """(schedule, grid, ᾱ on the grid) for the discrete DDPM schedule and the continuous VP-linear SDE."""
    if kind == "discrete_vp":
        sched = schedules.DiscreteVP.linear()
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)   # Ho et al.
        return sched, DISCRETE_GRID, [1.0 if t < 0 else float(abar[int(t)]) for t in DISCRETE_GRID]
    return schedules.VPLinear(), VP_GRID, [vp_alpha_bar(t) for t in VP_GRID]


@pytest.mark.parametrize("kind", ["discrete_vp", "vp_linear"])
@pytest.mark.parametrize("eta", [0.35, 1.0])
def test_ddim_with_eta_is_song_et_al_eq_12(kind, eta):
    sched, grid, abars = vp_problem(kind)
    ref = ddim_reference(x_start(), abars, eta, solver_noise())
    torch.testing.assert_close(library(sched, grid, x_start(), "ddim", eta=eta), ref, **TOL)


@pytest.mark.parametrize("kind", ["discrete_vp", "vp_linear"])
@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_is_ho_et_al_algorithm_2(kind, variance):
    sched, grid, abars = vp_problem(kind)
    ref = ddpm_reference(x_start(), abars, variance, solver_noise())
    torch.testing.assert_close(library(sched, grid, x_start(), "ddpm", variance=variance), ref, **TOL)


def test_ddpm_variances_differ_on_this_problem():
    """The two variance options give samples 1e-2 apart here: the references above tell them apart."""
    sched, grid, abars = vp_problem("discrete_vp")
    small = ddpm_reference(x_start(), abars, "small", solver_noise())
    large = ddpm_reference(x_start(), abars, "large", solver_noise())
    assert float((small - large).abs().max()) > 1e-2


def ancestral_reference(x, sigmas, eta, z):
    """k-diffusion's ancestral step (``get_ancestral_step`` + ``sample_euler_ancestral``) in σ:
    σ_up = min(σ_n, η·√(σ_n²(σ² − σ_n²)/σ²)), σ_down = √(σ_n² − σ_up²), x ← x + (x − D)/σ·(σ_down − σ) + σ_up·z."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = denoised(x, 1.0, s)
        if s_next == 0:
            x = d
            continue
        s_up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        s_down = math.sqrt(s_next ** 2 - s_up ** 2)
        x = x + (x - d) / s * (s_down - s) + s_up * z()
    return x


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_with_eta_on_edm_is_the_k_diffusion_ancestral_step(eta):
    grid = [20.0, 5.0, 1.2, 0.3, 0.0]
    ref = ancestral_reference(x_start(20.0), grid, eta, solver_noise())
    torch.testing.assert_close(library(schedules.EDM(), grid, x_start(20.0), "ddim", "x0", eta=eta), ref, **TOL)


# ---- Euler–Maruyama on the reverse SDE (Song et al. 2021, eq. 6; their EulerMaruyamaPredictor) ---------------
def euler_maruyama_reference(x, grid, sde, z):
    """x_mean = x + [f(x, t) − g²(t)·∇log p_t(x)]·Δt, x = x_mean + g(t)·√(−Δt)·z (Δt < 0); the step to σ = 0
    returns Tweedie's x̂0 = (x + σ²·∇log p_t)/α.  ``sde(t)`` → (α, σ, f-coefficient, g²)."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        alpha, sigma, f, g2 = sde(t)
        s = score(x, alpha, sigma)
        if t_next == grid[-1] and sde(t_next)[1] == 0:
            x = (x + sigma ** 2 * s) / alpha
            continue
        dt = t_next - t
        x = x + (f * x - g2 * s) * dt + math.sqrt(g2 * -dt) * z()
    return x


def vp_sde(t):
    """VP SDE: dx = −½β(t)·x dt + √β(t) dw."""
    abar = vp_alpha_bar(t)
    return math.sqrt(abar), math.sqrt(1 - abar), -0.5 * vp_beta(t), vp_beta(t)


def ve_sde(t):
    """VE SDE with σ(t) = t: dx = √(dσ²/dt) dw = √(2t) dw."""
    return 1.0, t, 0.0, 2.0 * t


@pytest.mark.parametrize("kind", ["vp_linear", "edm"])
def test_euler_maruyama_is_the_score_sde_predictor(kind):
    if kind == "vp_linear":
        sched, grid, sde, x = schedules.VPLinear(), VP_GRID, vp_sde, x_start()
    else:
        sched, grid, sde, x = schedules.EDM(), [20.0, 6.0, 2.0, 0.5, 0.0], ve_sde, x_start(20.0)
    ref = euler_maruyama_reference(x, grid, sde, solver_noise())
    torch.testing.assert_close(library(sched, grid, x, "euler_maruyama"), ref, **TOL)


# ---- Heun with churn: EDM Algorithm 2 (Karras et al. 2022), in σ ----------------------------------------------
def edm_algorithm_2(x, t_steps, s_churn, s_tmin, s_tmax, s_noise, z):
    """Karras et al. 2022, Algorithm 2, line by line (σ(t) = t, s(t) = 1; N = len(t_steps) − 1)."""
    n = len(t_steps) - 1
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        # Increase noise temporarily.
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * s_noise * z()
        else:
            x_hat = x
        # Euler step.
        d_cur = (x_hat - denoised(x_hat, 1.0, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d_cur
        # Apply 2nd order correction.
        if t_next != 0:
            d_prime = (x - denoised(x, 1.0, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x


HEUN_GRID = [12.0, 4.0, 1.5, 0.5, 0.0]
HEUN_CASES = {  # s_churn, s_tmin, s_tmax, s_noise
    "churn_every_step": (1.0, 0.0, math.inf, 1.0),                 # γ = 1/4 on every step
    "window_and_s_noise": (1.0, 0.8, 5.0, 1.3),                    # steps at σ = 4 and 1.5 only
    "gamma_capped": (40.0, 0.0, math.inf, 1.007),                  # γ = min(10, √2 − 1)
}


@pytest.mark.parametrize("case", sorted(HEUN_CASES))
def test_heun_with_churn_is_edm_algorithm_2(case):
    s_churn, s_tmin, s_tmax, s_noise = HEUN_CASES[case]
    ref = edm_algorithm_2(x_start(12.0), HEUN_GRID, s_churn, s_tmin, s_tmax, s_noise, solver_noise())
    out = library(schedules.EDM(), HEUN_GRID, x_start(12.0), "heun", "x0", s_churn=s_churn, s_tmin=s_tmin,
                  s_tmax=s_tmax, s_noise=s_noise)
    torch.testing.assert_close(out, ref, **TOL)


def test_heun_with_churn_on_vp_is_edm_algorithm_2_in_scaled_variables():
    """On a VP schedule the library runs Algorithm 2 on x̃ = x/α against σ̃ = σ/α (EDM eq. 4), where the
    denoiser is the ring's at α = 1, σ = σ̃ — an independent route to the same samples."""
    grid = [0.7, 0.4, 0.2, 0.05, 0.0]
    sigmas = [math.sqrt(1 - vp_alpha_bar(t)) / math.sqrt(vp_alpha_bar(t)) for t in grid]
    x_T = x_start()
    ref = edm_algorithm_2(x_T / math.sqrt(vp_alpha_bar(grid[0])), sigmas, 2.0, 0.0, math.inf, 1.0, solver_noise())
    out = library(schedules.VPLinear(), grid, x_T, "heun", s_churn=2.0)
    torch.testing.assert_close(out, ref, **TOL)


# ---- DPM-Solver++(2M) SDE (Lu et al. 2022b §5; k-diffusion sample_dpmpp_2m_sde, midpoint), in α, σ, λ --------
def dpmpp_2m_sde_reference(x, grid, eta, coeffs, z):
    """x_n = (σ_n/σ)·e^{−ηh}·x + α_n(1 − e^{−(1+η)h})·D [+ ½·α_n(1 − e^{−(1+η)h})/r·(D − D_prev)]
    + σ_n·√(1 − e^{−2ηh})·z, h = λ_n − λ, r = h_prev/h; the step to σ = 0 returns D.  coeffs(t) → (α, σ)."""
    d_old, h_last = None, None
    for t, t_next in zip(grid[:-1], grid[1:]):
        (a, s), (a_n, s_n) = coeffs(t), coeffs(t_next)
        d = denoised(x, a, s)
        if s_n == 0:
            x = d
            continue
        h = math.log(a_n / s_n) - math.log(a / s)
        x = s_n / s * math.exp(-eta * h) * x + a_n * (1 - math.exp(-(1 + eta) * h)) * d
        if d_old is not None:
            r = h_last / h
            x = x + 0.5 * a_n * (1 - math.exp(-(1 + eta) * h)) / r * (d - d_old)
        if eta > 0:
            x = x + s_n * math.sqrt(1 - math.exp(-2 * eta * h)) * z()
        d_old, h_last = d, h
    return x


@pytest.mark.parametrize("kind", ["vp_linear", "edm"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_dpmpp_2m_sde_is_lu_et_al_sde_solver(kind, eta):
    if kind == "vp_linear":
        sched, grid, x = schedules.VPLinear(), [0.9, 0.5, 0.25, 0.06, 0.0], x_start()
        coeffs = lambda t: (math.sqrt(vp_alpha_bar(t)), math.sqrt(1 - vp_alpha_bar(t)))  # noqa: E731
    else:
        sched, grid, x = schedules.EDM(), [20.0, 5.0, 1.2, 0.3, 0.0], x_start(20.0)
        coeffs = lambda t: (1.0, t)  # noqa: E731
    ref = dpmpp_2m_sde_reference(x, grid, eta, coeffs, solver_noise())
    out = library(sched, grid, x, "dpmpp_2m_sde", eta=eta, lower_order_final=False)
    torch.testing.assert_close(out, ref, **TOL)


# ---- Annealed Langevin (Song & Ermon 2019 Alg. 1; step rule of Song et al. 2021 Alg. 5) -----------------------
def langevin_level(x, alpha, sigma, n_steps, snr, rule, z):
    """n_steps of x ← x + ε·∇log p + √(2ε)·z at one level, ε = 2(r‖z‖/‖∇log p‖)² per sample ("snr",
    Alg. 5 with α_i = 1) or ε = α_i/2 with Song & Ermon's α_i = 4r²σ² ("sigma2")."""
    for _ in range(n_steps):
        g = score(x, alpha, sigma)
        noise = z()
        if rule == "snr":
            eps = 2 * (snr * noise.norm(dim=1, keepdim=True) / g.norm(dim=1, keepdim=True)) ** 2
            x = x + eps * g + torch.sqrt(2 * eps) * noise
        else:
            alpha_i = 4 * snr ** 2 * sigma ** 2
            x = x + 0.5 * alpha_i * g + math.sqrt(alpha_i) * noise
    return x


@pytest.mark.parametrize("rule", ["snr", "sigma2"])
@pytest.mark.parametrize("kind", ["vp_linear", "edm"])
def test_langevin_is_annealed_langevin_dynamics(rule, kind):
    if kind == "vp_linear":
        sched, grid, x = schedules.VPLinear(), [0.9, 0.5, 0.25, 0.0], x_start()
        coeffs = lambda t: (math.sqrt(vp_alpha_bar(t)), math.sqrt(1 - vp_alpha_bar(t)))  # noqa: E731
    else:
        sched, grid, x = schedules.EDM(), [10.0, 3.0, 0.8, 0.0], x_start(10.0)
        coeffs = lambda t: (1.0, t)  # noqa: E731
    z = solver_noise()
    ref = x
    for t in grid[:-1]:
        ref = langevin_level(ref, *coeffs(t), 3, 0.2, rule, z)
    ref = denoised(ref, *coeffs(grid[-2]))            # the final denoising step at the last level
    out = library(sched, grid, x, "langevin", steps_per_level=3, snr=0.2, step_rule=rule)
    torch.testing.assert_close(out, ref, **TOL)


# ---- Predictor–corrector (Song et al. 2021, Algorithm 2 with the Langevin corrector of Algorithm 5) ----------
@pytest.mark.parametrize("rule", ["snr", "sigma2"])
def test_pc_is_an_euler_maruyama_step_then_langevin_at_the_new_level(rule):
    grid = VP_GRID
    z = solver_noise()
    ref = x_start()
    for t, t_next in zip(grid[:-1], grid[1:]):
        ref = euler_maruyama_reference(ref, [t, t_next], vp_sde, z)   # one predictor step (its own noise)
        if t_next > 0:
            _, s_n, _, _ = vp_sde(t_next)
            ref = langevin_level(ref, math.sqrt(vp_alpha_bar(t_next)), s_n, 2, 0.15, rule, z)
    out = library(schedules.VPLinear(), grid, x_start(), "pc", corrector_steps=2, snr=0.15, step_rule=rule)
    torch.testing.assert_close(out, ref, **TOL)


def test_pc_with_a_ddpm_predictor_draws_the_predictor_noise_first():
    sched, grid, abars = vp_problem("vp_linear")
    z = solver_noise()
    ref = x_start()
    for i in range(len(grid) - 1):
        ref = ddpm_reference(ref, abars[i:i + 2], "large", z)
        if grid[i + 1] > 0:
            ref = langevin_level(ref, math.sqrt(abars[i + 1]), math.sqrt(1 - abars[i + 1]), 1, 0.15, "sigma2", z)
    out = library(sched, grid, x_start(), "pc", predictor="ddpm", predictor_options={"variance": "large"},
                  corrector_steps=1, snr=0.15)
    torch.testing.assert_close(out, ref, **TOL)


# ---- Multistep consistency sampling (Song et al. 2023, Algorithm 1) --------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.002])
def test_consistency_is_song_et_al_algorithm_1(eps):
    """x ← f(x̂_T, T); for τ_n: x̂ ← x + √(τ_n² − ε²)·z, x ← f(x̂, τ_n) — with f a nonlinear x0-prediction
    (the ring's denoiser; Algorithm 1 does not need f to be a true consistency function)."""
    grid = [40.0, 6.0, 1.5, 0.4, 0.0]
    z = solver_noise()
    x = denoised(x_start(40.0), 1.0, grid[0])
    for tau in grid[1:-1]:
        x = denoised(x + math.sqrt(tau ** 2 - eps ** 2) * z(), 1.0, tau)
    out = library(schedules.EDM(), grid, x_start(40.0), "consistency", "x0", sigma_boundary=eps)
    torch.testing.assert_close(out, x, **TOL)


def test_consistency_renoises_with_the_forward_process_on_vp():
    """On a VP schedule the re-noising is q(x_τ | x0) = N(√ᾱ_τ·x0, (1 − ᾱ_τ)·I) (Ho et al. eq. 4)."""
    grid = VP_GRID
    z = solver_noise()
    a0 = vp_alpha_bar(grid[0])
    x = denoised(x_start(), math.sqrt(a0), math.sqrt(1 - a0))
    for tau in grid[1:-1]:
        abar = vp_alpha_bar(tau)
        x = denoised(math.sqrt(abar) * x + math.sqrt(1 - abar) * z(), math.sqrt(abar), math.sqrt(1 - abar))
    out = library(schedules.VPLinear(), grid, x_start(), "consistency", "x0")
    torch.testing.assert_close(out, x, **TOL)

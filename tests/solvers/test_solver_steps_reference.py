"""Every deterministic solver step pinned to a literal transcription of its published algorithm.

The order tests cannot see a wrong coefficient that keeps the order (a sign error in DPM-Solver++(2S)'s
intermediate step stays second order, with 15× the error at 8 steps), and the diffusers parity tests cover
only the methods and schedules diffusers has.  Here each method is written out again, step by step, in the
paper's own variables — α, σ, λ = log(α/σ) for DPM-Solver++ (Lu et al. 2022b, Algorithms 1–2 and the official
code's third-order update), x̃ = x/α and ρ = σ/α for Euler/Heun (Karras et al. 2022, Algorithms 1–2) and the
Adams–Bashforth methods (Zhang & Chen 2022), t itself for the rectified-flow ODE — and run on an explicit
grid with the exact 8-mode ring mixture as an x0-predicting model.  The library must agree to 1e-10 in float64.

The Adams weights are computed here by SciPy's adaptive quadrature of the Lagrange polynomial, not by the
library's Gauss–Legendre rule, and the intermediate λ-point of 2S comes from bisection on the schedule's λ.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import brentq

import solvers
from pretrained.analytic import gmm2d
from solvers import schedules

pytestmark = pytest.mark.usefixtures("single_thread")

MIX = gmm2d("ring")
N = 16
# Uneven steps (ratios differ from step to step), away from the ends where λ or ρ are infinite.
GRIDS = {
    "vp_linear": (schedules.VPLinear(), [0.95, 0.7, 0.45, 0.3, 0.12, 0.05, 0.01]),
    "vp_cosine": (schedules.VPCosine(), [0.9, 0.62, 0.4, 0.33, 0.15, 0.04, 0.006]),
    "edm": (schedules.EDM(), [60.0, 21.0, 9.0, 2.5, 1.1, 0.3, 0.02]),
}


def _f(v) -> float:
    return float(v)


def alpha(s, t):
    return _f(s.alpha(t))


def sigma(s, t):
    return _f(s.sigma(t))


def lam(s, t):
    return math.log(alpha(s, t) / sigma(s, t))


def rho(s, t):
    return sigma(s, t) / alpha(s, t)


def D(s, x, t):
    """The exact denoiser E[x0 | x_t = x] of the ring mixture."""
    return MIX.denoise(x, alpha(s, t), sigma(s, t))


def x_T(s, t0):
    g = torch.Generator().manual_seed(1234)
    return (sigma(s, t0) * torch.randn(N, 2, generator=g, dtype=torch.float64)
            + alpha(s, t0) * MIX.sample(N, seed=7))


def library(s, x, grid, solver, **options):
    model = solvers.DiffusionModel(MIX.network(s, "x0"), schedule=s, prediction="x0")
    res = solvers.sample(model, x, solver, timesteps=grid, dtype=torch.float64, **options)
    return res


def check(s, grid, solver, reference, **options):
    x = x_T(s, grid[0])
    res = library(s, x, grid, solver, **options)
    ref = reference(s, x.clone(), grid)
    torch.testing.assert_close(res.samples, ref, rtol=1e-10, atol=1e-10)
    return res


# --- DPM-Solver++ (Lu et al. 2022b) ------------------------------------------------------------------------

def dpmpp_2m_reference(s, x, ts):
    """Algorithm 2: first step first order; then D̂ = (1 + 1/(2r))·D_{i−1} − 1/(2r)·D_{i−2}, r = h_{i−1}/h_i,
    x_i = (σ_i/σ_{i−1})·x − α_i·(e^{−h_i} − 1)·D̂."""
    prev = None
    for i in range(1, len(ts)):
        t0, t1 = ts[i - 1], ts[i]
        h = lam(s, t1) - lam(s, t0)
        d = D(s, x, t0)
        if prev is None:
            dh = d
        else:
            r = (lam(s, t0) - lam(s, prev[1])) / h
            dh = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * prev[0]
        x = sigma(s, t1) / sigma(s, t0) * x - alpha(s, t1) * (math.exp(-h) - 1) * dh
        prev = (d, t0)
    return x


def dpmpp_3m_reference(weight):
    """The official code's multistep_dpm_solver_third_update ('dpmsolver++'), warm-up with orders 1 and 2.

    x_t = (σ_t/σ_0)·x − α_t·φ₁·m0 + α_t·φ₂·D1 − weight·α_t·φ₃·D2, φ₁ = e^{−h} − 1, φ₂ = φ₁/h + 1,
    φ₃ = φ₂/h − ½; weight 1 is the published code, 2 the Taylor-consistent weight.
    """
    def ref(s, x, ts):
        ms, ls = [], []
        for i in range(1, len(ts)):
            t0, t1 = ts[i - 1], ts[i]
            ms.insert(0, D(s, x, t0))
            ls.insert(0, lam(s, t0))
            lt = lam(s, t1)
            h = lt - ls[0]
            phi1 = math.expm1(-h)
            base = sigma(s, t1) / sigma(s, t0) * x - alpha(s, t1) * phi1 * ms[0]
            if len(ms) == 1:
                x = base
            elif len(ms) == 2:
                r0 = (ls[0] - ls[1]) / h
                d1 = (ms[0] - ms[1]) / r0
                x = base - 0.5 * alpha(s, t1) * phi1 * d1
            else:
                h0, h1 = ls[0] - ls[1], ls[1] - ls[2]
                r0, r1 = h0 / h, h1 / h
                d1_0, d1_1 = (ms[0] - ms[1]) / r0, (ms[1] - ms[2]) / r1
                d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi2 = phi1 / h + 1
                phi3 = phi2 / h - 0.5
                x = base + alpha(s, t1) * phi2 * d1 - weight * alpha(s, t1) * phi3 * d2
            del ms[3:], ls[3:]
        return x
    return ref


def t_at_lambda(s, target, lo, hi):
    """The time whose λ is ``target``, by bisection (independent of the schedule's closed-form inverse)."""
    return brentq(lambda t: lam(s, t) - target, lo, hi, xtol=1e-15, rtol=1e-15, maxiter=500)


def dpmpp_2s_reference(r):
    """Algorithm 1 (DPM-Solver++(2S)): s = t_λ(λ_{i−1} + r·h), u = (σ_s/σ_{i−1})·x − α_s·(e^{−rh} − 1)·D(x),
    D̂ = (1 − 1/(2r))·D(x) + 1/(2r)·D(u, s), x_i = (σ_i/σ_{i−1})·x − α_i·(e^{−h} − 1)·D̂."""
    def ref(s, x, ts):
        for i in range(1, len(ts)):
            t0, t1 = ts[i - 1], ts[i]
            h = lam(s, t1) - lam(s, t0)
            ts_mid = t_at_lambda(s, lam(s, t0) + r * h, t1, t0)
            d = D(s, x, t0)
            u = sigma(s, ts_mid) / sigma(s, t0) * x - alpha(s, ts_mid) * (math.exp(-r * h) - 1) * d
            dh = (1 - 1 / (2 * r)) * d + 1 / (2 * r) * D(s, u, ts_mid)
            x = sigma(s, t1) / sigma(s, t0) * x - alpha(s, t1) * (math.exp(-h) - 1) * dh
        return x
    return ref


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_dpmpp_2m_is_algorithm_2(name):
    s, grid = GRIDS[name]
    res = check(s, grid, "dpmpp_2m", dpmpp_2m_reference, lower_order_final=False)
    assert res.orders == [1] + [2] * (len(grid) - 2)


@pytest.mark.parametrize("official_d2, weight", [(False, 2.0), (True, 1.0)])
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_dpmpp_3m_is_the_official_third_order_update(name, official_d2, weight):
    s, grid = GRIDS[name]
    res = check(s, grid, "dpmpp_3m", dpmpp_3m_reference(weight), lower_order_final=False, official_d2=official_d2,
                solver_type="midpoint")
    assert res.orders == [1, 2] + [3] * (len(grid) - 3)


@pytest.mark.parametrize("r", [0.5, 1 / 3, 0.8])
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_dpmpp_2s_is_algorithm_1(name, r):
    s, grid = GRIDS[name]
    res = check(s, grid, "dpmpp_2s", dpmpp_2s_reference(r), r=r)
    assert res.nfe == 2 * (len(grid) - 1)


def test_dpmpp_final_step_to_the_data_returns_the_denoised_prediction():
    """A step to σ = 0 returns D(x, t) (λ = ∞: e^{−h} = 0 in every formula above)."""
    s, grid = GRIDS["vp_linear"]
    grid = grid + [s.t_zero]
    x = x_T(s, grid[0])
    for solver, ref in (("dpmpp_2m", dpmpp_2m_reference), ("dpmpp_3m", dpmpp_3m_reference(1.0)),  # default weight
                        ("dpmpp_2s", dpmpp_2s_reference(0.5))):
        res = library(s, x, grid, solver, lower_order_final=False, solver_type="midpoint") \
            if solver != "dpmpp_2s" else library(s, x, grid, solver)
        before = ref(s, x.clone(), grid[:-1])
        torch.testing.assert_close(res.samples, D(s, before, grid[-2]), rtol=1e-10, atol=1e-10)


# --- Euler and Heun (Karras et al. 2022, Algorithms 1 and 2, deterministic) ---------------------------------

def heun_reference(second_order: bool):
    """In x̃ = x/α and ρ = σ/α: d = (x̃ − D)/ρ, x̃' = x̃ + (ρ_n − ρ)·d; Heun: d' = (x̃' − D(x̃', ρ_n))/ρ_n,
    x̃_n = x̃ + (ρ_n − ρ)·(d + d')/2 unless ρ_n = 0."""
    def ref(s, x, ts):
        for i in range(1, len(ts)):
            t0, t1 = ts[i - 1], ts[i]
            y, r0, r1 = x / alpha(s, t0), rho(s, t0), rho(s, t1)
            d = (y - D(s, x, t0)) / r0
            y_next = y + (r1 - r0) * d
            if second_order and r1 > 0:
                d2 = (y_next - D(s, alpha(s, t1) * y_next, t1)) / r1
                y_next = y + (r1 - r0) * 0.5 * (d + d2)
            x = alpha(s, t1) * y_next
        return x
    return ref


def rf_reference(second_order: bool):
    """Rectified flow, in t: dx/dt = α'·D + σ'·(x − α·D)/σ = (x − D)/t (α = 1 − t, σ = t); Euler or Heun."""
    def v(s, x, t):
        return (x - D(s, x, t)) / t

    def ref(s, x, ts):
        for t0, t1 in zip(ts[:-1], ts[1:]):
            k1 = v(s, x, t0)
            x_e = x + (t1 - t0) * k1
            x = x + (t1 - t0) * 0.5 * (k1 + v(s, x_e, t1)) if second_order and t1 > 0 else x_e
        return x
    return ref


@pytest.mark.parametrize("solver, second", [("euler", False), ("ddim", False), ("heun", True)])
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_euler_and_heun_are_karras_algorithms_1_and_2(name, solver, second):
    s, grid = GRIDS[name]
    check(s, grid, solver, heun_reference(second))
    check(s, grid + [s.t_zero], solver, heun_reference(second))


@pytest.mark.parametrize("solver, second", [("euler", False), ("heun", True)])
def test_euler_and_heun_integrate_rectified_flow_in_t(solver, second):
    s = schedules.RectifiedFlow()
    grid = [0.98, 0.7, 0.5, 0.33, 0.1, 0.02, 0.0]
    check(s, grid, solver, rf_reference(second))


# --- Adams–Bashforth in ρ: iPNDM and DEIS (Zhang & Chen 2022) ----------------------------------------------

def lagrange_integral(nodes_v, v_of_rho, rho_from, rho_to, j):
    """∫_{ρ_from}^{ρ_to} L_j(v(ρ)) dρ by adaptive quadrature (L_j: the Lagrange basis on nodes_v)."""
    def basis(r):
        v = v_of_rho(r)
        out = 1.0
        for k, vk in enumerate(nodes_v):
            if k != j:
                out *= (v - vk) / (nodes_v[j] - vk)
        return out
    val, _ = quad(basis, rho_from, rho_to, epsabs=1e-14, epsrel=1e-13, limit=200)
    return val


AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def adams_reference(max_order, weights_of):
    """x̃_n = x̃ + Σ_j w_j·ε̂_{i−j}, ε̂ = (x̃ − D)/ρ, order min(max_order, i + 1); weights_of(nodes ρ, ρ, ρ_n)."""
    def ref(s, x, ts):
        eps, nodes = [], []
        for i in range(1, len(ts)):
            t0, t1 = ts[i - 1], ts[i]
            y = x / alpha(s, t0)
            eps.insert(0, (y - D(s, x, t0)) / rho(s, t0))
            nodes.insert(0, t0)
            k = min(max_order, i)
            w = weights_of(s, nodes[:k], t0, t1)
            y = y + sum(wj * e for wj, e in zip(w, eps[:k]))
            x = alpha(s, t1) * y
        return x
    return ref


def ipndm_weights(s, nodes, t0, t1):
    return [(rho(s, t1) - rho(s, t0)) * w for w in AB[len(nodes)]]


def variable_weights(variable):
    def weights(s, nodes, t0, t1):
        if len(nodes) == 1:
            return [rho(s, t1) - rho(s, t0)]
        if variable == "rho":
            v_nodes, v = [rho(s, t) for t in nodes], (lambda r: r)
        elif variable == "logrho":
            v_nodes, v = [math.log(rho(s, t)) for t in nodes], math.log
        else:  # the schedule's time t(ρ), by bisection on ρ(t) over [t1, oldest node]
            v_nodes = list(nodes)
            v = lambda r: brentq(lambda t: rho(s, t) - r, t1, max(nodes), xtol=1e-15, rtol=1e-15)  # noqa: E731
        return [lagrange_integral(v_nodes, v, rho(s, t0), rho(s, t1), j) for j in range(len(nodes))]
    return weights


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["vp_linear", "edm"])
def test_ipndm_uses_the_constant_step_adams_bashforth_weights(name, order):
    s, grid = GRIDS[name]
    check(s, grid + [s.t_zero], "ipndm", adams_reference(order, ipndm_weights), solver_order=order)
    res = check(s, grid, "ipndm", adams_reference(order, ipndm_weights), solver_order=order)
    assert res.orders == [min(order, i + 1) for i in range(len(grid) - 1)]


@pytest.mark.parametrize("order", [2, 3, 4])
def test_ipndm_variable_step_integrates_the_lagrange_polynomial_in_rho(order):
    s, grid = GRIDS["vp_linear"]
    check(s, grid, "ipndm", adams_reference(order, variable_weights("rho")), solver_order=order,
          variable_step=True)


@pytest.mark.parametrize("variable", ["rho", "logrho", "t"])
@pytest.mark.parametrize("order", [2, 3])
def test_deis_integrates_the_lagrange_polynomial_in_its_variable(variable, order):
    s, grid = GRIDS["vp_linear"]
    res = check(s, grid, "deis", adams_reference(order, variable_weights(variable)), solver_order=order,
                variable=variable, lower_order_final=False)
    assert res.orders == [min(order, i + 1) for i in range(len(grid) - 1)]


def test_deis_final_step_to_the_data_returns_the_denoised_prediction():
    """A DEIS step to σ = 0 returns D (log ρ = −∞ there), after full-order steps before it."""
    s, grid = GRIDS["vp_cosine"]
    x = x_T(s, grid[0])
    res = library(s, x, grid + [s.t_zero], "deis", solver_order=3, variable="t", lower_order_final=False)
    before = adams_reference(3, variable_weights("t"))(s, x.clone(), grid)
    torch.testing.assert_close(res.samples, D(s, before, grid[-1]), rtol=1e-10, atol=1e-10)

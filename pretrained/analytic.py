"""Exact analytic models: Gaussian mixtures whose denoiser E[x0 | x_t] is known in closed form.

For data x0 ~ Σ_k w_k·N(μ_k, s_k²·I) and x_t = α·x0 + σ·ε, component k of x_t is N(α·μ_k, v_k·I) with
v_k = α²s_k² + σ², and

    E[x0 | x_t] = Σ_k r_k(x_t)·(μ_k + α·s_k²/v_k·(x_t − α·μ_k)),   r_k ∝ w_k·N(x_t; α·μ_k, v_k·I).

That gives the exact ε-, score-, x0-, v- and velocity-predictions on every schedule, exact data samples,
and — for a single Gaussian — the exact probability-flow map (affine), hence the exact consistency function.
A reference solution of the probability-flow ODE for any mixture comes from SciPy's DOP853.
"""
from __future__ import annotations

import math
import torch

import solvers
from solvers.schedules import Schedule

__all__ = ["GaussianMixture", "gmm2d", "gaussian", "gmm_nd"]


def _solver_time(schedule: Schedule, model_time: torch.Tensor) -> torch.Tensor:
    """The solver time behind a network time input, kept inside the schedule's range.

    A float32 time input carries rounding (0.999 in float32 / 0.001 = 999.0000128 on a 1000-step schedule with
    ``time_scale=1/1000``), which must not take an exact network outside ``[t_zero, t_max]``.
    """
    t = model_time.to(torch.float64).cpu() / schedule.time_scale
    return torch.clamp(t, min=schedule.t_zero, max=schedule.t_max)


class GaussianMixture:
    """An isotropic Gaussian mixture in R^d with an exact denoiser.

    Args:
        means: (K, d) component means.
        stds: (K,) component standard deviations s_k (> 0).
        weights: (K,) mixture weights (normalised here); equal weights by default.
    """

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(self.means.shape)}")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1).expand(k).clone()
        if bool((self.stds <= 0).any()):
            raise ValueError("stds must be positive")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or bool((w <= 0).any()):
            raise ValueError(f"weights must be {k} positive numbers")
        self.weights = w / w.sum()
        self.dim = self.means.shape[1]

    # -- exact quantities -------------------------------------------------------------------------
    def mean(self) -> torch.Tensor:
        """E[x0]."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov[x0] (d × d)."""
        mu = self.mean()
        centred = self.means - mu
        cov = (self.weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
        return cov + torch.eye(self.dim, dtype=torch.float64) * (self.weights * self.stds ** 2).sum()

    def denoise(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x0 | x_t = x] for α, σ scalars or (batch,) tensors; computed in float64."""
        xd = x.to(torch.float64).reshape(x.shape[0], -1)
        a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        mu, sd, w = (t.to(x.device) for t in (self.means, self.stds, self.weights))
        var = a * a * sd[None, :] ** 2 + s * s                                 # (B or 1, K)
        diff = xd[:, None, :] - a[:, :, None] * mu[None, :, :]                  # (B, K, d)
        sq = (diff * diff).sum(-1)                                              # (B, K)
        logp = torch.log(w)[None, :] - 0.5 * sq / var - 0.5 * self.dim * torch.log(var)
        r = torch.softmax(logp, dim=1)                                          # (B, K)
        post = mu[None, :, :] + (a * sd[None, :] ** 2 / var)[:, :, None] * diff  # (B, K, d)
        return (r[:, :, None] * post).sum(1).reshape(x.shape).to(x.dtype)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of the data distribution at each row of x (float64, shape (batch,))."""
        xd = x.to(torch.float64).reshape(x.shape[0], -1)
        var = self.stds.to(xd.device) ** 2
        sq = ((xd[:, None, :] - self.means.to(xd.device)[None]) ** 2).sum(-1)
        logp = (torch.log(self.weights.to(xd.device))[None] - 0.5 * sq / var
                - 0.5 * self.dim * torch.log(2 * math.pi * var))
        return torch.logsumexp(logp, 1)

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n exact samples of x0 (float64), reproducible from ``seed``."""
        g = torch.Generator().manual_seed(int(seed))
        comp = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * z

    # -- as a network --------------------------------------------------------------------------
    def network(self, schedule: Schedule, prediction: str = "eps"):
        """``fn(x, model_time)`` predicting ``prediction`` exactly on ``schedule``."""
        if prediction not in solvers.PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(solvers.PREDICTIONS)}")

        def fn(x: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
            t = _solver_time(schedule, model_time)
            a = schedule.alpha(t).to(x.device)
            s = schedule.sigma(t).to(x.device)
            x0 = self.denoise(x, a, s).to(torch.float64)
            xd = x.to(torch.float64)
            shape = (-1,) + (1,) * (x.dim() - 1)
            a_, s_ = a.reshape(shape), s.reshape(shape)
            eps = (xd - a_ * x0) / s_
            if prediction == "x0":
                out = x0
            elif prediction == "eps":
                out = eps
            elif prediction == "score":
                out = -eps / s_
            elif prediction == "v":
                out = a_ * eps - s_ * x0
            else:
                da = schedule.d_alpha(t).to(x.device).reshape(shape)
                ds = schedule.d_sigma(t).to(x.device).reshape(shape)
                out = da * x0 + ds * eps
            return out.to(x.dtype)

        return fn

    def as_model(self, schedule: Schedule, prediction: str = "eps", **kwargs) -> solvers.DiffusionModel:
        """This mixture as a :class:`solvers.DiffusionModel` with an exact network."""
        return solvers.DiffusionModel(self.network(schedule, prediction), schedule=schedule,
                                      prediction=prediction, **kwargs)

    def pf_ode_velocity(self, schedule: Schedule, x: torch.Tensor, t: float) -> torch.Tensor:
        """dx/dt of the probability-flow ODE at time t: α'(t)·D + σ'(t)·ε̂ (float64)."""
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        da, ds = float(schedule.d_alpha(t)), float(schedule.d_sigma(t))
        x0 = self.denoise(x, a, s)
        return da * x0 + ds * (x - a * x0) / s

    def ode_solution(self, schedule: Schedule, x: torch.Tensor, t_from: float, t_to: float,
                     rtol: float = 1e-10, atol: float = 1e-12, per_sample: bool = True) -> torch.Tensor:
        """Reference solution of the probability-flow ODE from t_from to t_to with SciPy's DOP853.

        Integrated in the schedule's own time; with ``per_sample`` each sample gets its own step sizes,
        otherwise the batch is one system (faster; still within the tolerance).  When ``t_to`` is the
        schedule's ``t_zero`` (σ = 0, where the velocity is singular) the ODE is solved to ``t_min`` and
        the exact denoiser takes the last stretch: x(0) = E[x0 | x_{t_min}] + O(σ(t_min)²).
        """
        from scipy.integrate import solve_ivp

        to_zero = t_to <= schedule.t_zero
        t_stop = schedule.t_min if to_zero else t_to
        xd = x.detach().to(torch.float64).cpu()
        shape = xd.shape[1:]
        groups = [xd[i:i + 1] for i in range(xd.shape[0])] if per_sample else [xd]
        outs = []
        for i, xg in enumerate(groups):
            def rhs(t, y, n=xg.shape[0]):
                xt = torch.from_numpy(y).reshape(n, *shape)
                return self.pf_ode_velocity(schedule, xt, float(t)).reshape(-1).numpy()
            sol = solve_ivp(rhs, (t_from, t_stop), xg.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
            if not sol.success:
                raise RuntimeError(f"DOP853 failed on group {i}: {sol.message}")
            outs.append(torch.from_numpy(sol.y[:, -1]).reshape(xg.shape))
        out = torch.cat(outs)
        if to_zero:
            out = self.denoise(out, float(schedule.alpha(t_stop)), float(schedule.sigma(t_stop)))
        return out.to(x.dtype)

    # -- single Gaussian: exact flow map -------------------------------------------------------------
    def flow_map(self, schedule: Schedule, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
        """Exact probability-flow map x_{t_from} → x_{t_to} for a single Gaussian (K = 1).

        x_t = α·μ + sqrt(α²s² + σ²)·z along the flow, with z fixed: an affine map.
        """
        if self.means.shape[0] != 1:
            raise ValueError("the closed-form flow map exists for a single Gaussian only (K = 1)")
        mu = self.means[0].to(x.device)
        s2 = float(self.stds[0]) ** 2
        a0, s0 = float(schedule.alpha(t_from)), float(schedule.sigma(t_from))
        a1, s1 = float(schedule.alpha(t_to)), float(schedule.sigma(t_to))
        k = math.sqrt(a1 * a1 * s2 + s1 * s1) / math.sqrt(a0 * a0 * s2 + s0 * s0)
        flat = x.to(torch.float64).reshape(x.shape[0], -1)
        return (a1 * mu + k * (flat - a0 * mu)).reshape(x.shape).to(x.dtype)

    def consistency_network(self, schedule: Schedule):
        """The exact consistency function f(x, t) = flow map to ``t_zero``, as ``fn(x, model_time)``."""

        def fn(x: torch.Tensor, model_time: torch.Tensor) -> torch.Tensor:
            t = _solver_time(schedule, model_time).tolist()
            if len(set(t)) != 1:
                raise ValueError("consistency_network expects one time per call")
            return self.flow_map(schedule, x, t[0], schedule.t_zero)

        return fn


def gmm2d(kind: str = "ring", n_components: int = 8, radius: float = 4.0, std: float = 0.3) -> GaussianMixture:
    """The 2-D point cloud of the classic diffusion illustrations: 8 Gaussians on a ring (or a spiral)."""
    if kind == "ring":
        ang = torch.arange(n_components, dtype=torch.float64) * (2 * math.pi / n_components)
        means = torch.stack([radius * torch.cos(ang), radius * torch.sin(ang)], 1)
    elif kind == "spiral":
        u = torch.linspace(0.15, 1.0, n_components, dtype=torch.float64)
        ang = 3 * math.pi * u
        means = torch.stack([radius * u * torch.cos(ang), radius * u * torch.sin(ang)], 1)
    else:
        raise ValueError(f"unknown gmm2d kind {kind!r}; valid: ring, spiral")
    return GaussianMixture(means, std)


def gaussian(dim: int = 2, mean: float = 0.5, std: float = 0.7) -> GaussianMixture:
    """A single isotropic Gaussian N(mean·1, std²·I) in R^dim (closed-form flow map)."""
    return GaussianMixture(torch.full((1, dim), float(mean), dtype=torch.float64), std)


def gmm_nd(dim: int = 64, n_components: int = 4, spread: float = 1.0, std: float = 0.5, seed: int = 0
           ) -> GaussianMixture:
    """A Gaussian mixture in R^dim with means drawn once from N(0, spread²·I) with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(n_components, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(n_components, generator=g, dtype=torch.float64)
    return GaussianMixture(means, std, weights)

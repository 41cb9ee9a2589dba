"""Noise schedules: the map from solver time t to the marginal x_t = α(t)·x0 + σ(t)·ε.

Every schedule gives, for a time t (a float or a float64 tensor):

* ``alpha(t)``, ``sigma(t)`` and their time derivatives ``d_alpha(t)``, ``d_sigma(t)``;
* ``log_snr(t)`` = λ(t) = log(α/σ) and its inverse ``t_from_log_snr(λ)``;
* the SDE coefficients ``drift(t)`` = f(t) = α'/α and ``diffusion2(t)`` = g²(t) = −2σ²·λ'(t), so that the
  forward SDE dx = f(t)·x dt + g(t) dw has exactly these marginals;
* ``model_time(t)``: what the network is given as its time input;
* the range: ``t_max`` (the noisiest time), ``t_min`` (the least noisy time the network may be evaluated
  at), ``default_t_end`` (where a generated grid stops) and ``t_zero`` (the time at which σ = 0: the data).

Solver time always runs from noise (large t) to data (small t).  Evaluations are done in float64 on the host
by the sampling loop, once per grid, so nothing here is on the hot path.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence, Union

import torch

TimeLike = Union[float, torch.Tensor]

__all__ = [
    "Schedule",
    "DiscreteVP",
    "VPLinear",
    "VPCosine",
    "EDM",
    "VE",
    "RectifiedFlow",
    "available_schedules",
    "get_schedule",
]


def _t64(t: TimeLike) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _sigma_from_log_alpha(log_alpha: torch.Tensor) -> torch.Tensor:
    # σ = sqrt(1 − α²) computed without cancellation for α close to 1; log α ≤ 0 (see _VariancePreserving).
    return torch.sqrt(-torch.expm1(2.0 * log_alpha))


def _log_alpha_from_log_snr(lam: torch.Tensor) -> torch.Tensor:
    # On a variance-preserving schedule α² = 1 / (1 + e^{−2λ}).
    return -0.5 * torch.nn.functional.softplus(-2.0 * lam)


class Schedule:
    """Base class of the noise schedules.  Subclasses define α, σ, their derivatives and λ⁻¹.

    Attributes:
        t_max: the noisiest time (where sampling starts by default).
        t_min: the smallest time at which the network may be evaluated.
        default_t_end: the last noise level of a generated grid before the final step to ``t_zero``.
        t_zero: the time at which σ = 0 (clean data); a grid may end here but the model is never
            evaluated there.
        variance_preserving: α² + σ² = 1 at every t.
        ode_form: the variables in which Euler and Heun integrate the probability-flow ODE: ``"ve"`` —
            x/α against σ/α, the form of EDM (Karras et al. 2022, eq. 4) and k-diffusion — or ``"native"``:
            x against t (the natural form of flow matching, where α may vanish at the start).
    """

    name: str = "schedule"
    t_max: float
    t_min: float
    default_t_end: float
    t_zero: float = 0.0
    variance_preserving: bool = False
    ode_form: Literal["ve", "native"] = "ve"
    time_scale: float = 1.0

    # -- to be defined by subclasses -------------------------------------------------------------
    def alpha(self, t: TimeLike) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: TimeLike) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: TimeLike) -> torch.Tensor:
        """dα/dt."""
        raise NotImplementedError

    def d_sigma(self, t: TimeLike) -> torch.Tensor:
        """dσ/dt."""
        raise NotImplementedError

    def t_from_log_snr(self, lam: TimeLike) -> torch.Tensor:
        """The time t with λ(t) = lam (the inverse of :meth:`log_snr`)."""
        raise NotImplementedError

    # -- derived ------------------------------------------------------------------------------------
    def log_snr(self, t: TimeLike) -> torch.Tensor:
        """λ(t) = log α(t) − log σ(t); +inf at ``t_zero``."""
        t = _t64(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def sigma_ve(self, t: TimeLike) -> torch.Tensor:
        """σ(t)/α(t): the noise level of the equivalent variance-exploding process x/α."""
        t = _t64(t)
        return self.sigma(t) / self.alpha(t)

    def t_from_sigma_ve(self, sigma_ve: TimeLike) -> torch.Tensor:
        """Inverse of :meth:`sigma_ve`."""
        return self.t_from_log_snr(-torch.log(_t64(sigma_ve)))

    def drift(self, t: TimeLike) -> torch.Tensor:
        """f(t) = α'(t)/α(t), the drift coefficient of the forward SDE dx = f·x dt + g dw."""
        t = _t64(t)
        return self.d_alpha(t) / self.alpha(t)

    def diffusion2(self, t: TimeLike) -> torch.Tensor:
        """g²(t) = 2σσ' − 2f σ² = −2σ²·λ'(t), the squared diffusion coefficient of the forward SDE."""
        t = _t64(t)
        a, s = self.alpha(t), self.sigma(t)
        return 2.0 * s * self.d_sigma(t) - 2.0 * (self.d_alpha(t) / a) * s * s

    def model_time(self, t: TimeLike) -> torch.Tensor:
        """The network's time input for solver time t (here: t · ``time_scale``)."""
        return _t64(t) * self.time_scale

    def prior_std(self, t: TimeLike) -> float:
        """Standard deviation of the prior N(0, s²·I) that x at time t is drawn from."""
        return float(self.sigma(t))

    def q_sample(self, x0: torch.Tensor, t: TimeLike, noise: torch.Tensor) -> torch.Tensor:
        """The forward process in closed form: x_t = α(t)·x0 + σ(t)·noise (t scalar or per sample)."""
        t = _t64(t)
        a = self.alpha(t).to(x0.dtype).to(x0.device)
        s = self.sigma(t).to(x0.dtype).to(x0.device)
        if a.dim() == 1:
            a = a.view(-1, *([1] * (x0.dim() - 1)))
            s = s.view(-1, *([1] * (x0.dim() - 1)))
        return a * x0 + s * noise

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class _VariancePreserving(Schedule):
    """Shared pieces of the VP schedules, defined through log α(t).

    Subclasses implement ``_raw_log_alpha``; the public ``log_alpha`` clamps it to ≤ 0, so α ∈ [0, 1] and
    σ = sqrt(−expm1(2 log α)) ≥ 0 by construction.  Without the clamp a formula that is exactly 0 at t_zero in
    exact arithmetic (the cosine schedule's log cos θ(t) − log cos θ(0)) can round to +1e-20 on one CPU and
    make σ² < 0 (NaN) there while giving 0 on another.
    """

    variance_preserving = True

    def _raw_log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_alpha(self, t: TimeLike) -> torch.Tensor:
        """log α(t), never above 0."""
        return self._raw_log_alpha(_t64(t)).clamp_max_(0.0)  # each _raw_log_alpha returns a new tensor

    def d_log_alpha(self, t: TimeLike) -> torch.Tensor:
        raise NotImplementedError

    def alpha(self, t: TimeLike) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return _sigma_from_log_alpha(self.log_alpha(t))

    def log_snr(self, t: TimeLike) -> torch.Tensor:
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def d_alpha(self, t: TimeLike) -> torch.Tensor:
        t = _t64(t)
        return self.alpha(t) * self.d_log_alpha(t)

    def d_sigma(self, t: TimeLike) -> torch.Tensor:
        # σ² = 1 − α²  ⇒  σ' = −α·α'/σ = −α²·(log α)'/σ.
        t = _t64(t)
        a = self.alpha(t)
        return -a * a * self.d_log_alpha(t) / self.sigma(t)

    def drift(self, t: TimeLike) -> torch.Tensor:
        return self.d_log_alpha(_t64(t))

    def diffusion2(self, t: TimeLike) -> torch.Tensor:
        # g² = −2 (log α)' for a VP process (β(t) in Song et al. 2021).
        return -2.0 * self.d_log_alpha(_t64(t))

    def prior_std(self, t: TimeLike) -> float:
        return 1.0


class VPLinear(_VariancePreserving):
    """Continuous VP-SDE with linear β(t) = β_min + t(β_max − β_min), t ∈ [0, 1] (Song et al. 2021).

    log α(t) = −¼t²(β_max − β_min) − ½t·β_min.

    Args:
        beta_min, beta_max: the endpoints of β(t) (defaults 0.1 and 20, as in the paper).
        t_min: smallest time the network may be evaluated at.
        default_t_end: last noise level of a generated grid (1e-3, DPM-Solver's choice).
        time_scale: the network's time input is t·time_scale (e.g. 999 for nets trained on indices).
    """

    name = "vp_linear"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, *, t_min: float = 1e-5,
                 default_t_end: float = 1e-3, time_scale: float = 1.0):
        if not (0 <= beta_min < beta_max):
            raise ValueError(f"VPLinear needs 0 <= beta_min < beta_max, got beta_min={beta_min}, "
                             f"beta_max={beta_max}")
        if not (0 < t_min <= default_t_end < 1):
            raise ValueError(f"VPLinear needs 0 < t_min <= default_t_end < 1, got t_min={t_min}, "
                             f"default_t_end={default_t_end}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max, self.default_t_end = float(t_min), 1.0, float(default_t_end)
        self.time_scale = float(time_scale)

    def _raw_log_alpha(self, t):
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def d_log_alpha(self, t):
        t = _t64(t)
        return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min

    def t_from_log_snr(self, lam):
        # −2 log α = L = log(1 + e^{−2λ}) and ½Δt² + β_min·t = L  ⇒  t = 2L / (β_min + sqrt(β_min² + 2ΔL)).
        big_l = torch.nn.functional.softplus(-2.0 * _t64(lam))
        delta = self.beta_max - self.beta_min
        return 2.0 * big_l / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 2.0 * delta * big_l))

    def describe(self):
        return f"beta_min={self.beta_min}, beta_max={self.beta_max}"


class VPCosine(_VariancePreserving):
    """Continuous cosine VP schedule (Nichol & Dhariwal 2021): α(t) = cos(π/2·(t+s)/(1+s)) / cos(π/2·s/(1+s)).

    α reaches 0 at t = 1, so ``t_max`` defaults to 0.9946 as in the DPM-Solver code.
    """

    name = "vp_cosine"

    def __init__(self, s: float = 0.008, *, t_max: float = 0.9946, t_min: float = 1e-5,
                 default_t_end: float = 1e-3, time_scale: float = 1.0):
        if not (0 < t_min <= default_t_end < t_max < 1):
            raise ValueError("VPCosine needs 0 < t_min <= default_t_end < t_max < 1, got "
                             f"t_min={t_min}, default_t_end={default_t_end}, t_max={t_max}")
        self.s = float(s)
        self.t_min, self.t_max, self.default_t_end = float(t_min), float(t_max), float(default_t_end)
        self.time_scale = float(time_scale)
        self._log_cos0 = math.log(math.cos(math.pi / 2 * self.s / (1 + self.s)))
        self._tan0 = math.tan(math.pi / 2 * self.s / (1 + self.s))

    def _theta(self, t):
        return math.pi / 2 * (_t64(t) + self.s) / (1 + self.s)

    def _raw_log_alpha(self, t):
        # cos θ(t) / cos θ(0) with θ(t) = θ(0) + δ:  cos δ − tan θ(0)·sin δ = 1 − 2 sin²(δ/2) − tan θ(0)·sin δ.
        # Exactly 1 at t = 0 on every CPU (sin 0 = 0 in IEEE arithmetic) and free of cancellation near it,
        # where log cos θ(t) − log cos θ(0) rounded to ±1e-20 depending on the CPU's cosine.
        delta = (math.pi / 2) * t / (1 + self.s)
        return torch.log1p(-2.0 * torch.sin(0.5 * delta) ** 2 - self._tan0 * torch.sin(delta))

    def d_log_alpha(self, t):
        return -torch.tan(self._theta(t)) * (math.pi / 2) / (1 + self.s)

    def t_from_log_snr(self, lam):
        log_alpha = _log_alpha_from_log_snr(_t64(lam))
        theta = torch.arccos(torch.exp(log_alpha + self._log_cos0))
        # θ(λ = ∞) = θ(0) up to rounding, which can land a hair below t_zero = 0.
        return torch.clamp(theta * 2 * (1 + self.s) / math.pi - self.s, min=0.0)

    def describe(self):
        return f"s={self.s}, t_max={self.t_max}"


def betas_for_alpha_bar(num_train_timesteps: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    """β_i = min(1 − ᾱ(u_{i+1})/ᾱ(u_i), ``max_beta``) at u_i = i/N: a continuous ᾱ(u) on [0, 1] discretised (float64)."""
    f = alpha_bar(torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps)
    return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)


class DiscreteVP(_VariancePreserving):
    """DDPM-style discrete schedule: ᾱ given at the N trained step indices 0 … N−1.

    Solver time t is the step index as a float.  log α = ½·log ᾱ is interpolated linearly between indices
    (as in the DPM-Solver code), and an extra knot at t = −1 with ᾱ = 1 stands for the clean data: the
    last step of DDIM/DDPM "to ᾱ = 1" (``set_alpha_to_one``) is a step to ``t_zero = −1``.

    The network's time input is t·time_scale: ``time_scale=1`` for networks trained on the step index
    (Ho et al.; diffusers), ``1/T`` for the "index / T as a float" convention.  With
    ``integer_time=True`` the input is rounded to the nearest index (for networks that only saw integers).

    Build it with ``DiscreteVP(betas)``, ``DiscreteVP(alphas_cumprod=...)``, or the classmethods
    :meth:`linear` (Ho et al.: β from 1e-4 to 0.02 over 1000 steps) and :meth:`cosine`.
    """

    name = "discrete_vp"

    def __init__(self, betas: Sequence[float] | torch.Tensor | None = None, *,
                 alphas_cumprod: Sequence[float] | torch.Tensor | None = None,
                 time_scale: float = 1.0, integer_time: bool = False):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("DiscreteVP needs exactly one of `betas` or `alphas_cumprod`")
        if betas is not None:
            b = torch.as_tensor(betas, dtype=torch.float64).flatten()
            if b.numel() < 2 or not bool(((b > 0) & (b < 1)).all()):
                raise ValueError("DiscreteVP: betas must be at least 2 values, each in (0, 1)")
            abar = torch.cumprod(1.0 - b, 0)
        else:
            abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
            if abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()):
                raise ValueError("DiscreteVP: alphas_cumprod must be at least 2 values, each in (0, 1)")
            if not bool((abar[1:] < abar[:-1]).all()):
                raise ValueError("DiscreteVP: alphas_cumprod must be strictly decreasing")
        self.alphas_cumprod = abar
        self.num_train_timesteps = int(abar.numel())
        self.time_scale = float(time_scale)
        self.integer_time = bool(integer_time)
        self.t_min, self.t_max, self.default_t_end, self.t_zero = 0.0, float(abar.numel() - 1), 0.0, -1.0
        # Knots at t = −1, 0, …, N−1; log α is increasing in the knot array reversed.
        self._log_alpha_knots = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(abar)])

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               **kwargs) -> "DiscreteVP":
        """Ho et al.'s linear schedule (β_1 = 1e-4 … β_T = 0.02)."""
        return cls(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64), **kwargs)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
               **kwargs) -> "DiscreteVP":
        """Nichol & Dhariwal's cosine schedule, discretised with β clipped at ``max_beta``."""
        alpha_bar = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return cls(betas_for_alpha_bar(num_train_timesteps, alpha_bar, max_beta), **kwargs)

    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Index of the knot interval [k, k+1] (in knot numbering, t = k − 1) that holds t.
        pos = t + 1.0
        k = torch.clamp(torch.floor(pos), 0, self._log_alpha_knots.numel() - 2).long()
        return k, pos - k.to(torch.float64)

    def _raw_log_alpha(self, t):
        if bool(((t < self.t_zero) | (t > self.t_max)).any()):
            raise ValueError(f"DiscreteVP: time {t.tolist()} is outside [{self.t_zero}, {self.t_max}]")
        k, frac = self._segment(t)
        lo, hi = self._log_alpha_knots[k], self._log_alpha_knots[k + 1]
        return lo + frac * (hi - lo)

    def d_log_alpha(self, t):
        t = _t64(t)
        # Solver time decreases, so at a knot the step uses the interval below it.
        k, frac = self._segment(t)
        k = torch.where((frac == 0) & (k > 0), k - 1, k)
        return self._log_alpha_knots[k + 1] - self._log_alpha_knots[k]

    def t_from_log_snr(self, lam):
        target = _log_alpha_from_log_snr(_t64(lam))
        knots = self._log_alpha_knots  # decreasing
        neg = -knots
        k = torch.searchsorted(neg, -target.reshape(-1)).reshape(target.shape)
        k = torch.clamp(k, 1, knots.numel() - 1)
        lo, hi = knots[k - 1], knots[k]
        frac = (target - lo) / (hi - lo)
        return (k - 1).to(torch.float64) + frac - 1.0

    def model_time(self, t):
        t = _t64(t)
        if self.integer_time:
            t = torch.round(t)
        return t * self.time_scale

    def describe(self):
        return (f"N={self.num_train_timesteps}, time_scale={self.time_scale}, "
                f"integer_time={self.integer_time}")


class EDM(Schedule):
    """Variance-exploding schedule in EDM form: α = 1, σ(t) = t (Karras et al. 2022).

    Solver time *is* the noise level σ.  ``VE`` is the same class (x = x0 + σ·ε).
    """

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, *, time_scale: float = 1.0):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max, self.default_t_end = self.sigma_min, self.sigma_max, self.sigma_min
        self.time_scale = float(time_scale)

    def alpha(self, t):
        return torch.ones_like(_t64(t))

    def sigma(self, t):
        return _t64(t).clone()

    def d_alpha(self, t):
        return torch.zeros_like(_t64(t))

    def d_sigma(self, t):
        return torch.ones_like(_t64(t))

    def log_snr(self, t):
        return -torch.log(_t64(t))

    def t_from_log_snr(self, lam):
        return torch.exp(-_t64(lam))

    def describe(self):
        return f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"


VE = EDM


class RectifiedFlow(Schedule):
    """Rectified flow / flow matching: x_t = (1 − t)·x0 + t·ε, t ∈ [0, 1].

    α vanishes at t = 1, so Euler and Heun integrate in the native variables (x against t); a velocity
    model u(x, t) ≈ ε − x0 is the natural parameterisation.
    """

    name = "rectified_flow"
    ode_form = "native"

    def __init__(self, *, t_min: float = 1e-5, default_t_end: float = 1e-3, time_scale: float = 1.0):
        if not (0 < t_min <= default_t_end < 1):
            raise ValueError("RectifiedFlow needs 0 < t_min <= default_t_end < 1")
        self.t_min, self.t_max, self.default_t_end = float(t_min), 1.0, float(default_t_end)
        self.time_scale = float(time_scale)

    def alpha(self, t):
        return 1.0 - _t64(t)

    def sigma(self, t):
        return _t64(t).clone()

    def d_alpha(self, t):
        return -torch.ones_like(_t64(t))

    def d_sigma(self, t):
        return torch.ones_like(_t64(t))

    def t_from_log_snr(self, lam):
        return torch.sigmoid(-_t64(lam))

    def describe(self):
        return f"time_scale={self.time_scale}"


_SCHEDULES = {
    "discrete_vp": DiscreteVP.linear,
    "discrete_vp_cosine": DiscreteVP.cosine,
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "edm": EDM,
    "ve": EDM,
    "rectified_flow": RectifiedFlow,
}


def available_schedules() -> list[str]:
    """Names accepted by :func:`get_schedule`."""
    return sorted(_SCHEDULES)


def get_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name (see :func:`available_schedules`)."""
    try:
        factory = _SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(available_schedules())}") from None
    return factory(**kwargs)

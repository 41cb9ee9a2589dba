"""What a diffusers scheduler config says, with diffusers' meaning: which method, and which grid.

:func:`resolve_method` reads the method (``solver`` omitted: the source scheduler's own — DPMSolverMultistep
order 2 → ``dpmpp_2m``, UniPC → ``unipc``, …; ``solver`` given: the options the config implies for it, with the
user's options winning and the keys they override listed).  :func:`inference_grid` reproduces the source's
``set_timesteps``: its ``timesteps`` (what the network is given), its ``sigmas`` and, from them, the solver-time
grid of this library.  :func:`check_config` refuses, in one line naming the key, what cannot be honoured.
Plain dicts in, no diffusers import (``solvers.interop.scheduler`` fills in the counterpart's defaults).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from ..grids import validate_grid
from ..schedules import RectifiedFlow
from .diffusers import betas_from_config

__all__ = ["COUNTERPARTS", "MethodChoice", "InferenceGrid", "method_from_config", "config_options",
           "resolve_method", "check_config", "is_flow", "flow_source_keys", "inference_grid"]

# Our solver → the diffusers scheduler whose defaults and grid rules apply when the user names the solver.  The
# solvers without a diffusers counterpart (score-SDE and consistency samplers) take DPM-Solver's: linspace
# spacing, a final step to σ = 0, no clipping.
COUNTERPARTS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                "dpmpp_3m": "DPMSolverMultistepScheduler", "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
                "dpmpp_2s": "DPMSolverSinglestepScheduler", "unipc": "UniPCMultistepScheduler",
                "deis": "DEISMultistepScheduler", "euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler",
                "ipndm": "DPMSolverMultistepScheduler"}
GENERIC_COUNTERPART = "DPMSolverMultistepScheduler"
MULTISTEP = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
             "DPMSolverSinglestepScheduler")
SIGMA_SCHEDULERS = ("EulerDiscreteScheduler", "HeunDiscreteScheduler")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
SIGMA_FAMILIES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                  "use_flow_sigmas")
READABLE = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
            "DEISMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler", FLOW_SCHEDULER)


@dataclasses.dataclass(frozen=True)
class MethodChoice:
    """The method a config (and the user) chose: our solver and options, the diffusers counterpart whose
    defaults and grid rules apply, and the config keys the user's options overrode."""

    solver: str
    options: dict
    counterpart: str
    overridden: tuple = ()


@dataclasses.dataclass(frozen=True)
class InferenceGrid:
    """A grid as diffusers' ``set_timesteps`` makes it: ``grid`` in solver time (what ``solvers.sample(timesteps=)``
    takes), ``network_times`` (diffusers' ``timesteps``, one per grid point but the last), ``sigmas`` (diffusers'
    σ at every grid point: σ/α, or t on a flow)."""

    grid: list
    network_times: list
    sigmas: list


def _lower_order_final(cfg: dict):
    """DPM-Solver's and DEIS's rule (lower the order at the end below 15 steps) is our ``"auto"``; False keeps
    the order.  (UniPC lowers it whatever the step count: see :func:`config_options`.)"""
    return "auto" if cfg.get("lower_order_final", True) else False


def _dpm_method(cfg: dict) -> tuple[str, dict]:
    algorithm, order = cfg.get("algorithm_type", "dpmsolver++"), int(cfg.get("solver_order", 2))
    solver_type = cfg.get("solver_type", "midpoint")
    if algorithm == "dpmsolver++" and order in (2, 3):
        return ("dpmpp_2m" if order == 2 else "dpmpp_3m"), {"solver_type": solver_type}
    if algorithm == "dpmsolver++" and order == 1:
        return "ddim", {}
    if algorithm == "sde-dpmsolver++" and order == 2 and solver_type == "midpoint":
        return "dpmpp_2m_sde", {}
    raise ValueError(f"DPMSolverMultistepScheduler with algorithm_type={algorithm!r}, solver_order={order}, "
                     f"solver_type={solver_type!r} has no equivalent solver here (this library has DPM-Solver++ "
                     f"orders 1-3 and SDE-DPM-Solver++(2M) midpoint); pass solver= to choose one")


def method_from_config(cfg: dict, source: Optional[str]) -> tuple[str, dict]:
    """(solver, options) that reproduce the scheduler ``source`` configured by ``cfg``.

    Raises:
        ValueError: a source this library cannot reproduce (named, with the schedulers it can read).
    """
    if source is None:
        return "dpmpp_2m", {}
    if source == "DPMSolverMultistepScheduler":
        name, options = _dpm_method(cfg)
    elif source == "DDIMScheduler":
        name, options = "ddim", {}
    elif source == "DDPMScheduler":
        name, options = "ddpm", {}
    elif source == "UniPCMultistepScheduler":
        name, options = "unipc", {}
    elif source == "DEISMultistepScheduler":
        name, options = "deis", {}
    elif source in ("EulerDiscreteScheduler", FLOW_SCHEDULER):
        name, options = "euler", {}
    elif source == "HeunDiscreteScheduler":
        name, options = "heun", {}
    else:
        raise ValueError(f"{source} has no equivalent solver here; pass solver= (any fixed-grid solver of "
                         f"solvers.available_solvers()) or use a config of {', '.join(READABLE)}")
    return name, {**{k: v for k, (v, _) in config_options(name, cfg).items()}, **options}


def _ddpm_variance(cfg: dict):
    kind = cfg.get("variance_type", "fixed_small")
    if kind in ("fixed_small", "fixed_small_log"):
        return "small"
    if kind in ("fixed_large", "fixed_large_log"):
        return "large"
    raise ValueError(f"variance_type={kind!r} (the network's own variance) has no equivalent here; pass "
                     "solver='ddpm' with variance='small' or 'large' (the variance channels are then dropped)")


def config_options(solver: str, cfg: dict) -> dict:
    """The options of ``solver`` that ``cfg`` implies: {option: (value, config key)}, for the keys present."""
    readers = {
        "lower_order_final": ("lower_order_final", _lower_order_final),
        "solver_type": ("solver_type", lambda c: c["solver_type"]),
        "solver_order": ("solver_order", lambda c: int(c["solver_order"])),
        "variant": ("solver_type", lambda c: c["solver_type"]),
        "variable": ("solver_type", lambda c: c["solver_type"]),
        "variance": ("variance_type", _ddpm_variance),
    }
    wanted = {"dpmpp_2m": ("lower_order_final", "solver_type"), "dpmpp_3m": ("lower_order_final", "solver_type"),
              "dpmpp_2m_sde": ("lower_order_final",), "unipc": ("solver_order", "variant", "lower_order_final"),
              "deis": ("solver_order", "variable", "lower_order_final"), "ddpm": ("variance",)}.get(solver, ())
    out = {}
    for option in wanted:
        key, read = readers[option]
        if key in cfg and cfg[key] is not None:
            out[option] = (read(cfg), key)
    if solver == "unipc" and out.get("lower_order_final", (None,))[0] == "auto":
        out["lower_order_final"] = (True, "lower_order_final")  # UniPC: at every step count
    if solver == "unipc" and cfg.get("final_sigmas_type") == "sigma_min" \
            and any(cfg.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
        # diffusers' σ list then repeats σ_min: its zero-length last step corrects the last point
        out["correct_last"] = (True, "final_sigmas_type")
    if solver == "unipc" and cfg.get("disable_corrector"):
        raise ValueError(f"disable_corrector={cfg['disable_corrector']!r} (no corrector at those steps) has no "
                         "equivalent here; use a config without it, or use_corrector=False for every step")
    return out


def _implied(solver: str) -> dict:
    """Config keys a solver's name fixes (DPM-Solver++(3M) is solver_order 3, …)."""
    return {"dpmpp_2m": {"solver_order": 2, "algorithm_type": "dpmsolver++"},
            "dpmpp_3m": {"solver_order": 3, "algorithm_type": "dpmsolver++"},
            "dpmpp_2m_sde": {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}}.get(solver, {})


def resolve_method(given: dict, source: Optional[str], solver: Optional[str], options: dict,
                   defaults_of=lambda name: {}) -> MethodChoice:
    """The method: the source's own (``solver`` None; its counterpart is the source) or ``solver`` with the
    options the config implies, the user's ``options`` winning (``overridden`` names the keys they changed).

    ``defaults_of(class name)`` gives a diffusers class's constructor defaults: the keys a config left unset
    take the counterpart's (diffusers' ``from_config`` semantics).
    """
    if solver is None:
        name, _ = method_from_config(given, source)
        counterpart = source if source in READABLE else COUNTERPARTS.get(name, GENERIC_COUNTERPART)
        name, implied = method_from_config({**defaults_of(counterpart), **given}, source)
        return MethodChoice(name, {**implied, **options}, counterpart, ())
    counterpart = FLOW_SCHEDULER if source == FLOW_SCHEDULER and solver == "euler" else \
        COUNTERPARTS.get(solver, GENERIC_COUNTERPART)
    derived = {} if source == FLOW_SCHEDULER else config_options(solver, {**defaults_of(counterpart), **given})
    overridden = sorted({key for opt, (value, key) in derived.items()
                         if opt in options and options[opt] != value and key in given}
                        | {k for k, v in _implied(solver).items() if k in given and given[k] != v})
    merged = {**{k: v for k, (v, _) in derived.items()}, **options}
    return MethodChoice(solver, merged, counterpart, tuple(overridden))


def flow_source_keys(given: dict, source: Optional[str], counterpart: str) -> dict:
    """A flow-matching source read by another counterpart: its shift becomes the counterpart's flow sigmas."""
    if source != FLOW_SCHEDULER or counterpart == FLOW_SCHEDULER:
        return given
    out = {k: v for k, v in given.items() if k not in ("shift",)}
    out.update(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=float(given.get("shift", 1.0)))
    return out


def is_flow(cfg: dict, counterpart: str) -> bool:
    """Whether the config describes a rectified-flow model (x_t = (1 − t)·x0 + t·ε)."""
    return counterpart == FLOW_SCHEDULER or bool(cfg.get("use_flow_sigmas")) \
        or cfg.get("prediction_type") == "flow_prediction"


_REFUSED = {
    "invert_sigmas": (False, "inverted flow sigmas are not supported"),
    "stochastic_sampling": (False, "FlowMatchEuler's stochastic sampling has no equivalent; choose a stochastic "
                                   "solver with solver= instead"),
    "shift_terminal": (None, "a stretched terminal shift is not supported; use a config without it"),
    "solver_p": (None, "an external predictor for UniPC is not supported"),
    "predict_x0": (True, "UniPC in noise prediction is not supported; use predict_x0=True"),
}


def check_config(cfg: dict, counterpart: str) -> None:
    """Refuse, in one line naming the key, the values this library cannot honour (before any sampling)."""
    for key, (ok, why) in _REFUSED.items():
        if key in cfg and cfg[key] is not None and cfg[key] != ok:
            raise ValueError(f"{key}={cfg[key]!r}: {why}")
    if cfg.get("timestep_type", "discrete") not in ("discrete", "continuous"):
        raise ValueError(f"timestep_type={cfg['timestep_type']!r} must be 'discrete' or 'continuous'")
    families = [k for k in SIGMA_FAMILIES if cfg.get(k) and not (k == "use_flow_sigmas" and
                                                                 counterpart == "UniPCMultistepScheduler")]
    if len(families) > 1:
        raise ValueError(f"{' and '.join(families)} are both set: only one sigma family can be used (diffusers "
                         "refuses this too)")
    spacing = cfg.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(f"timestep_spacing={spacing!r} is not one of diffusers' leading, trailing, linspace")
    if cfg.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type={cfg['final_sigmas_type']!r} must be 'zero' or 'sigma_min'")
    if cfg.get("interpolation_type", "linear") != "linear":
        raise ValueError(f"interpolation_type={cfg['interpolation_type']!r} is not supported; use 'linear'")
    if cfg.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type={cfg['time_shift_type']!r} must be 'exponential' or 'linear'")
    if cfg.get("use_beta_sigmas"):
        import scipy.stats  # noqa: F401  (a dependency of this project; diffusers needs it for beta sigmas too)


# -- the grid --------------------------------------------------------------------------------------------------
def _levels(cfg: dict, counterpart: str, steps: int, n_train: int, last: int) -> np.ndarray:
    """diffusers' timesteps before any sigma family: multistep schedulers place ``steps + 1`` linspace/leading
    points and drop the last; the others place ``steps``."""
    spacing, offset = cfg.get("timestep_spacing", "leading"), int(cfg.get("steps_offset", 0) or 0)
    multi = counterpart in MULTISTEP
    if spacing == "trailing":
        return np.arange(last, 0, -n_train / steps).round() - 1
    if spacing == "linspace":
        if counterpart in SIGMA_SCHEDULERS:
            return np.linspace(0, n_train - 1, steps)[::-1].copy()
        return np.linspace(0, last - 1, steps + multi).round()[::-1][:steps].copy()
    ratio = last // (steps + multi)
    return (np.arange(0, steps + multi) * ratio).round()[::-1][:steps].copy() + offset


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' ``_sigma_to_t``: the timestep of σ by linear interpolation in log σ, clipped to the table."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    return np.interp(log_sigma, log_sigmas, np.arange(len(log_sigmas), dtype=np.float64))


def _family(cfg: dict, sigmas: np.ndarray, steps: int) -> np.ndarray:
    """The σ of a sigma family (Karras ρ = 7, exponential, beta(0.6, 0.6)) between the ends of ``sigmas``."""
    hi = float(cfg["sigma_max"]) if cfg.get("sigma_max") is not None else float(sigmas[0])
    lo = float(cfg["sigma_min"]) if cfg.get("sigma_min") is not None else float(sigmas[-1])
    if cfg.get("use_karras_sigmas"):
        ramp, rho = np.linspace(0, 1, steps), 7.0
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    if cfg.get("use_exponential_sigmas"):
        return np.exp(np.linspace(math.log(hi), math.log(lo), steps))
    import scipy.stats
    ppf = scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6)
    return lo + ppf * (hi - lo)


def _sigma_table(abar: torch.Tensor) -> np.ndarray:
    """σ/α = √((1 − ᾱ)/ᾱ) at every trained step (diffusers' ``sigmas`` table, in float64)."""
    abar = abar.to(torch.float64).numpy()
    return np.sqrt((1 - abar) / abar)


def _vp_table(cfg: dict, n: int) -> np.ndarray:
    """The σ/α table of the config's β schedule (for a flow config that also names one)."""
    return _sigma_table(torch.cumprod(1.0 - betas_from_config(cfg, n), 0))


def _train_sigmas(schedule) -> np.ndarray:
    return _sigma_table(schedule.alphas_cumprod)


def _vp_grid(cfg: dict, schedule, steps: int, counterpart: str, timesteps) -> tuple:
    """(σ, network timesteps) of a variance-preserving config, without the final σ."""
    n = schedule.num_train_timesteps
    train = _train_sigmas(schedule)
    log_sigmas = np.log(train)
    if timesteps is not None:
        ts = np.asarray(timesteps, dtype=np.float64)
        return np.interp(ts, np.arange(n), train), ts
    lam = np.log(np.sqrt(schedule.alphas_cumprod.numpy())) - np.log(np.sqrt(1 - schedule.alphas_cumprod.numpy()))
    clip = float(cfg.get("lambda_min_clipped", -math.inf) or -math.inf)
    last = n - int(np.searchsorted(lam[::-1], clip)) if counterpart == "DPMSolverMultistepScheduler" else n
    ts = _levels(cfg, counterpart, steps, n, last)
    sigmas = np.interp(ts, np.arange(n), train)
    rounded = counterpart in MULTISTEP and cfg.get("beta_schedule") != "squaredcos_cap_v2"
    if cfg.get("use_lu_lambdas"):
        lams = np.linspace(-math.log(train[-1]), -math.log(train[0]), steps)
        sigmas = np.exp(-lams)
        ts = _sigma_to_t(sigmas, log_sigmas)
        ts = ts.round() if rounded else ts
    elif any(cfg.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
        sigmas = _family(cfg, sigmas if counterpart in SIGMA_SCHEDULERS else train[::-1], steps)
        ts = _sigma_to_t(sigmas, log_sigmas)
        ts = ts.round() if rounded and cfg.get("use_karras_sigmas") else ts
    # The multistep schedulers keep int64 timesteps: a fractional one is truncated.
    return sigmas, (np.trunc(ts) if counterpart in MULTISTEP else ts)


def _shift(cfg: dict, sigmas: np.ndarray, mu: Optional[float], counterpart: str) -> np.ndarray:
    """The flow shift: ``mu`` with dynamic shifting, else ``shift`` (FlowMatchEuler) or ``flow_shift``."""
    if cfg.get("use_dynamic_shifting"):
        if mu is None:
            raise ValueError("use_dynamic_shifting=True needs mu: pass set_timesteps(..., mu=...) as the flow "
                             "pipelines do")
        if cfg.get("time_shift_type", "exponential") == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        return mu / (mu + (1 / sigmas - 1))
    shift = float(cfg.get("shift", 1.0) if counterpart == FLOW_SCHEDULER else cfg.get("flow_shift", 1.0) or 1.0)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _flow_grid(cfg: dict, steps: int, counterpart: str, mu, timesteps, sigmas) -> tuple:
    """(σ, network timesteps) of a rectified-flow config (FlowMatchEuler, or use_flow_sigmas), without the final."""
    n = int(cfg.get("num_train_timesteps", 1000))
    if counterpart != FLOW_SCHEDULER:
        if sigmas is None and timesteps is None and counterpart == "UniPCMultistepScheduler" \
                and cfg.get("use_karras_sigmas"):
            train = np.flip(_vp_table(cfg, n))
            s = _family(cfg, train, steps)
            s = s / (s + 1)  # UniPC's Karras σ (of the β table) read as flow σ
        elif sigmas is None and timesteps is None and counterpart == "UniPCMultistepScheduler":
            s = _shift(cfg, np.linspace(1, 1 / n, steps + 1)[:-1], mu, counterpart)
            s[0] -= 1e-6 if abs(s[0] - 1) < 1e-6 else 0.0  # UniPC keeps log α finite at its first step
        elif sigmas is None and timesteps is None:
            base = 1.0 - np.linspace(1, 1 / n, steps + 1)
            s = np.flip(_shift(cfg, base, mu, counterpart))[:-1].copy()
        else:
            s = np.asarray(sigmas if sigmas is not None else np.asarray(timesteps, np.float64) / n, np.float64)
        # The multistep schedulers keep int64 timesteps: σ·N truncated.
        return s, (np.trunc(s * n) if counterpart in MULTISTEP else s * n)
    if sigmas is None:
        if timesteps is None:
            dynamic = bool(cfg.get("use_dynamic_shifting"))
            top = 1.0 if dynamic else float(_shift(cfg, np.array([1.0]), mu, counterpart)[0])
            bottom = 1 / n if dynamic else float(_shift(cfg, np.array([1 / n]), mu, counterpart)[0])
            sigmas = np.linspace(top * n, bottom * n, steps) / n
        else:
            sigmas = np.asarray(timesteps, dtype=np.float64) / n
    s = _shift(cfg, np.asarray(sigmas, dtype=np.float64), mu, counterpart)
    if any(cfg.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
        s = _family(cfg, s, len(s))
    return s, (np.asarray(timesteps, dtype=np.float64) if timesteps is not None else s * n)


def _check_count(steps, timesteps, sigmas, n_train: int, counterpart: str) -> Optional[int]:
    if timesteps is not None and sigmas is not None:
        raise ValueError("give set_timesteps timesteps= or sigmas=, not both")
    given = timesteps if timesteps is not None else sigmas
    if given is not None:
        if steps is not None and (counterpart != FLOW_SCHEDULER or len(given) != steps):
            raise ValueError(f"give num_inference_steps or custom {'timesteps' if timesteps is not None else 'sigmas'}"
                             f", not both (diffusers' {counterpart} refuses both too)")
        values = [float(v) for v in given]
        if any(not b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"custom timesteps/sigmas must be in strictly descending order (noise → data), got "
                             f"{values}")
        if timesteps is not None and counterpart != FLOW_SCHEDULER and values[0] >= n_train:
            raise ValueError(f"custom timesteps must start below num_train_timesteps={n_train}, got {values[0]:g}")
        return None
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {steps!r}")
    if counterpart in ("DDIMScheduler", "DDPMScheduler") and steps > n_train:
        raise ValueError(f"num_inference_steps={steps} is more than num_train_timesteps={n_train} (diffusers' "
                         f"{counterpart} refuses it too)")
    return int(steps)


def inference_grid(cfg: dict, schedule, steps: Optional[int], *, counterpart: str, mu: Optional[float] = None,
                   timesteps=None, sigmas=None) -> InferenceGrid:
    """The grid of diffusers' ``set_timesteps(steps)`` (or of custom ``timesteps``/``sigmas``, descending, as
    diffusers takes them: a custom σ list may end with its final 0, and for Euler and Heun its last value is where
    the run ends) for ``counterpart`` configured by ``cfg``.

    Duplicated timesteps (more steps than the table resolves) are dropped, so every step has a length.

    Raises:
        ValueError: a bad step count, custom values that are not strictly decreasing or outside the schedule.
    """
    n_train = int(cfg.get("num_train_timesteps", 1000))
    steps = _check_count(steps, timesteps, sigmas, n_train, counterpart)
    as_list = (lambda v: None if v is None else [float(x) for x in (v.tolist() if hasattr(v, "tolist") else v)])
    timesteps, sigmas = as_list(timesteps), as_list(sigmas)
    # diffusers' σ-schedulers (Euler, Heun) read a custom σ list's last value as where the run ends; the others
    # (and a list ending at 0) end where final_sigmas_type says.
    custom_final = None
    if sigmas is not None and len(sigmas) > 1 and (sigmas[-1] == 0 or counterpart in SIGMA_SCHEDULERS):
        sigmas, custom_final = sigmas[:-1], sigmas[-1]
    if isinstance(schedule, RectifiedFlow):
        sig, ts = _flow_grid(cfg, steps, counterpart, mu, timesteps, sigmas)
        grid, final_t, final_sigma = [float(v) for v in sig], 0.0, 0.0
    else:
        if sigmas is not None:
            sig = np.asarray(sigmas, dtype=np.float64)
            ts = _sigma_to_t(sig, np.log(_train_sigmas(schedule)))
        else:
            sig, ts = _vp_grid(cfg, schedule, steps, counterpart, timesteps)
        top = float(_train_sigmas(schedule)[-1])
        if float(np.max(sig)) > top * (1 + 1e-6):
            raise ValueError(f"σ = {float(np.max(sig)):.6g} (sigma_max or a custom σ) is above the schedule's largest, "
                             f"{top:.6g}: diffusers would evaluate the network at its last timestep there, which the "
                             "network was not trained for; lower sigma_max")
        grid = _solver_times(schedule, sig, ts)
        final_t, final_sigma = _final(cfg, schedule, counterpart)
        if custom_final is not None:
            final_sigma = custom_final
            final_t = _solver_time_of_sigma(schedule, custom_final)
        if cfg.get("timestep_type") == "continuous" and cfg.get("prediction_type") == "v_prediction":
            ts = 0.25 * np.log(np.asarray(sig))  # diffusers' continuous timesteps (v-prediction only, as there)
    keep = _first_occurrences(grid)
    grid, ts, sig = [grid[i] for i in keep], [float(ts[i]) for i in keep], [float(sig[i]) for i in keep]
    if final_t < grid[-1]:
        grid, sig = grid + [final_t], sig + [final_sigma]
    else:
        sig = sig[:len(grid)]
    grid = validate_grid(schedule, grid)
    return InferenceGrid(grid, ts[:len(grid) - 1], sig)


def _solver_time_of_sigma(schedule, sigma: float) -> float:
    """The solver time of diffusers' σ on a discrete schedule (σ = 0: ``t_zero``)."""
    if sigma == 0:
        return float(schedule.t_zero)
    ts = _sigma_to_t(np.array([sigma]), np.log(_train_sigmas(schedule)))
    return _solver_times(schedule, [sigma], ts)[0]


def _first_occurrences(values: list) -> list:
    """Indices of the values that are strictly below every earlier one (drops repeats of a level)."""
    keep, low = [], math.inf
    for i, v in enumerate(values):
        if v < low:
            keep.append(i)
            low = v
    return keep


def _final(cfg: dict, schedule, counterpart: str) -> tuple[float, float]:
    """(solver time, σ) of the final point: ᾱ_0 (t = 0) for ``final_sigmas_type="sigma_min"``, for DEIS and for
    DDIM with ``set_alpha_to_one=False``, else σ = 0 (ᾱ = 1, t_zero)."""
    if counterpart == "DDIMScheduler":
        at_zero = not cfg.get("set_alpha_to_one", True)
    elif counterpart in ("DDPMScheduler", "HeunDiscreteScheduler"):
        at_zero = False
    elif counterpart == "DEISMultistepScheduler":
        at_zero = True  # DEIS always ends at σ(ᾱ_0)
    else:
        at_zero = cfg.get("final_sigmas_type", "zero") == "sigma_min"
    if at_zero:
        return 0.0, float(_train_sigmas(schedule)[0])
    return float(schedule.t_zero), 0.0


def _solver_times(schedule, sigmas: np.ndarray, timesteps: np.ndarray) -> list:
    """Our solver time for each σ (σ/α of the discrete schedule): the diffusers timestep itself where it is an
    index whose σ is the table's, else the time where this schedule's σ/α is σ."""
    train = _train_sigmas(schedule)
    out = []
    for s, t in zip(np.asarray(sigmas, dtype=np.float64), np.asarray(timesteps, dtype=np.float64)):
        k = int(round(t))
        if abs(t - k) < 1e-9 and 0 <= k < len(train) and abs(train[k] - s) <= 1e-9 * train[k]:
            out.append(float(k))
        else:
            lam = torch.tensor(-math.log(float(s)), dtype=torch.float64)
            t_s = float(schedule.t_from_log_snr(lam))
            out.append(0.0 if -1e-6 < t_s < 0 else t_s)  # σ of ᾱ_0 given in float32 (a custom list)
    return out

"""k-diffusion's conventions: a denoiser D(x, σ) in VE/EDM form, and its sampler signature for every solver.

    from solvers.interop.k_diffusion import sample_dpmpp_3m, sample_heun
    x = sample_dpmpp_3m(model, x, sigmas, extra_args={"cond": c}, callback=cb, disable=True)

``sample_NAME(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)`` exists for every
registered fixed-grid solver NAME: ``model(x, sigma, **extra_args)`` is a denoiser, ``x`` the starting state
at ``sigmas[0]`` (noise × σ_max), ``sigmas`` the descending noise levels (ending at 0 to land on the data).
The callback receives k-diffusion's dict (``x``, ``i``, ``sigma``, ``sigma_hat``, ``denoised``: the state and
σ at which step i first called the model, and its output) — once per step, after the step.  k-diffusion is
not imported.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import torch

from ..loop import sample
from ..model import DiffusionModel
from ..registry import SOLVERS, available_solvers, get_solver, solver_class
from ..schedules import EDM

__all__ = ["from_k_diffusion", "k_diffusion_sampler", "load_peer", "PEER_INSTALL"]

PEER_INSTALL = "pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq trampoline"
PEER_PACKAGE = "_k_diffusion_peer"

def load_peer(*names: str):
    """k-diffusion's own modules (default ``sampling``), for comparisons: loaded by path under a stub package,
    so its package ``__init__`` — which imports wandb, clean-fid, CLIP, … — is not run.  ``sampling`` and
    ``external`` need only torch, scipy, torchsde, torchdiffeq and tqdm.

    Returns:
        the module, or a tuple of them for several names (e.g. ``load_peer("sampling", "external")``).

    Raises:
        ImportError: k-diffusion (or a dependency of the module) is not installed; the message says how to get it.
    """
    import importlib.util
    import sys
    import types
    from pathlib import Path

    names = names or ("sampling",)
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"k-diffusion is not installed: {PEER_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    package = sys.modules.setdefault(PEER_PACKAGE, types.ModuleType(PEER_PACKAGE))
    package.__path__ = [str(folder)]
    for name in ("utils", *names):
        full = f"{PEER_PACKAGE}.{name}"
        if full not in sys.modules:
            sub = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
            module = importlib.util.module_from_spec(sub)
            sys.modules[full] = module
            try:
                sub.loader.exec_module(module)
            except ImportError as e:
                del sys.modules[full]
                raise ImportError(f"k-diffusion's {name} module cannot be loaded ({e}): {PEER_INSTALL}") from e
            setattr(package, name, module)
    mods = tuple(sys.modules[f"{PEER_PACKAGE}.{n}"] for n in names)
    return mods[0] if len(mods) == 1 else mods


# k-diffusion options our solvers may lack, with the value at which they ask for nothing.
_NEUTRAL_OPTIONS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0, "noise_sampler": None}


def from_k_diffusion(denoiser: Callable[..., torch.Tensor], sigma_min: float, sigma_max: float, *,
                     extra_args: Optional[dict] = None) -> DiffusionModel:
    """A k-diffusion denoiser ``D(x, σ, **extra_args) ≈ E[x0 | x]`` (x = x0 + σ·ε) as a DiffusionModel.

    Args:
        denoiser: called with the state and a (batch,) tensor of noise levels σ.
        sigma_min, sigma_max: the range of σ the denoiser was trained on (the EDM schedule's range:
            :func:`solvers.sample` grids span it, and ``solvers.initial_noise(..., schedule=model.schedule)``
            scales the noise by ``sigma_max``).
        extra_args: keyword arguments passed to every call (e.g. conditioning).

    Raises:
        TypeError: a denoiser that is not callable, or ``extra_args`` that is not a dict.
        ValueError: not 0 < sigma_min < sigma_max.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as denoiser(x, sigma), got {type(denoiser).__name__}")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"extra_args must be a dict of keyword arguments, got {type(extra_args).__name__}")
    extra = dict(extra_args or {})
    return DiffusionModel(lambda x, sigma: denoiser(x, sigma, **extra), schedule=EDM(sigma_min, sigma_max),
                          prediction="x0")


def _levels(sigmas) -> list[float]:
    """``sigmas`` as floats, checked: at least two, finite, strictly decreasing, first > 0, last >= 0."""
    try:
        levels = [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    except (TypeError, ValueError):
        raise ValueError("sigmas must be a 1-D sequence of noise levels") from None
    if len(levels) < 2 or not all(math.isfinite(s) for s in levels) or levels[-1] < 0 \
            or any(b >= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"sigmas must be at least two finite, strictly decreasing noise levels ending at >= 0 "
                         f"(e.g. k-diffusion's get_sigmas_karras(n, sigma_min, sigma_max)), got {levels}")
    return levels


def _split_options(name: str, options: dict) -> tuple[dict, Any]:
    """(the solver's options, seeds): k-diffusion options the solver lacks pass at their neutral values."""
    fields = {f.name for f in dataclasses.fields(solver_class(name))}
    seeds = options.pop("seeds", None)
    for key in [k for k in options if k in _NEUTRAL_OPTIONS and k not in fields]:
        value = options.pop(key)
        if key == "noise_sampler" and value is not None:
            raise ValueError(f"sample_{name}: noise_sampler is not supported — the stochastic solvers draw each "
                             "sample's noise from its own seed; pass seeds=[...] (one per sample) instead")
        if value != _NEUTRAL_OPTIONS[key]:
            raise ValueError(f"sample_{name}: {key}={value!r} asks for something {name} does not do "
                             f"(it has no {key}); leave it at {_NEUTRAL_OPTIONS[key]!r} or use a solver with it")
    return options, seeds


def _sample(name: str, model, x: torch.Tensor, sigmas, extra_args, callback, disable, options: dict):
    levels = _levels(sigmas)
    options, seeds = _split_options(name, dict(options))
    slv = get_solver(name, **options)
    if seeds is None and slv.is_stochastic:
        # k-diffusion code seeds torch's global generator: the per-sample seeds are drawn from it.
        seeds = torch.randint(0, 2 ** 62, (x.shape[0],)).tolist()
    positive = [s for s in levels if s > 0]
    # σ_max above σ_0 by EDM's largest churn factor √2, so that Heun's churn is never capped (k-diffusion's
    # is not); σ_min the smallest level evaluated.
    extra = dict(extra_args or {})
    first: list = []

    def denoiser(xx, sigma):
        out = model(xx, sigma, **extra)
        if callback is not None and not first:
            first.append((xx, sigma, out))
        return out

    wrapped = DiffusionModel(denoiser, schedule=EDM(min(positive), levels[0] * math.sqrt(2.0)), prediction="x0")

    def on_step(info):
        xx, sigma, out = first.pop()
        given = sigmas[info.step] if torch.is_tensor(sigmas) else torch.tensor(levels[info.step])
        callback({"x": xx, "i": info.step, "sigma": given, "sigma_hat": sigma.reshape(-1)[0].to(given.dtype),
                  "denoised": out})

    res = sample(wrapped, x, name, timesteps=levels, seeds=seeds, callback=on_step if callback else None,
                 progress=not disable, **options)
    return res.samples


def k_diffusion_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The solver ``name`` with k-diffusion's sampler signature (see the module docstring).

    Extra keyword options are the solver's own (e.g. ``official_d2=True`` for dpmpp_3m), plus ``seeds`` (one
    per sample, for the stochastic solvers; default: drawn from torch's global generator, which k-diffusion
    code seeds).  k-diffusion's ``s_churn``/``s_tmin``/``s_tmax``/``s_noise``/``noise_sampler`` are accepted
    at their neutral values by solvers that lack them.

    Raises:
        ValueError: an unknown or adaptive solver.
    """
    cls = solver_class(name)
    if cls.adaptive:
        raise ValueError(f"{name!r} chooses its own steps; a k-diffusion sampler walks the given sigmas")

    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return _sample(cls.name, model, x, sigmas, extra_args, callback, disable, options)

    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__doc__ = (f"{cls.__doc__.splitlines()[0]}\n\nk-diffusion's signature: sample_{name}(model, x, "
                       "sigmas, extra_args=None, callback=None, disable=None, **options); see "
                       "solvers.interop.k_diffusion.")
    return sampler


def __getattr__(attr: str):
    """``sample_NAME`` for any registered fixed-grid solver or alias, including ones registered later."""
    name = attr[len("sample_"):]
    if attr.startswith("sample_") and name in available_solvers():
        if solver_class(name).adaptive:
            raise AttributeError(f"no {attr}: {name!r} chooses its own steps, while a k-diffusion sampler walks "
                                 "the given sigmas")
        return k_diffusion_sampler(name)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


for _name, _cls in sorted(SOLVERS.items()):
    if not _cls.adaptive:
        globals()[f"sample_{_name}"] = k_diffusion_sampler(_name)
        __all__.append(f"sample_{_name}")

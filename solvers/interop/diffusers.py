"""diffusers networks and scheduler configurations as :class:`~solvers.DiffusionModel` objects.

A diffusers scheduler's configuration says how its network was trained: the β schedule
(``beta_schedule``/``beta_start``/``beta_end`` or ``trained_betas``, over ``num_train_timesteps``), what the
network predicts (``prediction_type``) and how its x0 is kept in range (``clip_sample``/``clip_sample_range``,
or Imagen's ``thresholding``).  :func:`schedule_from_config` and :func:`model_from_config` read exactly
that; :func:`from_diffusers` adds the network (a ``UNet2DModel``/``UNet2DConditionModel`` or a pipeline) and
its conditioning.  diffusers itself is imported only when a pipeline has to be told apart from a network.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch

from ..model import DiffusionModel, classifier_free_guidance
from ..schedules import DiscreteVP, RectifiedFlow, betas_for_alpha_bar

__all__ = ["schedule_from_config", "prediction_from_config", "model_from_config", "from_diffusers",
           "config_dict"]

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")


def config_dict(config: Any) -> dict:
    """A scheduler, or its ``config`` (a diffusers ``FrozenDict`` or any mapping), as a plain dict.

    A :class:`~solvers.interop.SolverScheduler` gives its effective config: the keys its config left unset
    filled in with the defaults of its method's diffusers counterpart."""
    if hasattr(config, "effective_config") and not isinstance(config, Mapping):
        return dict(config.effective_config)
    if hasattr(config, "config") and not isinstance(config, Mapping):
        config = config.config
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a diffusers scheduler or its config (a mapping), got {type(config).__name__}")
    return dict(config)


def is_flow_config(cfg: dict) -> bool:
    """A rectified-flow config: ``prediction_type="flow_prediction"``, ``use_flow_sigmas``, or a
    FlowMatchEuler-style config (a ``shift`` and no β schedule)."""
    return cfg.get("prediction_type") == "flow_prediction" or bool(cfg.get("use_flow_sigmas")) \
        or ("shift" in cfg and "beta_schedule" not in cfg and "trained_betas" not in cfg)


def schedule_from_config(config: Any):
    """The :class:`~solvers.schedules.DiscreteVP` of a diffusers scheduler configuration, in float64, or for a
    flow-matching config (:func:`is_flow_config`) the :class:`~solvers.schedules.RectifiedFlow` whose network
    time is σ·``num_train_timesteps``.

    Reads ``num_train_timesteps`` and ``trained_betas`` or ``beta_schedule`` (``linear``, ``scaled_linear``,
    ``squaredcos_cap_v2``) with ``beta_start``/``beta_end``.  The network's time input is the step index
    (diffusers' convention).

    Raises:
        ValueError: a β schedule this library has no equivalent for, or β outside (0, 1).  With
            ``rescale_betas_zero_snr=True`` the last ᾱ is 2⁻²⁴, as in diffusers' σ and multistep schedulers.
    """
    cfg = config_dict(config)
    n = int(cfg.get("num_train_timesteps", 1000))
    if is_flow_config(cfg):
        return RectifiedFlow(time_scale=float(n))
    if n < 2:
        raise ValueError(f"num_train_timesteps={n}: a discrete schedule needs at least 2 trained steps here "
                         "(diffusers accepts 1: a single step from pure noise to data)")
    betas = betas_from_config(cfg, n)
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f"the β schedule ({cfg.get('beta_schedule', 'linear')}, beta_start="
                         f"{cfg.get('beta_start')}, beta_end={cfg.get('beta_end')}) has β outside (0, 1), so ᾱ is not "
                         "a decreasing fraction (diffusers accepts it and its samples are not defined); "
                         "use β in (0, 1)")
    abar = torch.cumprod(1.0 - betas, 0)
    if cfg.get("rescale_betas_zero_snr"):
        abar = _zero_terminal_snr(abar)
    return DiscreteVP(alphas_cumprod=abar)


def betas_from_config(cfg: dict, n: int) -> torch.Tensor:
    """β of the config in float64: ``trained_betas``, or ``beta_schedule`` over ``num_train_timesteps``."""
    if cfg.get("trained_betas") is not None:
        return torch.as_tensor(cfg["trained_betas"], dtype=torch.float64).flatten()
    kind = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        return betas_for_alpha_bar(n, lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2)
    if kind == "exp":
        return betas_for_alpha_bar(n, lambda u: torch.exp(-12.0 * u))
    raise ValueError(f"beta_schedule {kind!r} is not supported; valid: {', '.join(BETA_SCHEDULES)} "
                     "(or give trained_betas)")


def _zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024)'s rescaling to ᾱ_T = 0 (diffusers' ``rescale_zero_terminal_snr``), with ᾱ_T then raised to
    a tiny positive value so σ/α is finite at the first step: diffusers' σ and multistep schedulers use 2⁻²⁴, but
    that can exceed ᾱ_{T−1} (it does for the linear schedule: their table is then not decreasing), so here it
    is min(2⁻²⁴, ᾱ_{T−1}/2).  DDIM and DDPM keep 0 in diffusers; no parity is claimed for these configs."""
    root = abar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    out = root ** 2
    out[-1] = min(2.0 ** -24, float(out[-2]) / 2)
    return out


def prediction_from_config(config: Any) -> str:
    """Our prediction name for the config's ``prediction_type`` (epsilon → eps, v_prediction → v, sample → x0)."""
    cfg = config_dict(config)
    kind = cfg.get("prediction_type", "flow_prediction" if is_flow_config(cfg) else "epsilon")
    try:
        return PREDICTION_TYPES[kind]
    except KeyError:
        raise ValueError(f"prediction_type {kind!r} is not supported; valid: {', '.join(PREDICTION_TYPES)}") from None


class DiffusersThresholdModel(DiffusionModel):
    """A :class:`~solvers.DiffusionModel` whose x0 is thresholded as diffusers' ``_threshold_sample`` does.

    Per sample, s = clamp(quantile(|x0|, ratio), 1, ``sample_max_value``) and x0 ← clamp(x0, −s, s)/s
    (Saharia et al. 2022), which differs from :attr:`DiffusionModel.dynamic_threshold` by the upper cap on s.
    The edge values diffusers accepts mean what they mean there: ``ratio=0`` takes the smallest |x0|, and a
    ``sample_max_value`` below 1 wins over the lower bound (``torch.clamp`` with min > max gives max), so every
    x0 is clamped to ±sample_max_value and divided by it.
    """

    def __init__(self, fn, *, ratio: float, sample_max_value: float, **kwargs):
        super().__init__(fn, **kwargs)
        if not 0 <= ratio <= 1:
            raise ValueError(f"dynamic_thresholding_ratio must be in [0, 1] (a quantile of |x0|), got {ratio}")
        if not (sample_max_value > 0 and math.isfinite(sample_max_value)):
            raise ValueError(f"sample_max_value must be a positive finite number (x0 is divided by a threshold "
                             f"capped at it), got {sample_max_value}")
        self.ratio, self.sample_max_value = float(ratio), float(sample_max_value)

    def threshold(self, x0: torch.Tensor) -> torch.Tensor:
        """diffusers' dynamic thresholding of a predicted x0 (quantile in float32 at least)."""
        flat = x0.reshape(x0.shape[0], -1)
        flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(flat.abs(), self.ratio, dim=1).clamp(min=1.0, max=self.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def model_from_config(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], config: Any, *,
                      input_dtype: Optional[torch.dtype] = None,
                      rows_per_sample: Optional[int] = None) -> DiffusionModel:
    """A network ``fn(x, t)`` (t: the step index, as diffusers networks take it) with the schedule,
    parameterisation and x0 range of a diffusers scheduler configuration.

    ``clip_sample`` (with ``clip_sample_range``, default 1) clamps x0; ``thresholding`` (with
    ``dynamic_thresholding_ratio`` and ``sample_max_value``) takes precedence over it, as in diffusers.
    """
    cfg = config_dict(config)
    common = dict(schedule=schedule_from_config(cfg), prediction=prediction_from_config(cfg),
                  input_dtype=input_dtype, rows_per_sample=rows_per_sample)
    if cfg.get("thresholding"):
        return DiffusersThresholdModel(fn, ratio=float(cfg.get("dynamic_thresholding_ratio", 0.995)),
                                       sample_max_value=float(cfg.get("sample_max_value", 1.0)), **common)
    clip = None
    if cfg.get("clip_sample"):
        r = float(cfg.get("clip_sample_range", 1.0))
        clip = (-r, r)
    return DiffusionModel(fn, clip_x0=clip, **common)


def _network_and_scheduler(unet_or_pipeline, scheduler):
    """(network, scheduler config) of a pipeline or a bare network plus ``scheduler``."""
    net = unet_or_pipeline
    if hasattr(unet_or_pipeline, "unet") and hasattr(unet_or_pipeline, "scheduler"):
        net = unet_or_pipeline.unet
        scheduler = unet_or_pipeline.scheduler if scheduler is None else scheduler
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"from_diffusers needs a diffusers network (a torch.nn.Module such as UNet2DModel) or a "
                        f"pipeline with .unet and .scheduler, got {type(unet_or_pipeline).__name__}")
    if scheduler is None:
        raise ValueError("a bare network does not carry its noise schedule: pass scheduler= (a diffusers "
                         "scheduler or its config), or pass the pipeline")
    return net, config_dict(scheduler)


def _check_guidance(guidance_scale, positives: dict, negatives: dict) -> None:
    """Guidance needs a finite scale and each conditioning input with its unconditional counterpart, alike."""
    has_negative = any(v is not None for v in negatives.values())
    if guidance_scale is None:
        if has_negative:
            raise ValueError("negative_* conditioning is only used with classifier-free guidance: give guidance_scale")
        return
    if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) \
            or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    missing = [k for k in positives if (positives[k] is None) != (negatives[k] is None)]
    if missing or not has_negative:
        raise ValueError(f"classifier-free guidance needs each conditioning input with its unconditional "
                         f"counterpart (negative_{missing[0] if missing else 'encoder_hidden_states'} is "
                         f"missing or extra)")
    for k in positives:
        _check_rows(f"negative_{k}", negatives[k], k, positives[k])


def _check_rows(name: str, value, other_name: str, other) -> None:
    if value is not None and other is not None and torch.is_tensor(value) and torch.is_tensor(other) \
            and value.shape != other.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but {other_name} has {tuple(other.shape)}; "
                         "the unconditional inputs must match the conditional ones")


def from_diffusers(unet_or_pipeline, scheduler=None, *, encoder_hidden_states: Optional[torch.Tensor] = None,
                   class_labels: Optional[torch.Tensor] = None, guidance_scale: Optional[float] = None,
                   negative_encoder_hidden_states: Optional[torch.Tensor] = None,
                   negative_class_labels: Optional[torch.Tensor] = None,
                   input_dtype: Optional[torch.dtype] = None) -> DiffusionModel:
    """A diffusers network (or a pipeline's) as a :class:`~solvers.DiffusionModel`.

    Args:
        unet_or_pipeline: a ``UNet2DModel``/``UNet2DConditionModel`` (any module called as
            ``net(x, t, **conditioning).sample``), or a pipeline with ``.unet`` and ``.scheduler``.
        scheduler: a diffusers scheduler or its config (default: the pipeline's); its schedule, prediction
            type and x0 clipping/thresholding are read by :func:`model_from_config`.
        encoder_hidden_states, class_labels: the conditioning, one row per sample (e.g. a Stable Diffusion
            pipeline's ``prompt_embeds``).
        guidance_scale: classifier-free guidance w (``None``: no guidance).  Needs the unconditional inputs:
            ``negative_encoder_hidden_states`` (e.g. the embeddings of the empty prompt) and/or
            ``negative_class_labels``; one batched call evaluates both branches
            (:func:`solvers.classifier_free_guidance`; the result is out_u + w·(out_c − out_u), as in the
            diffusers pipelines).
        input_dtype: dtype the network is called in (default: the network's own ``dtype`` if it has one).

    Raises:
        TypeError: not a network or pipeline.
        ValueError: no scheduler for a bare network; guidance without unconditional inputs, or the
            reverse; mismatched conditional/unconditional shapes; an unsupported config (see
            :func:`schedule_from_config`).
    """
    net, cfg = _network_and_scheduler(unet_or_pipeline, scheduler)
    negatives = {"encoder_hidden_states": negative_encoder_hidden_states, "class_labels": negative_class_labels}
    positives = {"encoder_hidden_states": encoder_hidden_states, "class_labels": class_labels}
    _check_guidance(guidance_scale, positives, negatives)
    if input_dtype is None:
        input_dtype = getattr(net, "dtype", None) if isinstance(getattr(net, "dtype", None), torch.dtype) else None
    keys = [k for k, v in positives.items() if v is not None]

    def call(x, t, branch=None):
        kwargs = {k: positives[k] for k in keys}
        if branch is not None:  # [x; x] against [conditional; unconditional]
            kwargs = {k: torch.cat([positives[k], negatives[k]]) for k in keys}
        out = net(x, t, **kwargs, return_dict=False)[0]
        return out

    if guidance_scale is None:
        return model_from_config(lambda x, t: call(x, t), cfg, input_dtype=input_dtype)
    n = next(positives[k].shape[0] for k in keys)
    flags = torch.zeros(n)
    fn = classifier_free_guidance(lambda x, t, branch: call(x, t, branch), flags, flags + 1, float(guidance_scale))
    return model_from_config(fn, cfg, input_dtype=input_dtype)

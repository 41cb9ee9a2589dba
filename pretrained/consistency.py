"""Consistency models: the EDM boundary parameterisation, and the ``cd_imagenet64_l2`` card.

A consistency model is f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)) with (Song et al. 2023,
Appendix C; openai/consistency_models ``karras_diffusion.py``; diffusers ``CMStochasticIterativeScheduler``)

    c_skip = σ_d² / ((σ − σ_min)² + σ_d²),   c_out = (σ − σ_min)·σ_d / √(σ² + σ_d²),   c_in = 1/√(σ² + σ_d²),

so that f(x, σ_min) = x exactly.  It is seen by the solvers as an x0-predicting :class:`solvers.DiffusionModel`
on the EDM schedule (solver time = σ) and sampled with ``solver="consistency"``, ``sigma_boundary=σ_min``.

``cd_imagenet64_l2`` is ``openai/diffusers-cd_imagenet64_l2``: consistency distillation (LPIPS-free L2 metric)
of the EDM ImageNet 64×64 class-conditional model, in diffusers format (``UNet2DModel``; σ_d = 0.5,
σ_min = 0.002, σ_max = 80, network time 250·log σ, denoised output clipped to [−1, 1]).  It needs the optional
``diffusers`` package.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

import solvers
from solvers.schedules import EDM

from .cards import ModelCard, register_card
from .checkpoints import CheckpointError, HubSource, load_into, read_state_dict, resolve_hub_weights

__all__ = ["BoundaryScalings", "ConsistencyFunction", "CD_IMAGENET64_CONFIG", "CD_TEST_CONFIG", "CD_SOURCE",
           "load_cd_imagenet64", "ClassConditionalUNet", "cm_time"]


class BoundaryScalings:
    """The EDM boundary-condition scalings of consistency models.

    Args:
        sigma_data: σ_d, the data standard deviation the network was designed for.
        sigma_min: σ_min (the paper's ε): f(x, σ_min) = x.
    """

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002):
        if not (sigma_data > 0 and sigma_min > 0):
            raise ValueError(f"sigma_data and sigma_min must be positive, got {sigma_data}, {sigma_min}")
        self.sigma_data, self.sigma_min = float(sigma_data), float(sigma_min)

    def __call__(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) at σ (a tensor)."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / torch.sqrt(sigma ** 2 + sd2)
        c_in = 1.0 / torch.sqrt(sigma ** 2 + sd2)
        return c_skip, c_out, c_in


class ConsistencyFunction(torch.nn.Module):
    """f(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise(σ)) around a raw network F.

    Args:
        network: ``network(x_in, c_noise) -> tensor`` (with extra keyword arguments from ``network_kwargs``).
        scalings: the :class:`BoundaryScalings`.
        c_noise: map from σ (B,) to the network's time input.
        clip: optional (low, high) clamp of the output (the diffusers/openai samplers clip to [−1, 1]).
    """

    def __init__(self, network: torch.nn.Module, scalings: BoundaryScalings,
                 c_noise: Callable[[torch.Tensor], torch.Tensor], clip: Optional[tuple] = None):
        super().__init__()
        self.network = network
        self.scalings = scalings
        self.c_noise = c_noise
        self.clip = clip

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **network_kwargs) -> torch.Tensor:
        """The consistency function at noise level σ (B,) (the EDM solver time)."""
        s64 = sigma.to(torch.float64)
        c_skip, c_out, c_in = (c.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) for c in self.scalings(s64))
        out = self.network(x * c_in, self.c_noise(s64).to(x.dtype), **network_kwargs)
        f = c_skip * x + c_out * out
        return f.clamp(*self.clip) if self.clip is not None else f


# -- cd_imagenet64_l2 ------------------------------------------------------------------------------------
# diffusers' scripts/convert_consistency_to_diffusers.py (current version): IMAGENET_64_UNET_CONFIG, from which
# the hub repository's unet/config.json was written, and CD_SCHEDULER_CONFIG (σ_min = 0.002, σ_max = 80;
# σ_d = 0.5 is CMStochasticIterativeScheduler's default).
CD_IMAGENET64_CONFIG = {
    "sample_size": 64, "in_channels": 3, "out_channels": 3, "layers_per_block": 3, "num_class_embeds": 1000,
    "block_out_channels": [192, 384, 576, 768], "attention_head_dim": 64,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 32, "upsample_type": "resnet",
    "downsample_type": "resnet",
}
# The same script's TEST_UNET_CONFIG: the same block types at toy size (random weights in offline tests).
CD_TEST_CONFIG = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2, "num_class_embeds": 1000,
    "block_out_channels": [32, 64], "attention_head_dim": 8,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 32, "upsample_type": "resnet",
    "downsample_type": "resnet",
}
CD_SIGMA_DATA, CD_SIGMA_MIN, CD_SIGMA_MAX = 0.5, 0.002, 80.0
CD_SOURCE = HubSource(
    repo_id="openai/diffusers-cd_imagenet64_l2",
    candidates=("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
    extra_files=("config.json",),
    env_var="CD_IMAGENET64_L2_WEIGHTS",
    description="the openai/diffusers-cd_imagenet64_l2 U-Net weights",
)


def cm_time(sigma: torch.Tensor) -> torch.Tensor:
    """The network time of the openai consistency models: 1000·¼·log(σ) (diffusers' ``sigma_to_t``)."""
    return 250.0 * torch.log(sigma + 1e-44)


class ClassConditionalUNet(torch.nn.Module):
    """A diffusers ``UNet2DModel`` with class labels fixed per call, as ``F(x, t)``.

    Labels: an int (every sample), a sequence/tensor with one label per batch row, or ``None`` — then row i
    gets a label from a generator seeded with ``label_seed`` (the same labels on every call of a sampling run
    of that batch size; pass labels explicitly to control them).
    """

    def __init__(self, unet: torch.nn.Module, class_labels=None, label_seed: int = 0):
        super().__init__()
        self.unet = unet
        self.class_labels = class_labels
        self.label_seed = int(label_seed)
        self.num_classes = int(unet.config.num_class_embeds)
        self._label_cache: dict = {}

    def labels(self, batch: int, device) -> torch.Tensor:
        """The class labels of a batch of ``batch`` rows (made and moved to ``device`` once per batch size and
        device: no host→device copy per network call, so the network can be captured in a CUDA graph)."""
        lab = self.class_labels
        lab_key = lab if lab is None or isinstance(lab, int) else tuple(torch.as_tensor(lab).reshape(-1).tolist())
        key = (batch, str(device), lab_key, self.label_seed)
        if key not in self._label_cache:
            self._label_cache[key] = self._make_labels(batch).to(device)
        return self._label_cache[key]

    def _make_labels(self, batch: int) -> torch.Tensor:
        lab = self.class_labels
        if lab is None:
            g = torch.Generator().manual_seed(self.label_seed)
            out = torch.randint(0, self.num_classes, (batch,), generator=g)
        elif isinstance(lab, int):
            out = torch.full((batch,), lab, dtype=torch.long)
        else:
            out = torch.as_tensor(lab, dtype=torch.long).reshape(-1)
            if out.numel() != batch:
                raise ValueError(f"class_labels has {out.numel()} entries for a batch of {batch}")
        if bool(((out < 0) | (out >= self.num_classes)).any()):
            raise ValueError(f"class labels must be in [0, {self.num_classes}), got {out.tolist()[:10]}")
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, class_labels=self.labels(x.shape[0], x.device), return_dict=False)[0]


def _config_mismatch(config: dict, expected: dict) -> list[str]:
    return [f"{k} = {config.get(k)!r} (expected {v!r})" for k, v in expected.items()
            if (list(config.get(k)) if isinstance(config.get(k), (list, tuple)) else config.get(k))
            != (list(v) if isinstance(v, (list, tuple)) else v)]


def load_cd_imagenet64(*, device: str = "cpu", weights: Optional[os.PathLike] = None,
                       dtype: Optional[torch.dtype] = None, download: Optional[bool] = None,
                       cache: Optional[os.PathLike] = None, class_labels: Union[None, int, Sequence[int]] = None,
                       label_seed: int = 0, strict_config: bool = True, **model_kwargs) -> solvers.DiffusionModel:
    """The ``cd_imagenet64_l2`` card's loader.

    Args:
        weights: the U-Net weight file or its folder (``config.json`` + ``diffusion_pytorch_model.*``, as
            written by ``save_pretrained``, or the hub snapshot); default ``$CD_IMAGENET64_L2_WEIGHTS``, the
            cache, a download with ``huggingface_hub``.
        class_labels, label_seed: the class conditioning (see :class:`ClassConditionalUNet`).
        strict_config: require the published architecture (:data:`CD_IMAGENET64_CONFIG`); ``False`` accepts
            any class-conditional ``UNet2DModel`` config next to the weights (for small test models).
        Others: as the other loaders; ``model_kwargs`` go to :class:`solvers.DiffusionModel`.

    Returns:
        An x0-predicting ``DiffusionModel`` (the consistency function) on ``EDM(0.002, 80)``; sample it with
        ``solver="consistency", sigma_boundary=0.002``.

    Raises:
        ImportError: diffusers is not installed.
        CheckpointError: config or weights do not match.
    """
    try:
        from diffusers import UNet2DModel  # noqa: F401  (checked before any file is looked for)
    except ImportError:
        raise ImportError("cd_imagenet64_l2 runs on diffusers' UNet2DModel: pip install 'diffusion-solvers[hub]'") \
            from None

    def build(path: Path) -> torch.nn.Module:
        return _build_unet(path, strict_config)

    path = resolve_hub_weights(CD_SOURCE, weights, cache=cache, download=download, check=build)
    unet = build(path).to(device=device).eval()
    if dtype is not None:
        unet = unet.to(dtype=dtype)
    net = ClassConditionalUNet(unet, class_labels, label_seed)
    fn = ConsistencyFunction(net, BoundaryScalings(CD_SIGMA_DATA, CD_SIGMA_MIN), cm_time, clip=(-1.0, 1.0))
    if unet.config.in_channels != unet.config.out_channels:
        raise CheckpointError(f"{path}: in_channels != out_channels; not a consistency model")
    return solvers.DiffusionModel(fn, schedule=EDM(CD_SIGMA_MIN, CD_SIGMA_MAX), prediction="x0",
                                  input_dtype=dtype, **model_kwargs)


def _unet_config(path: Path, strict_config: bool) -> dict:
    """The U-Net config for the weight file ``path``: its ``config.json`` (``_``-keys dropped), else the
    published architecture under ``strict_config``; with ``strict_config`` it must match
    :data:`CD_IMAGENET64_CONFIG`, and either way it must be class-conditional.

    Raises:
        CheckpointError: invalid JSON, no config where one is needed, a mismatch, no class embedding.
    """
    config_file = path.parent / "config.json"
    if config_file.exists():
        try:
            config = {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})") from e
    elif strict_config:
        config = dict(CD_IMAGENET64_CONFIG)
    else:
        raise CheckpointError(f"{path}: no config.json next to the weights (needed with strict_config=False)")
    if strict_config:
        bad = _config_mismatch(config, CD_IMAGENET64_CONFIG)
        if bad:
            raise CheckpointError(f"{config_file} is not the cd_imagenet64_l2 architecture: " + "; ".join(bad)
                                  + " (pass strict_config=False to load another class-conditional U-Net)")
    if not config.get("num_class_embeds"):
        raise CheckpointError(f"{config_file}: num_class_embeds is missing; cd_imagenet64_l2 is class-conditional")
    return config


def _build_unet(path: Path, strict_config: bool) -> torch.nn.Module:
    """diffusers' ``UNet2DModel`` from the config beside ``path`` (:func:`_unet_config`) with the weights of
    ``path`` loaded strictly (keys and shapes checked).

    Raises:
        CheckpointError: the config or the weights do not fit.
    """
    from diffusers import UNet2DModel
    config = _unet_config(path, strict_config)
    config_file = path.parent / "config.json"
    try:
        unet = UNet2DModel(**config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: diffusers cannot build a UNet2DModel from it ({e})") from e
    what = CD_SOURCE.description
    return load_into(unet, read_state_dict(path, what=what), path=path, what=what)


register_card(ModelCard(
    name="cd_imagenet64_l2", kind="image",
    description="OpenAI's consistency-distilled EDM model on ImageNet 64×64 (class-conditional, L2 metric): "
                "one-step and few-step generation with solver='consistency'.",
    loader=load_cd_imagenet64, sample_shape=(3, 64, 64), prediction="x0",
    schedule_name="EDM(σ_min = 0.002, σ_max = 80), solver time = σ; network time 250·log σ; boundary scalings "
                  "with σ_data = 0.5",
    data_range=(-1.0, 1.0), to_images=lambda x: ((x + 1.0) / 2.0).clamp(0.0, 1.0), reference="imagenet64",
    default_num_samples=50_000, default_batch_size=100,
    default_solver_options={"consistency": {"sigma_boundary": CD_SIGMA_MIN}},
    source_url="https://huggingface.co/openai/diffusers-cd_imagenet64_l2", sha256=None,
    licence="MIT (openai/consistency_models; the hub repository)",
    weights_note="Consistency distillation of the EDM ImageNet-64 model with the L2 metric (Song et al. 2023), "
                 "converted to diffusers by diffusers' scripts/convert_consistency_to_diffusers.py. No checksum "
                 "is published: files are checked by config, keys and shapes.",
    published={},  # the paper's one-step ImageNet-64 headline (6.20) is the LPIPS-distilled model, not this one
    notes="Class-conditional: load(..., class_labels=int | list) (default: labels drawn with label_seed per "
          "batch row). Needs diffusers. Only solver='consistency' is meaningful: the network is a consistency "
          "function, not a denoiser. No FID reference statistics for ImageNet 64 ship with this project.",
    extra={"weights_source": CD_SOURCE, "config": CD_IMAGENET64_CONFIG, "sigma_data": CD_SIGMA_DATA,
           "sigma_min": CD_SIGMA_MIN, "sigma_max": CD_SIGMA_MAX, "solvers": ("consistency",)},
))

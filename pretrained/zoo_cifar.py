"""Cards of Ho et al.'s CIFAR-10 DDPM: ``ddpm_cifar`` (EMA weights) and ``ddpm_cifar_hub`` (hub, non-EMA).

Both run on :class:`pretrained.ddpm_unet.DDPMUNet` (no diffusers needed) and both loaders read either weight
format — the original names of ``pesser/pytorch_diffusion`` or a diffusers ``UNet2DModel`` state dict — from a
torch file or a ``.safetensors`` file, detecting the format from the keys.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

import solvers
from solvers.schedules import DiscreteVP

from .cards import ModelCard, PublishedFID, published_table, register_card
from .checkpoints import CheckpointError, HubSource, WeightsSource, check_state_dict, read_state_dict, \
    resolve_hub_weights, resolve_weights
from .ddpm_unet import CIFAR10_CONFIG, DDPMUNet, config_from_diffusers, diffusers_to_ddpm

__all__ = ["EMA_SOURCE", "HUB_SOURCE", "load_ddpm_cifar", "load_ddpm_cifar_hub", "read_ddpm_state_dict"]

# pesser/pytorch_diffusion, pytorch_diffusion/ckpt_util.py: URL_MAP / CKPT_MAP / MD5_MAP["ema_cifar10"].
# No sha256 is published for this file; the md5 is the publisher's own.
EMA_SOURCE = WeightsSource(
    filename="ema_diffusion_cifar10_model-790000.ckpt",
    url="https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1",
    md5="1fa350b952534ae442b1d5235cce5cd3",
    env_var="DDPM_CIFAR_WEIGHTS",
    description="the ddpm_cifar EMA checkpoint (ema_diffusion_cifar10_model/model-790000.ckpt)",
    folder_names=("model-790000.ckpt", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
)
HUB_SOURCE = HubSource(
    repo_id="google/ddpm-cifar10-32",
    candidates=("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
    extra_files=("config.json",),
    env_var="DDPM_CIFAR_HUB_WEIGHTS",
    description="the google/ddpm-cifar10-32 U-Net weights",
)
_LEVELS = len(CIFAR10_CONFIG.ch_mult)


def _expected_shapes() -> dict[str, torch.Size]:
    # Built on the meta device: the names and shapes without allocating 143 MB.
    with torch.device("meta"):
        return {k: v.shape for k, v in DDPMUNet(CIFAR10_CONFIG).state_dict().items()}


def read_ddpm_state_dict(path: Union[str, os.PathLike], what: str) -> dict[str, torch.Tensor]:
    """Read a CIFAR-10 DDPM checkpoint in either format and return it in :class:`DDPMUNet` names.

    A diffusers file (keys ``down_blocks.*``) is renamed with :func:`diffusers_to_ddpm`; a ``config.json``
    next to it, when present, must describe the same architecture.

    Raises:
        CheckpointError: unreadable file, another architecture, missing keys, unexpected keys, wrong shapes.
    """
    path = Path(path)
    sd = read_state_dict(path, what=what)
    if any(k.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for k in sd):
        config_file = path.parent / "config.json"
        if config_file.exists():
            try:
                config = config_from_diffusers(json.loads(config_file.read_text()))
            except (ValueError, KeyError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{config_file}: not the config of Ho et al.'s CIFAR-10 U-Net ({e})") from e
            if config != CIFAR10_CONFIG:
                raise CheckpointError(f"{config_file} describes {config}, not the CIFAR-10 model {CIFAR10_CONFIG}")
        sd = diffusers_to_ddpm(sd, _LEVELS)
    check_state_dict(sd, _expected_shapes(), path=path, what=what)
    return sd


def _model(sd: dict[str, torch.Tensor], device, dtype, model_kwargs) -> solvers.DiffusionModel:
    with torch.device("meta"):  # no random initialisation of 35.7M parameters that are overwritten anyway
        net = DDPMUNet(CIFAR10_CONFIG)
    net.load_state_dict(sd, strict=True, assign=True)
    net = net.to(device=device, dtype=dtype or torch.float32).eval()
    return solvers.DiffusionModel(net, schedule=DiscreteVP.linear(1000), prediction="eps", input_dtype=dtype,
                                  **model_kwargs)


def load_ddpm_cifar(*, device: str = "cpu", weights: Optional[os.PathLike] = None,
                    dtype: Optional[torch.dtype] = None, download: Optional[bool] = None, verify: bool = True,
                    cache: Optional[os.PathLike] = None, **model_kwargs) -> solvers.DiffusionModel:
    """The ``ddpm_cifar`` card's loader (EMA weights of ``pesser/pytorch_diffusion``).

    Args:
        device, dtype: where and in which dtype the network runs.
        weights: a checkpoint path in either format (default: ``$DDPM_CIFAR_WEIGHTS``, the cache, a download).
        download, verify, cache: see :func:`pretrained.checkpoints.resolve_weights` (``verify`` checks the
            publisher's md5).
        **model_kwargs: passed to :class:`solvers.DiffusionModel` (e.g. ``clip_x0=(-1, 1)`` as in Ho et al.).

    Returns:
        A ``DiffusionModel`` (ε-prediction) on ``DiscreteVP.linear(1000)``; data in [−1, 1].
    """
    what = EMA_SOURCE.description
    path = resolve_weights(EMA_SOURCE, weights, cache=cache, download=download, verify=verify,
                           check=lambda p: read_ddpm_state_dict(p, what))
    return _model(read_ddpm_state_dict(path, what), device, dtype, model_kwargs)


def load_ddpm_cifar_hub(*, device: str = "cpu", weights: Optional[os.PathLike] = None,
                        dtype: Optional[torch.dtype] = None, download: Optional[bool] = None,
                        cache: Optional[os.PathLike] = None, **model_kwargs) -> solvers.DiffusionModel:
    """The ``ddpm_cifar_hub`` card's loader (``google/ddpm-cifar10-32``, diffusers format, non-EMA weights).

    Args:
        weights: a weight file or a folder holding one (a hub snapshot or a ``save_pretrained`` folder);
            default ``$DDPM_CIFAR_HUB_WEIGHTS``, the cache, a download with ``huggingface_hub``.
        Others: as :func:`load_ddpm_cifar` (no published checksum: files are checked by keys and shapes).
    """
    what = HUB_SOURCE.description
    path = resolve_hub_weights(HUB_SOURCE, weights, cache=cache, download=download,
                               check=lambda p: read_ddpm_state_dict(p, what))
    return _model(read_ddpm_state_dict(path, what), device, dtype, model_kwargs)


_COMMON = dict(
    kind="image", sample_shape=(3, 32, 32), prediction="eps",
    schedule_name="DiscreteVP.linear(1000): β from 1e-4 to 0.02, network time = step index 0…999",
    data_range=(-1.0, 1.0), to_images=lambda x: ((x + 1.0) / 2.0).clamp(0.0, 1.0), reference="cifar10-train",
    default_num_samples=50_000, default_batch_size=500,
    default_solver_options={"ddpm": {"variance": "large"}},
)
_DDIM_TABLE = "Song, Meng & Ermon 2021 (DDIM), Table 1 (same network, quadratic spacing, η = 0)"
_HO_TABLE = "Ho, Jain & Abbeel 2020, Table 1"
# The published FIDs of this network (EMA weights; 50,000 samples against CIFAR-10 train, Inception-v3).
EMA_FIDS = (
    PublishedFID("FID, 1000 ancestral steps (σ² = β), 50k samples vs CIFAR-10 train",
                 "DDPM ancestral, 1000 steps (σ² = β, EMA weights)", "ddpm", 1000, 3.17, _HO_TABLE),
    *(PublishedFID(f"FID, DDIM {s} steps", f"DDIM η = 0, quadratic, {s} steps", "ddim", s, v, _DDIM_TABLE,
                   deterministic=True)
      for s, v in ((10, 13.36), (20, 6.84), (50, 4.67), (100, 4.16), (1000, 4.04))),
)

register_card(ModelCard(
    name="ddpm_cifar",
    description="Ho et al.'s unconditional CIFAR-10 DDPM (35.7M parameters, ε-prediction), the paper-grade EMA "
                "weights used by the official DDIM and DPM-Solver code.",
    loader=load_ddpm_cifar,
    source_url=EMA_SOURCE.url, md5=EMA_SOURCE.md5,
    licence="not stated with the file; converted by pesser/pytorch_diffusion from the authors' TensorFlow "
            "checkpoints (github.com/hojonathanho/diffusion)",
    weights_note="EMA weights, step 790000 (ema_diffusion_cifar10_model/model-790000.ckpt of "
                 "pesser/pytorch_diffusion, original DDPM parameter names).",
    published={**published_table(EMA_FIDS[:1]),
               "Inception score, same samples": (9.46, _HO_TABLE), **published_table(EMA_FIDS[1:])},
    published_fids=EMA_FIDS,
    notes="Download: pesser/pytorch_diffusion's URL (md5-verified; no sha256 is published), or weights=PATH / "
          "$DDPM_CIFAR_WEIGHTS with the .ckpt (either weight format). Ho et al. clip x0 to [−1, 1] "
          "(pass clip_x0=(-1, 1)); published FIDs use 50k samples.",
    extra={"weights_source": EMA_SOURCE, "parameters": 35_746_307, "config": CIFAR10_CONFIG},
    **_COMMON))

register_card(ModelCard(
    name="ddpm_cifar_hub",
    description="The same CIFAR-10 DDPM architecture from the Hugging Face hub (google/ddpm-cifar10-32, diffusers "
                "format). These are reported to be the NON-EMA weights: expect a much worse FID than the paper's.",
    loader=load_ddpm_cifar_hub,
    source_url="https://huggingface.co/google/ddpm-cifar10-32", sha256=None,
    licence="Apache-2.0 (the hub repository's model card)",
    weights_note="NON-EMA weights (reported; see published). diffusers UNet2DModel state dict with the old "
                 "attention names query/key/value/proj_attn; no checksum is published, so files are checked by "
                 "keys and shapes only.",
    published={
        "FID, 1000 ancestral steps (reported for these non-EMA weights; unverified)":
            (12.4, "../shared/assets/ddpm_cifar10_32/README.md (project notes, unverified); a user reports FID "
                   "≈ 12 for the non-EMA weights in github.com/pesser/pytorch_diffusion/issues/3, pointing to "
                   "huggingface.co/google/ddpm-cifar10-32/discussions/10"),
        "FID of the paper's EMA weights, for contrast": (EMA_FIDS[0].fid, EMA_FIDS[0].source),
    },
    # the same network: runs with these weights are set beside the paper's (EMA) numbers
    published_fids=EMA_FIDS,
    notes="Download with huggingface_hub (pip install 'diffusion-solvers[hub]') into the cache, or weights=PATH "
          "(file or folder) / $DDPM_CIFAR_HUB_WEIGHTS. Prefer ddpm_cifar (EMA) for comparisons with papers.",
    extra={"weights_source": HUB_SOURCE, "parameters": 35_746_307, "config": CIFAR10_CONFIG},
    **_COMMON))

"""``ldm_mnist``: a latent diffusion model of MNIST, trained by this project: an autoencoder 1×28×28 ↔ 4×7×7
and a v-predicting denoiser in its latent space.

* The autoencoder (:class:`LatentAutoencoder`): a conv encoder 28 → 14 → 7 to 4 channels and the mirrored
  decoder, ending in tanh (pixels in [−1, 1]).  It is a VAE with a *fixed* posterior standard deviation:
  training decodes z + ``latent_noise``·ε and adds ``latent_penalty``·mean(z²) (the only part of the KL to
  N(0, I) that depends on z when the posterior variance is fixed).  Why: a plain autoencoder may put the
  digits on a thin, arbitrarily scaled set of codes, and the diffusion model's small errors in latent space
  would then decode to garbage; the noise makes every code's neighbourhood decode to nearly the same digit,
  and the penalty stops the encoder from inflating the codes until the noise no longer matters.  A learned
  variance (a full VAE) is not needed for that and costs a second output head.
* The latent scale factor (Stable Diffusion's 0.18215, here measured): 1 / std of the encoder's codes of
  the 8,000 training images, stored in the weight record, so the diffusion model sees latents of unit
  standard deviation.  The decoder divides by it again.
* The latent denoiser (:class:`LatentUNet`): a two-level U-Net on 4×7×7 (7 and 4 pixels) with a time
  embedding, v-prediction (v = α·ε − σ·z0, Salimans & Ho 2022) on :class:`VPCosine`.  Why v and not ε: an
  ε-model's data estimate z0 = (z_t − σ·ε̂)/α multiplies its error by σ/α (≈ 13 at t = 0.95), and this
  project's first, ε-trained latent model (same network and recipe) predicted z0 there with a mean squared
  error of 1.7 — worse than predicting the mean (0.98) — and sampled blobs, not digits (FD (MNIST classifier)
  243 for dpmpp_2m at 20 steps, n = 300).  With v, z0 = α·z_t − σ·v̂: the error is never amplified.  The cosine
  schedule because a 196-dimensional latent loses its information to noise early on a linear schedule, which
  leaves few steps for the digit's shape (Nichol & Dhariwal 2021, §3.2).

Both are trained on the 8,000 training images of :mod:`pretrained.mnist_data` by
``python -m pretrained.train_ldm_mnist``; the 2,000 held-out images are the reference (``mnist-heldout``),
compared in pixel space after decoding.  One weight file, ``pretrained/weights/ldm_mnist.pt``, holds both
networks (the denoiser is an EMA of its weights), the latent scale and how they were trained; it loads with
``weights_only=True`` and its sha256 is checked (:data:`pretrained.toy.WEIGHTS_SHA256`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

import solvers
from solvers.schedules import VPCosine

from .cards import ModelCard, register_card
from .checkpoints import CheckpointError, check_state_dict, read_network_record
from .mnist_data import SPLIT_RULE
from .fm_mnist import ResBlock, groups
from .toy import WEIGHTS_DIR, WEIGHTS_SHA256, committed_weights, training_summary

__all__ = ["LatentAutoencoder", "LatentUNet", "FORMAT", "AE_FORMAT", "WEIGHTS_FILE", "REBUILD", "LATENT_SHAPE",
           "read_ldm_mnist_weights", "read_autoencoder", "load_ldm_mnist", "load_decoder", "encode_images"]

FORMAT = "pretrained.ldm_mnist/1"
AE_FORMAT = "pretrained.ldm_mnist.autoencoder/1"   # a stage-1 file: the autoencoder alone
WEIGHTS_FILE = WEIGHTS_DIR / "ldm_mnist.pt"
REBUILD = "python -m pretrained.train_ldm_mnist"
LATENT_SHAPE = (4, 7, 7)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 4 if stride == 2 else 3, stride=stride, padding=1)


class LatentAutoencoder(nn.Module):
    """Encoder 1×28×28 → ``latent``×7×7 (two stride-2 convolutions) and the mirrored decoder (nearest
    upsampling + convolutions); GroupNorm and SiLU after every convolution but the last of each, tanh output:
    decoded pixels always lie in [−1, 1].  (Without the GroupNorm this plain 6-layer stack diverged at lr 2e-3:
    codes of standard deviation ≈ 350, a saturated tanh, the loss stuck at the pixel variance.)

    Args:
        widths: channels at 28 and at 14/7 pixels.
        latent: latent channels.
    """

    def __init__(self, widths: tuple = (16, 48), latent: int = 4):
        super().__init__()
        self.widths, self.latent = tuple(int(c) for c in widths), int(latent)
        c0, c1 = self.widths

        def block(c_in: int, c_out: int, stride: int = 1) -> list:   # conv → GroupNorm → SiLU
            return [_conv(c_in, c_out, stride), nn.GroupNorm(groups(c_out), c_out), nn.SiLU()]

        up = nn.Upsample(scale_factor=2, mode="nearest")
        self.encoder = nn.Sequential(*block(1, c0), *block(c0, c0), *block(c0, c1, 2), *block(c1, c1),
                                     *block(c1, c1, 2), _conv(c1, self.latent))
        self.decoder = nn.Sequential(*block(self.latent, c1), *block(c1, c1), up, *block(c1, c0), *block(c0, c0),
                                     up, *block(c0, c0), _conv(c0, 1), nn.Tanh())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Unscaled codes (B, latent, 7, 7) of images x (B, 1, 28, 28) in [−1, 1]."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, 28, 28) in [−1, 1] of unscaled codes z."""
        return self.decoder(z)

    def arch(self) -> dict:
        """The constructor arguments (stored in weight files)."""
        return {"widths": list(self.widths), "latent": self.latent}


class LatentUNet(nn.Module):
    """A small U-Net F(z, t) (the v-prediction) for ``latent``×7×7 latents: residual blocks at 7 and 4 pixels
    (one down, one up), a middle block, skip connections by concatenation, and a time embedding (sinusoids of t
    at ``n_freq`` log-spaced frequencies from 1 to 1000, then a two-layer MLP) added in every block.

    Args:
        channels: channels at 7 and 4 pixels.
        emb: width of the time embedding.
        n_freq: number of sinusoid frequencies.
        latent: latent channels.
    """

    def __init__(self, channels: tuple = (48, 64), emb: int = 128, n_freq: int = 16, latent: int = 4):
        super().__init__()
        self.channels, self.emb_dim = tuple(int(c) for c in channels), int(emb)
        self.n_freq, self.latent = int(n_freq), int(latent)
        c0, c1 = self.channels
        self.register_buffer("freqs", torch.logspace(0, 3, n_freq), persistent=False)
        self.time = nn.Sequential(nn.Linear(2 * n_freq, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(self.latent, c0, 3, padding=1)
        self.down0, self.pool = ResBlock(c0, c0, emb), nn.Conv2d(c0, c1, 3, stride=2, padding=1)   # 7 → 4
        self.down1, self.mid = ResBlock(c1, c1, emb), ResBlock(c1, c1, emb)
        self.up1, self.unpool = ResBlock(2 * c1, c1, emb), nn.Conv2d(c1, c0, 3, padding=1)
        self.up0 = ResBlock(2 * c0, c0, emb)
        self.out_norm, self.out = nn.GroupNorm(groups(c0), c0), nn.Conv2d(c0, self.latent, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """F(z, t) for z (B, latent, 7, 7) and t (B,) (or a scalar)."""
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(-1, 1).expand(z.shape[0], 1)
        phase = t * self.freqs.to(z.dtype)
        emb = self.time(torch.cat([torch.sin(phase), torch.cos(phase)], dim=1))
        h0 = self.down0(self.inp(z), emb)
        h1 = self.down1(self.pool(h0), emb)
        h = self.up1(torch.cat([self.mid(h1, emb), h1], dim=1), emb)
        h = self.unpool(F.interpolate(h, size=z.shape[-2:], mode="nearest"))
        h = self.up0(torch.cat([h, h0], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))

    def arch(self) -> dict:
        """The constructor arguments (stored in weight files)."""
        return {"channels": list(self.channels), "emb": self.emb_dim, "n_freq": self.n_freq, "latent": self.latent}


def encode_images(ae: LatentAutoencoder, scale: float, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents (unit standard deviation on the training images) of images in [−1, 1]."""
    return ae.encode(images) * scale


def _autoencoder_from(part: object, path: Path) -> tuple[LatentAutoencoder, float]:
    """The autoencoder and its latent scale from the ``autoencoder`` part of a record."""
    try:
        ae, scale = LatentAutoencoder(**dict(part["arch"])), float(part["latent_scale"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad autoencoder record ({type(e).__name__}: {e})") from e
    if not scale > 0:
        raise CheckpointError(f"{path}: the latent scale must be a positive number, got {scale}")
    state = part.get("state_dict")
    state = state if isinstance(state, Mapping) else {}
    check_state_dict(state, {k: v.shape for k, v in ae.state_dict().items()}, path=path,
                     what="the ldm_mnist autoencoder")
    ae.load_state_dict(state, strict=True)
    return ae.eval(), scale


def read_ldm_mnist_weights(path: os.PathLike) -> tuple[LatentUNet, LatentAutoencoder, float, dict]:
    """Read a weight file written by ``train_ldm_mnist`` (weights-only) → (denoiser, autoencoder, latent
    scale, record), both networks in eval mode.

    Raises:
        CheckpointError: unreadable, another format, a bad architecture, missing/unexpected keys or shapes.
    """
    path = Path(path)
    net, record = read_network_record(path, fmt=FORMAT, what="the ldm_mnist weights", rebuild=REBUILD,
                                      build=lambda r: LatentUNet(**dict(r["arch"])))
    ae, scale = _autoencoder_from(record.get("autoencoder"), path)
    return net, ae, scale, record


def read_autoencoder(path: os.PathLike) -> tuple[LatentAutoencoder, float, dict]:
    """The autoencoder, its latent scale and its record from a stage-1 file (``train_ldm_mnist --stage
    autoencoder``) or a full ``ldm_mnist`` weight file, read weights-only.

    Raises:
        CheckpointError: unreadable, neither format, or a bad autoencoder record.
    """
    path = Path(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"{path}: cannot read the ldm_mnist autoencoder ({type(e).__name__}: {e})") from e
    fmt = record.get("format") if isinstance(record, dict) else None
    if fmt not in (FORMAT, AE_FORMAT):
        raise CheckpointError(f"{path}: neither a {FORMAT} nor a {AE_FORMAT} weight file (written by {REBUILD})")
    part = record if fmt == AE_FORMAT else record.get("autoencoder")
    ae, scale = _autoencoder_from(part, path)
    return ae, scale, part


def _same_autoencoder(ae: LatentAutoencoder, scale: float, path: Path) -> None:
    """Refuse a user's weight file whose autoencoder is not the committed one: the card's decoder (what the
    benchmark decodes with) is the committed autoencoder, and another one's latents would decode to noise."""
    committed, committed_scale, _ = read_autoencoder(committed_weights(None, WEIGHTS_FILE, REBUILD))
    mine, theirs = ae.state_dict(), committed.state_dict()
    same = scale == committed_scale and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    if not same:
        raise ValueError(f"{path}: its autoencoder is not the committed one ({WEIGHTS_FILE}), which is the "
                         "ldm_mnist card's decoder; its latents would be decoded by the wrong decoder. Use a file "
                         f"whose latent model was trained on the committed autoencoder ({REBUILD} --stage latent), "
                         "or commit the new file and its sha256")


def load_ldm_mnist(*, device: str = "cpu", weights: Optional[os.PathLike] = None,
                   dtype: Optional[torch.dtype] = None, **model_kwargs) -> solvers.DiffusionModel:
    """The ``ldm_mnist`` card's loader: the latent denoiser (decode its samples with :func:`load_decoder`).

    Args:
        device: where the network runs.
        weights: a weight file (default: the committed ``pretrained/weights/ldm_mnist.pt``, sha256-checked); its
            autoencoder must be the committed one (the card's decoder).
        dtype: dtype the network computes in (default float32).
        **model_kwargs: passed to :class:`solvers.DiffusionModel`.

    Returns:
        A v-predicting ``DiffusionModel`` on :class:`VPCosine` over scaled latents (4, 7, 7).

    Raises:
        FileNotFoundError: no such file.  CheckpointError: not a valid weight file.
        ValueError: a user's file with another autoencoder than the committed one.
    """
    path = committed_weights(weights, WEIGHTS_FILE, REBUILD)
    net, ae, scale, _ = read_ldm_mnist_weights(path)
    if path.resolve() != WEIGHTS_FILE.resolve():
        _same_autoencoder(ae, scale, path)
    net = net.requires_grad_(False).to(device=device, dtype=dtype or torch.float32)
    return solvers.DiffusionModel(net, schedule=VPCosine(), prediction="v", input_dtype=dtype or torch.float32,
                                  **model_kwargs)


def load_decoder(*, device: str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """The card's decoder: scaled latents (B, 4, 7, 7) → images (B, 1, 28, 28) in [−1, 1] (float32), through the
    committed autoencoder (sha256-checked)."""
    ae, scale, _ = read_autoencoder(committed_weights(None, WEIGHTS_FILE, REBUILD))
    ae = ae.requires_grad_(False).to(device)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != LATENT_SHAPE:
            raise ValueError(f"ldm_mnist decodes latents of shape (B, {', '.join(map(str, LATENT_SHAPE))}), got "
                             f"{tuple(latents.shape)}")
        with torch.no_grad():
            return ae.decode(latents.to(device=device, dtype=torch.float32) / scale)

    return decode


# Measured by this project on 2 shared CPU threads, with the commands it names.
QUALITY = ("Quality, FD (MNIST classifier) of 500 decoded samples against the 2,000 held-out images (python -m "
           "bench.run --model ldm_mnist --solvers euler,heun,dpmpp_2m --steps 10,20,50 --num-samples 500 --repeats 1; "
           "logsnr grid): euler 57.6 / 46.0 / 41.8 at 10 / 20 / 50 steps; heun 44.6 / 41.2 / 40.0 (NFE 19 / 39 / 99); "
           "dpmpp_2m 47.7 / 42.8 / 40.4. Noise floor (500 held-out images against all 2,000) 9.4 ± 1.7, so the best "
           "cells are ≈ 4.2× the floor: digits, some malformed. Decoding the 500 latents took 0.5-1.9 s per cell, "
           "sampling 12-165 s (2 shared CPU threads). The autoencoder's own floor (python -m "
           "pretrained.train_ldm_mnist --measure): reconstructions of the held-out images have RMSE 0.040 (pixels "
           "in [0, 1]) and FD 2.3 for all 2,000 (0 for the images themselves), 28.2 for the first 500 (21.3 for "
           "those 500 images): the autoencoder costs ≈ 7 of FD at n = 500, the rest of the gap to the floor is the "
           "latent model's.")


register_card(ModelCard(
    name="ldm_mnist", kind="image",
    description="A latent diffusion model of MNIST trained by this project: an autoencoder 1×28×28 ↔ 4×7×7 and a "
                "v-prediction U-Net on its latents, so solvers run on a latent model whose samples are decoded "
                "(the benchmark times decoding apart) and judged in pixel space.",
    loader=load_ldm_mnist, sample_shape=LATENT_SHAPE, prediction="v",
    schedule_name="VPCosine (s = 0.008, t ∈ [0, 0.9946]) on latents scaled to unit std; network time t",
    data_range=(-1.0, 1.0), to_images=lambda x: ((x + 1.0) / 2.0).clamp(0.0, 1.0), reference="mnist-heldout",
    default_num_samples=500, default_batch_size=250,
    # Trained here: the "source" is the training script, the weights are committed (sha256 in toy.WEIGHTS_SHA256).
    source_url="pretrained/train_ldm_mnist.py (this project)", sha256=WEIGHTS_SHA256.get(WEIGHTS_FILE.name),
    licence="MIT (this project); trained on MNIST test images (Y. LeCun, C. Cortes)",
    weights_note=f"Trained by this project: {training_summary(WEIGHTS_FILE)}",
    notes=f"Data: {SPLIT_RULE}. Rebuild the weights with: {REBUILD} (both stages: ≈ 9 + 19 min on one thread "
          "of a shared machine while three other trainings ran). "
          + QUALITY,
    extra={"weights": WEIGHTS_FILE, "data_split": SPLIT_RULE},
    decoder=load_decoder, data_shape=(1, 28, 28),
    decoder_name="the ldm_mnist autoencoder's decoder (4×7×7 latents ÷ the latent scale → conv, upsample ×2 "
                 "twice → tanh: 1×28×28 in [−1, 1])",
))
